"""Per-sequence depth sampling as the brief's recipe."""

from __future__ import annotations

import pytest
import torch

from model import loop_generator, sample_loop_counts
from model.sampling import expected_loop_counts


def test_distribution_and_truncation():
    n_nograd, n_grad = sample_loop_counts(200_000, 8, 4, loop_generator(0, 0, 0, 0))
    total = n_nograd + n_grad
    assert total.min() >= 1 and n_grad.max() <= 4 and n_nograd.min() >= 0
    assert abs(total.float().mean().item() - 8.0) < 0.03  # max(1, Poisson(8)) has mean 8.0003
    assert torch.equal(n_grad, total.clamp(max=4))
    # the largest of 8 draws of Poisson(8) is about 12 (the reason to skip finished rows)
    largest = torch.stack([sample_loop_counts(8, 8, 4, loop_generator(1, 0, s, 0))[0] for s in range(2000)])
    assert 11.0 < (largest.max(1).values + 4).float().mean().item() < 13.0


def test_reproducible_and_different_per_rank_step_and_micro_step():
    draw = lambda *key: torch.cat(sample_loop_counts(64, 8, 4, loop_generator(*key)))  # noqa: E731
    assert torch.equal(draw(7, 0, 3, 1), draw(7, 0, 3, 1))
    base = draw(7, 0, 3, 1)
    for other in [(8, 0, 3, 1), (7, 1, 3, 1), (7, 0, 4, 1), (7, 0, 3, 0)]:
        assert not torch.equal(base, draw(*other)), other


def test_mean_one_and_depth_one():
    n_nograd, n_grad = sample_loop_counts(1000, 1, 1, loop_generator(0, 0, 0, 0))
    assert (n_grad == 1).all() and (n_nograd >= 0).all()


@pytest.mark.parametrize(("mean", "depth"), [(8, 4), (4, 2), (3, 3), (2, 1)])
def test_expected_loop_counts_are_what_the_sampler_averages(mean, depth):
    """MFU's FLOPs per token use them: the configured depth overstates the backpropagated loops."""
    n_nograd, n_grad = sample_loop_counts(400_000, mean, depth, loop_generator(0, 0, 0, 0))
    total, grad = expected_loop_counts(mean, depth)
    assert (n_nograd + n_grad).double().mean().item() == pytest.approx(total, abs=0.01)
    assert n_grad.double().mean().item() == pytest.approx(grad, abs=0.005)
    assert grad <= depth and (grad < depth) == (depth > 1)
