"""Per-sequence depth sampling (the brief, section 5).

For each sequence and micro-step: total = max(1, Poisson(mean_recurrence)), k = min(total,
mean_backprop_depth) loops with gradients (the last ones), n = total - k without. Draws come from a
generator seeded by (seed, rank, step, micro-step), so ranks and micro-steps differ and a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import math

import torch


def seeded_generator(
    purpose: str, seed: int, rank: int, step: int, micro_step: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator for one draw (``purpose``: "loops", "h0", ...), seeded by a hash of what identifies it."""
    digest = hashlib.sha256(f"parcae-{purpose}:{seed}:{rank}:{step}:{micro_step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def loop_generator(seed: int, rank: int, step: int, micro_step: int) -> torch.Generator:
    return seeded_generator("loops", seed, rank, step, micro_step)


def sample_loop_counts(
    batch_size: int, mean_recurrence: float, mean_backprop_depth: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_nograd, n_grad), each (batch_size,) int64 on the CPU."""
    rates = torch.full((batch_size,), float(mean_recurrence), dtype=torch.float64)
    total = torch.poisson(rates, generator=generator).long().clamp(min=1)
    n_grad = total.clamp(max=mean_backprop_depth)
    return total - n_grad, n_grad


def expected_loop_counts(mean_recurrence: float, mean_backprop_depth: int) -> tuple[float, float]:
    """(E[total], E[k]) under `sample_loop_counts`: what a long run averages, and so what its FLOPs per token
    are. E[k] = E[min(total, k_max)] is below the configured depth (3.94 at 8 / 4: a draw of 1-3 loops
    backpropagates all of them); E[total] is a hair above the mean (a draw of 0 runs 1)."""
    pmf = [math.exp(-mean_recurrence)]  # Poisson(mean_recurrence) at 0, 1, ... below the depth
    for n in range(1, mean_backprop_depth):
        pmf.append(pmf[-1] * mean_recurrence / n)
    short_by = sum((mean_backprop_depth - max(n, 1)) * p for n, p in enumerate(pmf))
    return mean_recurrence + pmf[0], mean_backprop_depth - short_by
