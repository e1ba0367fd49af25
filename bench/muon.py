"""The reference's Muon variant against DeepSpeed's Muon (and AdamW), on the tiny model, under ZeRO-3.

1. Quality: `parcae train` of configs/demo-tiny.yaml on 2 CPU ranks for --steps steps on the embedded
   corpus, each optimizer with the same data, steps, learning rates and schedule; the final validation loss
   at 1 and 4 loops (h_0 = 0).
2. Cost: the share of the training step spent in the optimizer step (`engine.step()`), timed in one
   process per optimizer (1 rank, ZeRO-3), alternating, after warm-up.

    .venv/bin/python bench/muon.py [--steps 200] [--muon-lr 0.02] [--adam-lr 0.003]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# label -> (optimizer.name, more overrides); DeepSpeed's Muon clips on the orthogonalised update's norm
OPTIMIZERS = {
    "muon": ("muon", []),
    "muon-deepspeed": ("muon-deepspeed", []),
    "muon-deepspeed, no clip": ("muon-deepspeed", ["optimizer.grad_clip=0"]),
    "adamw": ("adamw", []),
}


def overrides(shards: Path, label: str, args: argparse.Namespace) -> list[str]:
    name, extra = OPTIMIZERS[label]
    lr = args.adam_lr if name == "adamw" else args.muon_lr
    return [
        f"data.train_url={shards / 'train'}",
        f"data.val_url={shards / 'val'}",
        "data.seq_len=64",
        f"optimizer.name={name}",
        f"optimizer.lr={lr}",
        f"optimizer.adam_lr={args.adam_lr}",
        "optimizer.betas=[0.8, 0.95]",
        "optimizer.eps=1e-10",
        "optimizer.muon_momentum_warmup_steps=50",
        f"training.total_steps={args.steps}",
        f"eval.interval_steps={args.steps}",
        "eval.loop_counts=[1, 4]",
        "checkpoint.interval_steps=1000000",
        "logging.log_interval=20",
        *extra,
    ]


def time_phases(shards: Path, name: str, args: argparse.Namespace) -> dict[str, float]:
    """In this process: 1 rank, ZeRO-3, mean seconds per phase over 20 steps after 5 warm-up steps."""
    from pipeline.jobspec import load_spec
    from pipeline.training.distributed import RankInfo, close_distributed, export_rank_env, free_port, init_distributed
    from pipeline.training.trainer import engine_for_job

    spec = load_spec(
        REPO / "configs" / "demo-tiny.yaml", [*overrides(shards, name, args), "cluster.procs_per_node=1"]
    ).spec
    export_rank_env(RankInfo(0, 0, 1, "127.0.0.1", free_port()))
    init_distributed("cpu")
    engine = engine_for_job(spec, 1, 0, "cpu")
    torch.manual_seed(0)
    micro = spec.training.micro_batch_size
    batch = torch.randint(0, spec.model.vocab_size, (micro, 65))
    loops = (torch.full((micro,), 2), torch.full((micro,), 2))
    totals = {"forward_backward": 0.0, "optimizer_step": 0.0}
    for i in range(25):
        t0 = time.perf_counter()
        loss = engine(batch[:, :-1], batch[:, 1:], loops=loops)
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        if i >= 5:
            totals["forward_backward"] += (t1 - t0) / 20
            totals["optimizer_step"] += (t2 - t1) / 20
    close_distributed()
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--adam-lr", type=float, default=0.003)
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:
        print(json.dumps(time_phases(Path(args.shards), args.time, args)))
        return
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_tokenizer(
            iter_documents(CorpusSpec((BUILTIN,)), Problems()), TokenizerSettings(vocab_size=2048), root / "t"
        )
        settings = ShardSettings(seq_len=64, shard_bytes=200_000, val_fraction=0.03)
        build_shards([BUILTIN], str(root / "t.model"), str(root / "s"), settings, workers=2, progress=False)
        quality = {}
        for name in OPTIMIZERS:
            run_dir = root / f"run-{name.replace(' ', '').replace(',', '-')}"
            sets = [*overrides(root / "s", name, args), f"run_dir={run_dir}"]
            cmd = [sys.executable, "-m", "pipeline", "train", str(REPO / "configs" / "demo-tiny.yaml")]
            done = subprocess.run(
                [*cmd, *[f"--set={s}" for s in sets]], cwd=REPO, env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                sys.exit(f"{name}: training failed\n{done.stderr[-3000:]}")
            records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            final = [r for r in records if "val_loss_loops_4" in r][-1]
            train = [r["loss"] for r in records if "loss" in r]
            quality[name] = (final["val_loss_loops_1"], final["val_loss_loops_4"], sum(train[-10:]) / 10)
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in OPTIMIZERS}
        for _ in range(3):  # alternating processes, so a noisy moment hits every optimizer
            for name in OPTIMIZERS:
                cmd = [sys.executable, __file__, "--time", name, "--shards", str(root / "s")]
                done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name}: timing failed\n{done.stderr[-3000:]}")
                rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rates = f"Muon lr {args.muon_lr}, AdamW lr {args.adam_lr}"
    print(f"tiny Parcae (configs/demo-tiny.yaml), ZeRO-3, {args.steps} steps, {rates}")
    header = f"{'val loss T=1':>12} {'val loss T=4':>12} {'train (last 10)':>16} {'opt step':>10} {'share':>7}"
    print(f"  {'optimizer':<24} {header}")
    for name in OPTIMIZERS:
        step = statistics.median(r["optimizer_step"] for r in rounds[name])
        whole = statistics.median(r["optimizer_step"] + r["forward_backward"] for r in rounds[name])
        v1, v4, tr = quality[name]
        print(f"  {name:<24} {v1:12.4f} {v4:12.4f} {tr:16.4f} {1000 * step:8.1f}ms {step / whole:7.1%}")


if __name__ == "__main__":
    main()
