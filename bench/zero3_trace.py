"""ZeRO-3 on the looped model: what DeepSpeed's per-module hooks and its prefetch trace cost.

ZeRO-3 records the order modules run in and invalidates that trace when the order changes (DeepSpeed
issues 6870, 5033); a loop count drawn per step changes it. This runs one rank in-process for each
variant (its own subprocess), on the same in-memory batches and loop draws, and prints forward /
backward / optimizer-step time per step and how often DeepSpeed invalidated its trace:

- bare PyTorch (no DeepSpeed), the reference;
- ZeRO-3, zero.gather_unit=module: DeepSpeed's default, hooks on every nn.Module call;
- ZeRO-3, zero.gather_unit=block: each prelude/coda block and the whole recurrence gathered as one
  unit (the pipeline's default);
each with loop counts drawn per step (as in training) and with one fixed count (a constant trace).

    python bench/zero3_trace.py [--steps 30] [--d-model 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def overrides(args: argparse.Namespace, gather_unit: str) -> list[str]:
    return [
        "data.train_url=unused",
        "data.val_url=null",
        f"data.seq_len={args.seq_len}",
        f"model.max_seq_len={args.seq_len}",
        f"model.d_model={args.d_model}",
        "model.n_core=2",
        f"training.micro_batch_size={args.micro_batch}",
        "training.gradient_accumulation_steps=1",
        "cluster.procs_per_node=1",
        "zero.stage=3",
        f"zero.gather_unit={gather_unit}",
    ]


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """One variant, in this process: mean ms per phase over the steps after 5 warm-up steps."""
    from model import build_model, loop_generator, sample_loop_counts
    from pipeline.jobspec import load_spec

    way, draws = args.variant.split(":")
    unit = "module" if way == "module" else "block"
    spec = load_spec(REPO / "configs" / "demo-tiny.yaml", overrides(args, unit)).spec
    torch.manual_seed(0)
    batches = [torch.randint(0, spec.model.vocab_size, (args.micro_batch, args.seq_len + 1)) for _ in range(4)]
    mean, depth = spec.model.mean_recurrence, spec.model.mean_backprop_depth

    def loops(step: int):
        if draws == "fixed":
            return (torch.full((args.micro_batch,), mean - depth), torch.full((args.micro_batch,), depth))
        return sample_loop_counts(args.micro_batch, mean, depth, loop_generator(0, -1, step, 0))

    invalidations = [0]
    if way == "bare":
        model = build_model(spec.model.build(), seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def forward(x, y, counts):
            return model(x, y, loops=counts)

        def backward(loss):
            loss.backward()

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        from pipeline.training.distributed import (
            RankInfo,
            close_distributed,
            export_rank_env,
            free_port,
            init_distributed,
        )
        from pipeline.training.trainer import engine_for_job

        original = PartitionedParameterCoordinator._invalidate_trace

        def counting(self):
            invalidations[0] += 1
            return original(self)

        PartitionedParameterCoordinator._invalidate_trace = counting
        export_rank_env(RankInfo(0, 0, 1, "127.0.0.1", free_port()))
        init_distributed("cpu")
        engine = engine_for_job(spec, 1, 0, "cpu")

        def forward(x, y, counts):
            return engine(x, y, loops=counts)

        def backward(loss):
            engine.backward(loss)

        def step():
            engine.step()

    totals = [0.0, 0.0, 0.0]
    for i in range(args.steps + 5):
        if i == 5:
            totals, invalidations[0] = [0.0, 0.0, 0.0], 0
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        loss = forward(batch[:, :-1], batch[:, 1:], loops(i))
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
            totals[k] += dt
    fwd, bwd, opt = (1000 * t / args.steps for t in totals)
    if way != "bare":
        close_distributed()
    return {"forward": fwd, "backward": bwd, "step": opt, "invalidations": invalidations[0] / args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = [f"{way}:{draws}" for draws in ("drawn", "fixed") for way in ("bare", "module", "block")]
    results = {}
    for variant in variants:
        cmd = [sys.executable, __file__, f"--variant={variant}", *sys.argv[1:]]
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"tiny Parcae d={args.d_model}, core 2 blocks, micro batch {args.micro_batch} x {args.seq_len}, "
        f"{args.steps} steps after 5 warm-up, 1 rank, threads {torch.get_num_threads()}"
    )
    print(f"{'variant':<22}{'fwd ms':>9}{'bwd ms':>9}{'step ms':>9}{'total':>9}{'vs bare':>9}{'invalid/step':>14}")
    for variant, r in results.items():
        total = r["forward"] + r["backward"] + r["step"]
        bare = results[f"bare:{variant.split(':')[1]}"]
        ratio = (bare["forward"] + bare["backward"] + bare["step"]) / total
        print(
            f"{variant:<22}{r['forward']:9.1f}{r['backward']:9.1f}{r['step']:9.1f}{total:9.1f}{ratio:8.2f}x"
            f"{r['invalidations']:14.2f}"
        )


if __name__ == "__main__":
    main()
