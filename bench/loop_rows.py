"""Finished rows stop costing compute: active-row loops against the all-rows way, same batches.

The reference implementation runs every row of a batch for max(n_nograd) + max(n_grad) loops and
keeps finished rows frozen with a select; model/parcae.py runs the core on the rows still looping only
(gather, then index_copy back). This times one training step (forward + backward, per-sequence
Poisson(mean_recurrence) loop counts, truncated backprop) both ways on the same batches and loop
draws, interleaved, and checks that the two give the same loss and gradients.

    python bench/loop_rows.py [--mean-recurrence 8] [--batch 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import time

import torch

from model import ParcaeConfig, build_model, loop_generator, sample_loop_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mean-recurrence", type=int, default=8)
    parser.add_argument("--backprop-depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cfg = ParcaeConfig(
        vocab_size=4096,
        d_model=args.d_model,
        n_head=2,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_seq_len=args.seq_len,
        mean_recurrence=args.mean_recurrence,
        mean_backprop_depth=args.backprop_depth,
        h0_init="zeros",
    )
    model = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    seconds = {True: 0.0, False: 0.0}
    core_rows = {True: 0, False: 0}
    worst_loss, worst_grad = 0.0, 0.0
    for step in range(args.steps + 1):
        idx = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g)
        loops = sample_loop_counts(
            args.batch, cfg.mean_recurrence, cfg.mean_backprop_depth, loop_generator(0, 0, step, 0)
        )
        results = {}
        for skip in (True, False) if step % 2 else (False, True):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = model(idx, idx, loops=loops, skip_finished_rows=skip)
            loss.backward()
            elapsed = time.perf_counter() - start
            if step > 0:  # step 0 is warm-up
                seconds[skip] += elapsed
                n_nograd, n_grad = loops
                core_rows[skip] += (
                    int((n_nograd + n_grad).sum()) if skip else args.batch * int(n_nograd.max() + n_grad.max())
                )
            results[skip] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
        worst_loss = max(worst_loss, (results[True][0] - results[False][0]).abs().item())
        for a, b in zip(results[True][1], results[False][1], strict=True):
            worst_grad = max(worst_grad, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    print(
        f"model d={args.d_model}, core 2 blocks, batch {args.batch} x {args.seq_len}, loops ~ "
        f"max(1, Poisson({args.mean_recurrence})), backprop depth {args.backprop_depth}, {args.steps} steps"
    )
    print(
        f"core row-loops computed: all-rows {core_rows[False]}, active rows {core_rows[True]} "
        f"({1 - core_rows[True] / core_rows[False]:.0%} fewer)"
    )
    print(
        f"step time: all-rows {seconds[False] / args.steps:.3f} s, active rows {seconds[True] / args.steps:.3f} s, "
        f"speed-up {seconds[False] / seconds[True]:.2f}x"
    )
    print(f"largest difference: loss {worst_loss:.2e}, gradient {worst_grad:.2e} (relative to the tensor's max)")


if __name__ == "__main__":
    main()
