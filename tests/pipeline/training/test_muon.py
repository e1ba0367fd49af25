"""The reference Muon variant's pure update against an independent implementation written here from the
description: Nesterov-style momentum with warm-up, Polar Express in bf16 (the transposed form
computed directly for tall matrices), per-neuron second-moment normalisation, the aspect-scaled rate and
cautious, linearly decaying weight decay; on square, tall and wide matrices, over several steps."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.muon import POLAR_EXPRESS, momentum_at, muon_step, second_moment_shape, weight_decay_at


def orthogonalise(d: torch.Tensor) -> torch.Tensor:
    x = d.to(torch.bfloat16)
    x = x / (1.02 * torch.linalg.matrix_norm(x) + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        if x.shape[0] > x.shape[1]:  # tall: A = X^T X, X <- a X + X (b A + c A^2)
            g = x.T @ x
            x = a * x + x @ (b * g + c * g @ g)
        else:
            g = x @ x.T
            x = a * x + (b * g + c * g @ g) @ x
    return x.float()


def reference_step(w, g, m, v, t, total, lr, wd):
    mu = 0.85 + 0.10 * min(t / 300, 1.0)
    m = mu * m + (1 - mu) * g
    d = (1 - mu) * g + mu * m
    o = orthogonalise(d)
    rows, cols = o.shape
    if rows >= cols:
        v = 0.95 * v + 0.05 * (o**2).mean(dim=1, keepdim=True)
    else:
        v = 0.95 * v + 0.05 * (o**2).mean(dim=0, keepdim=True)
    u = o / torch.sqrt(torch.clamp(v, min=1e-10))
    u = u * (torch.linalg.matrix_norm(o) / torch.linalg.matrix_norm(u))
    rate = lr * math.sqrt(max(1.0, rows / cols))
    decay = wd * (1 - t / total)
    w = w - rate * u - rate * decay * w * ((u * w) >= 0).float()
    return w, m, v


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (6, 32)])
def test_pure_update_matches_an_independent_implementation(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    ours = {"w": w.clone(), "m": torch.zeros(shape), "v": torch.zeros(second_moment_shape(shape))}
    theirs = (w.clone(), torch.zeros(shape), torch.zeros(second_moment_shape(shape)))
    for t in range(6):
        g = torch.randn(shape)
        muon_step(ours["w"], g.clone(), ours["m"], ours["v"], step=t, total_steps=10, lr=0.02, weight_decay=0.2)
        theirs = reference_step(*theirs[:1], g, theirs[1], theirs[2], t, 10, 0.02, 0.2)
        # bf16 orthogonalisation: the two differ by bf16 rounding in the matmul order only
        torch.testing.assert_close(ours["w"], theirs[0], atol=2e-3, rtol=2e-2)
        torch.testing.assert_close(ours["m"], theirs[1], atol=1e-6, rtol=1e-5)
        # v averages squares of bf16 results; five Polar Express iterations (a up to 8.2) amplify the rounding
        # of two matmul orders to ~13% on the 6 rows of the 6 x 32 gate matrix, ~1% on the others
        torch.testing.assert_close(ours["v"], theirs[2], atol=0.15 * float(theirs[2].abs().max()), rtol=0)


def test_schedules_and_the_cautious_mask():
    assert momentum_at(0, 0.85, 0.95, 300) == 0.85 and momentum_at(150, 0.85, 0.95, 300) == pytest.approx(0.90)
    assert momentum_at(300, 0.85, 0.95, 300) == 0.95 and momentum_at(10_000, 0.85, 0.95, 300) == 0.95
    assert weight_decay_at(0, 100, 0.2) == 0.2 and weight_decay_at(50, 100, 0.2) == pytest.approx(0.1)
    assert weight_decay_at(100, 100, 0.2) == 0.0
    from pipeline.training.muon import cautious_update

    w = torch.tensor([[1.0, -1.0], [1.0, -1.0]])
    update = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # agrees with w at (0, 0) and (1, 1) only
    cautious_update(w, update, lr=0.1, weight_decay=0.5)
    assert torch.allclose(w, torch.tensor([[1 - 0.1 - 0.05, -1.1], [1.1, -1 + 0.1 + 0.05]]))
