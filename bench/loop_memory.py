"""Activation memory and step time of one training step against the loop count, with per-loop
activation checkpointing on and off, on the same batch (CPU).

Activation memory = peak of live CPU allocations during forward + backward, minus what was live just
before the step; measured with torch.profiler's allocation events (profile_memory=True), which see
every tensor the CPU allocator hands out. Step times are measured separately (no profiler), the two
variants interleaved, median of the repeats.

Target: with checkpointing, each extra loop costs at most 1.5 hidden states
(batch x seq_len x d values; the floor is 1), and the checkpointed step takes at most 1.4x the time of
the uncheckpointed one at the same loop count.

    python bench/loop_memory.py [--d-model 256] [--batch 4] [--seq-len 256] [--loops 4 8 16 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from model import ParcaeConfig, build_model


def step(model, idx, loops: int) -> None:
    loss = model(idx, idx, loops=loops, h0=torch.zeros(*idx.shape, model.cfg.d_model))
    loss.backward()


def activation_bytes(model, idx, loops: int) -> int:
    model.zero_grad(set_to_none=False)  # gradients exist before the step: not counted as activations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, idx, loops)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def step_seconds(model, idx, loops: int) -> float:
    model.zero_grad(set_to_none=False)
    start = time.perf_counter()
    step(model, idx, loops)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loops", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = ParcaeConfig(
        vocab_size=4096,
        d_model=args.d_model,
        n_head=args.n_head,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_seq_len=args.seq_len,
        h0_init="zeros",
    )
    models = {ckpt: build_model(dataclasses.replace(cfg, activation_checkpointing=ckpt), seed=0) for ckpt in (0, 1)}
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
    hidden = args.batch * args.seq_len * args.d_model * 4  # one fp32 hidden state, bytes
    print(
        f"model d={args.d_model}, core 2 blocks, batch {args.batch} x {args.seq_len} tokens; "
        f"one hidden state = {hidden / 2**20:.2f} MiB; threads {torch.get_num_threads()}"
    )
    step(models[0], idx, 2), step(models[1], idx, 2)  # warm-up
    rows = []
    for loops in args.loops:
        mem = {ckpt: activation_bytes(models[ckpt], idx, loops) for ckpt in (0, 1)}
        times: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(args.repeats):
            for ckpt in (0, 1):
                times[ckpt].append(step_seconds(models[ckpt], idx, loops))
        med = {ckpt: statistics.median(times[ckpt]) for ckpt in (0, 1)}
        rows.append((loops, mem, med))
    print(
        f"\n{'loops':>5} | {'act. MiB no ckpt':>16} | {'act. MiB ckpt':>13} | {'step s no ckpt':>14} | "
        f"{'step s ckpt':>11} | {'time ckpt/no':>12}"
    )
    for loops, mem, med in rows:
        print(
            f"{loops:>5} | {mem[0] / 2**20:>16.1f} | {mem[1] / 2**20:>13.1f} | {med[0]:>14.3f} | {med[1]:>11.3f} | "
            f"{med[1] / med[0]:>12.2f}"
        )
    print("\nper extra loop, in hidden states (between consecutive loop counts):")
    for (l0, m0, _), (l1, m1, _) in itertools.pairwise(rows):
        per = {ckpt: (m1[ckpt] - m0[ckpt]) / (l1 - l0) / hidden for ckpt in (0, 1)}
        print(f"  {l0:>2} -> {l1:>2} loops: no ckpt {per[0]:6.2f}   ckpt {per[1]:5.2f}  (target <= 1.5)")
    worst = max(med[1] / med[0] for _, _, med in rows)
    print(f"\nworst checkpointed / plain step time: {worst:.2f}x (target <= 1.4)")


if __name__ == "__main__":
    main()
