"""Training throughput: `parcae train` (DeepSpeed ZeRO-3, 1 rank and 2 ranks) against a bare PyTorch loop
(same model, batch, loop-count sampling, AdamW, clipping; no DeepSpeed), in one run, on local shards.

Targets: `parcae train` on 1 rank reaches at least 0.9x the bare loop's tokens/s; 2 ranks
against 1 is reported (on a 2-core machine two ranks share the cores). With --compile both sides compile
(the bare model's `compile_units` and `warm_up_compiled`, `training.compile=on`: every compiled variant
before the first step on both sides). The first --warmup steps are not timed on either side (default 5).

    python bench/train_throughput.py [--steps 40] [--d-model 128] [--seq-len 128] [--micro-batch 8]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more spec overrides (all runs)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="parcae train runs to make")
    parser.add_argument("--compile", action="store_true", help="compile the bare model and training.compile=on")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps, a multiple of 5 (default 5)")
    parser.add_argument(
        "--threads", type=int, help="intra-op threads of the bare loop and of every rank (OMP_NUM_THREADS); "
        "default: all CPUs for the bare loop, `parcae train`'s own choice (its share of the CPUs) for the ranks"
    )  # fmt: skip
    args = parser.parse_args()
    warmup = args.warmup
    if warmup % 5 or warmup >= args.steps:
        parser.error(f"--warmup: a multiple of 5 (the log window) below --steps, got {warmup}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer
    from model import build_model, loop_generator, sample_loop_counts
    from pipeline.data.mixture import train_loader
    from pipeline.jobspec import load_spec
    from pipeline.training.engine import param_groups
    from pipeline.training.schedule import lr_multiplier

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        train_tokenizer(
            iter_documents(CorpusSpec((BUILTIN,)), Problems()), TokenizerSettings(vocab_size=2048), tmp_path / "tok"
        )
        build_shards(
            [BUILTIN],
            str(tmp_path / "tok.model"),
            str(tmp_path / "shards"),
            ShardSettings(seq_len=args.seq_len, shard_bytes=400_000),
            workers=2,
            progress=False,
        )
        overrides = [
            f"data.train_url={tmp_path / 'shards' / 'train'}",
            "data.val_url=null",
            f"data.seq_len={args.seq_len}",
            f"model.max_seq_len={args.seq_len}",
            f"model.d_model={args.d_model}",
            "model.n_core=2",
            f"training.micro_batch_size={args.micro_batch}",
            f"training.total_steps={args.steps}",
            "logging.log_interval=5",
            "checkpoint.interval_steps=100000",
            "training.gradient_accumulation_steps=1",
            *(["training.compile=on"] if args.compile else []),
            *args.extra,
        ]

        threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}

        def parcae_train(ranks: int) -> float:
            run_dir = tmp_path / f"run{ranks}"
            cmd = [
                sys.executable,
                "-m",
                "pipeline",
                "train",
                str(REPO / "configs" / "demo-tiny.yaml"),
                *[f"--set={o}" for o in [*overrides, f"cluster.procs_per_node={ranks}", f"run_dir={run_dir}"]],
            ]
            done = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu", **threads}
            )
            if done.returncode != 0:
                sys.exit(f"parcae train ({ranks} ranks) failed:\n{done.stderr[-4000:]}")
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            # 5-step windows of equal tokens after the warm-up: their total rate is the harmonic mean
            rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > warmup]
            return len(rates) / sum(1 / r for r in rates)

        def bare() -> float:
            spec = load_spec(REPO / "configs" / "demo-tiny.yaml", [*overrides, "cluster.procs_per_node=1"]).spec
            model = build_model(spec.model.build(), seed=spec.training.seed)
            if args.compile:  # every variant compiled before the first step, as `parcae train` does
                model.compile_units()
                model.warm_up_compiled(spec.data.seq_len)
            opt = spec.optimizer
            optimizer = torch.optim.AdamW(param_groups(model, opt), lr=opt.lr, betas=opt.betas, eps=opt.eps)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_multiplier(s, args.steps, spec.schedule)
            )
            loader = train_loader(
                spec.data,
                spec.storage.s3_options(),
                rank=0,
                world_size=1,
                micro_batch_size=args.micro_batch,
                seed=spec.training.seed,
            )
            start, counted = 0.0, 0
            for step, rows in enumerate(itertools.islice(iter(loader), args.steps)):
                batch = rows.tokens
                if step == warmup:
                    start, counted = time.perf_counter(), 0
                loops = sample_loop_counts(
                    args.micro_batch,
                    spec.model.mean_recurrence,
                    spec.model.mean_backprop_depth,
                    loop_generator(spec.training.seed, -1, step, 0),
                )
                loss = model(batch[:, :-1], batch[:, 1:], loops=loops)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
                optimizer.step()
                schedule.step()
                counted += batch[:, 1:].numel()
            return counted / (time.perf_counter() - start)

        results = {"bare PyTorch, 1 process": bare()}
        for ranks in args.ranks:
            results[f"parcae train, {ranks} rank{'s' if ranks > 1 else ''}"] = parcae_train(ranks)
    print(
        f"tiny Parcae d={args.d_model}, core 2 blocks, micro batch {args.micro_batch} x {args.seq_len} tokens, "
        f"mean recurrence 4, {args.steps} steps, threads per process {torch.get_num_threads()}"
    )
    base = results["bare PyTorch, 1 process"]
    for label, rate in results.items():
        print(f"  {label:<32} {rate:10.0f} tokens/s   {rate / base:5.2f}x bare")
    print(f"settings: {' '.join(args.extra) or 'as configs/demo-tiny.yaml (ZeRO-3)'}" + (", compiled" * args.compile))
    one, two = results.get("parcae train, 1 rank"), results.get("parcae train, 2 ranks")
    if one:
        print(
            f"1 rank / bare = {one / base:.2f} (target >= 0.9)"
            + (f"; 2 ranks / 1 rank = {two / one:.2f}" if two else "")
        )


if __name__ == "__main__":
    main()
