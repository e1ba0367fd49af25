"""Validation loss at test-time loop counts, with h_0 = 0 so the numbers are reproducible.

`loss_sums` computes the summed token loss at every loop count for any forward (a DeepSpeed engine, a
plain model); the training loop's periodic validation (`pipeline.training.validation`) and `parcae
eval` (`pipeline.jobs.evaluate`) both use it, and `loop_results` turns the sums into the mean loss
per loop count and the fitted L(T) that both report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from pipeline.evaluation.curves import CurveFit, FitError, fit_loop_curve


def loss_sums(
    forward: Callable[..., torch.Tensor],
    batches: Sequence[torch.Tensor],
    loop_counts: Sequence[int] | None,
    d_model: int,
) -> torch.Tensor:
    """(len(loop_counts), 2) float64: summed token loss and target-token count at each loop count
    (``loop_counts`` None: one row, for the non-looped baseline). h_0 is zeros."""
    rows = []
    for loops in loop_counts or [None]:
        total = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            inputs, targets = batch[:, :-1], batch[:, 1:]
            kwargs = {}
            if loops is not None:
                kwargs = {"loops": loops, "h0": torch.zeros(*inputs.shape, d_model, device=batch.device)}
            loss = forward(inputs, targets, **kwargs)
            total += torch.tensor([float(loss) * targets.numel(), targets.numel()], dtype=torch.float64)
        rows.append(total)
    return torch.stack(rows)


def mean_losses(sums: torch.Tensor) -> list[float]:
    return (sums[:, 0] / sums[:, 1]).tolist()


def try_fit(loop_counts: Sequence[int], losses: Sequence[float]) -> tuple[CurveFit | None, str | None]:
    """The fitted L(T), or why there is none (fewer than three loop counts, non-finite losses)."""
    try:
        return fit_loop_curve(list(loop_counts), list(losses)), None
    except FitError as exc:
        return None, str(exc)


def validation_metrics(loop_counts: Sequence[int] | None, sums: torch.Tensor) -> dict[str, float]:
    """What training logs: ``val_loss`` (non-looped) or ``val_loss_loops_T`` per loop count, and the fit's
    ``val_fit_l_inf/k/z`` when at least three loop counts gave finite losses."""
    means = mean_losses(sums)
    if loop_counts is None:
        return {"val_loss": means[0]}
    results = {f"val_loss_loops_{loops}": mean for loops, mean in zip(loop_counts, means, strict=True)}
    if len(set(loop_counts)) >= 3 and all(math.isfinite(m) for m in means):
        fit, _ = try_fit(loop_counts, means)
        if fit is not None:
            results.update(val_fit_l_inf=fit.l_inf, val_fit_k=fit.k, val_fit_z=fit.z)
    return results
