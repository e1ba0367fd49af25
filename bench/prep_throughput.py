"""Throughput of `parcae prep shards` (read JSONL + tokenize + pack + write tar shards) with 1 and 2
worker processes, against the raw SentencePiece encode speed of one process on the same text, in one run.

Target: 2 workers reach at least 0.8 x (2 x the single-process raw encode speed).

    python bench/prep_throughput.py [--megabytes 80] [--vocab-size 8192] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from data_prep.corpus import BUILTIN, CorpusSpec, Document, Problems, iter_documents
from data_prep.shards import ShardSettings, _chunks, build_shards
from data_prep.tokenizer import TokenizerSettings, load_tokenizer, train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=80.0, help="corpus size (the embedded corpus, repeated)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    base = [d.text for d in iter_documents(CorpusSpec((BUILTIN,)), Problems())]
    texts: list[str] = []
    copy = 0
    while sum(map(len, texts)) < args.megabytes * 1e6:
        texts += [f"{t}\n[copy {copy}]" for t in base]  # distinct documents, so the split hash varies
        copy += 1
    chars = sum(map(len, texts))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        corpus = tmp_path / "corpus.jsonl"
        with corpus.open("w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
        train_tokenizer((Document(t, "") for t in base), TokenizerSettings(vocab_size=args.vocab_size), tmp_path / "t")
        model = str(tmp_path / "t.model")
        sp = load_tokenizer(model)
        pieces = list(_chunks((Document(t, "") for t in texts), ShardSettings().chunk_chars))
        results: dict[str, list[float]] = {"raw": [], "1 worker": [], "2 workers": []}
        tokens = 0
        for repeat in range(args.repeats):
            # raw: one process, one thread, encoding the same text in the same 1 MB pieces the workers get
            start = time.perf_counter()
            tokens = sum(len(ids) + 1 for piece in pieces for ids in sp.encode([d.text for d in piece], num_threads=1))
            results["raw"].append(tokens / (time.perf_counter() - start))
            for workers, label in ((1, "1 worker"), (2, "2 workers")):
                out = tmp_path / f"out-{repeat}-{workers}"
                settings = ShardSettings(seq_len=args.seq_len, shard_bytes=64 << 20)
                start = time.perf_counter()
                summary = build_shards([str(corpus)], model, str(out), settings, workers=workers, progress=False)
                elapsed = time.perf_counter() - start
                produced = summary["train"]["tokens_produced"] + summary["val"]["tokens_produced"]
                assert produced == tokens, (produced, tokens)
                results[label].append(produced / elapsed)
    raw = statistics.median(results["raw"])
    print(
        f"corpus: {chars / 1e6:.1f}M characters of JSON Lines, {tokens / 1e6:.2f}M tokens, vocab {args.vocab_size}, "
        f"seq_len {args.seq_len}; median of {args.repeats} runs"
    )
    for label, values in results.items():
        rate = statistics.median(values)
        print(f"  {label:<10} {rate / 1e6:6.2f}M tokens/s   {rate / raw:5.2f}x raw single-process encode")
    two = statistics.median(results["2 workers"])
    print(f"2 workers / (2 x raw encode) = {two / (2 * raw):.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
