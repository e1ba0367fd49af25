"""Loader throughput: a mixture of 4 sources against 1 source (rows/s), side by side in one run.

The embedded corpus is split into 4 shard sets of its documents (every 4th document to each) and also
prepared whole as 1 shard set (shards of 250 kB in both); the training loader
(`pipeline.data.mixture.train_loader`, what `parcae train` reads through) streams micro batches from each
configuration, alternating rounds, best round of each kept. No read-ahead thread (``prefetch_batches:
0``): this is the loader's own cost, which the trainer otherwise hides behind the step. For scale, the
rows per second one GPU trains at the parcae-140m config is printed beside it (paper FLOPs per token, an
assumed 989 TFLOP/s bf16 peak at 40% MFU).

    python bench/loader_mix.py [--seq-len 256] [--batches 2000] [--rounds 3] [--work runs/loader-bench]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from workdir import REPO, prepare_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--batches", type=int, default=2000, help="micro batches of 8 rows per measurement (default: ~8 epochs)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "loader-bench")
    args = parser.parse_args()

    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.storage import S3Options
    from model.config import paper_flops_per_token
    from pipeline.data.mixture import train_loader
    from pipeline.jobspec import DataSpec, load_spec

    work = args.work.resolve()
    tokenizer, whole = prepare_corpus(work, args.seq_len, shard_size="250kB")
    docs = [d.text for d in iter_documents(CorpusSpec((BUILTIN,)), Problems())]
    parts = []
    for k in range(4):
        out = work / f"part{k}"
        if not (out / "train" / "manifest.json").is_file():
            (work / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[k::4]))
            settings = ShardSettings(seq_len=args.seq_len, shard_bytes=250_000, val_fraction=0.0)
            build_shards([str(work / f"part{k}.jsonl")], str(tokenizer), str(out), settings, workers=2, progress=False)
        parts.append(out / "train")

    common = {"seq_len": args.seq_len, "shuffle_buffer": 1000, "prefetch_batches": 0}
    configs = {
        "1 source": DataSpec(train_url=str(whole / "train"), **common),
        "4 sources": DataSpec(
            sources=[{"name": f"s{k}", "url": str(p), "weight": 4 - k} for k, p in enumerate(parts)],
            **common,
        ),
    }

    def rate(data: DataSpec) -> float:
        """From the loader's construction (manifests read, shuffle buffers filled) to the last batch."""
        start = time.perf_counter()
        loader = train_loader(data, S3Options(), rank=0, world_size=1, micro_batch_size=8, accumulation=4, seed=1)
        for _ in itertools.islice(iter(loader), args.batches):
            pass
        return args.batches * 8 / (time.perf_counter() - start)

    best = {name: 0.0 for name in configs}
    for _ in range(args.rounds):
        for name, data in configs.items():
            best[name] = max(best[name], rate(data))
    spec = load_spec(REPO / "configs" / "parcae-140m.yaml", ["data.train_url=unused"]).spec
    per_token = paper_flops_per_token(spec.model.build(), spec.data.seq_len)
    gpu_rows = 989e12 * 0.4 / per_token / spec.data.seq_len
    for name, value in best.items():
        print(f"{name:>10}: {value:8.0f} rows/s ({value * (args.seq_len + 1) / 1e6:.2f}M tokens/s), 1 thread")
    print(f"4 sources / 1 source: {best['4 sources'] / best['1 source']:.2f}x")
    print(
        f"for scale: one H100 at 40% MFU trains parcae-140m on {gpu_rows:.0f} rows/s of {spec.data.seq_len} tokens "
        f"({gpu_rows * spec.data.seq_len / 1e6:.2f}M tokens/s)"
    )


if __name__ == "__main__":
    main()
