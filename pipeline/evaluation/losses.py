"""Validation loss at test-time loop counts: h_0 = 0 (the numbers are reproducible), or the reference's
like-init h_0 drawn from a seed (its protocol; averaged over several seeds by the callers).

`loss_sums` computes the summed token loss at every loop count for any forward (a DeepSpeed engine, a
plain model) over packed rows or (inputs, targets) batches (one document per row); the training loop's
periodic validation (`pipeline.training.validation`) and `parcae eval` (`pipeline.jobs.evaluate`) both
use it; `validation_metrics` turns the sums into what training logs, `report.py` into eval's table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from model import seeded_generator
from model.config import init_std
from pipeline.evaluation.curves import CurveFit, FitError, fit_loop_curve
from pipeline.evaluation.documents import IGNORE

Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # packed rows (b, L + 1), or (inputs, targets)


def loss_sums(
    forward: Callable[..., torch.Tensor],
    batches: Sequence[Batch],
    loop_counts: Sequence[int] | None,
    d_model: int,
    h0_seed: int | None = None,
) -> torch.Tensor:
    """(len(loop_counts), 2) float64: summed token loss and target-token count at each loop count
    (``loop_counts`` None: one row, for the non-looped baseline; ignored targets are not counted).

    h_0 is zeros, or with ``h0_seed`` the reference's like-init: a fresh truncated normal (std sigma, cut
    at 3 sigma) per batch, drawn from (h0_seed, batch), the same draw at every loop count."""
    sigma = init_std(d_model)
    rows = []
    for loops in loop_counts or [None]:
        total = torch.zeros(2, dtype=torch.float64)
        for index, batch in enumerate(batches):
            inputs, targets = batch if isinstance(batch, tuple) else (batch[:, :-1], batch[:, 1:])
            kwargs: dict[str, object] = {}
            if loops is not None:
                h0 = torch.zeros(*inputs.shape, d_model, device=inputs.device)
                if h0_seed is not None:
                    generator = seeded_generator("eval-h0", h0_seed, 0, index, 0, inputs.device)
                    torch.nn.init.trunc_normal_(h0, 0.0, sigma, -3 * sigma, 3 * sigma, generator=generator)
                kwargs = {"loops": loops, "h0": h0}
            loss = forward(inputs, targets, **kwargs)
            count = int((targets != IGNORE).sum())
            total += torch.tensor([float(loss) * count, count], dtype=torch.float64)
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


def seed_metrics(loop_counts: Sequence[int] | None, per_seed: Sequence[torch.Tensor]) -> dict[str, float]:
    """`validation_metrics` of the mean over h_0 seeds, and with several seeds each loop count's spread
    (``val_loss_loops_T_std``, the standard deviation over the seeds)."""
    metrics = validation_metrics(loop_counts, torch.stack([s[:, 0] / s[:, 1] for s in per_seed]).mean(0))
    if len(per_seed) > 1 and loop_counts is not None:
        spread = torch.stack([s[:, 0] / s[:, 1] for s in per_seed]).std(0).tolist()
        metrics.update({f"val_loss_loops_{t}_std": v for t, v in zip(loop_counts, spread, strict=True)})
    return metrics


def validation_metrics(loop_counts: Sequence[int] | None, means: torch.Tensor) -> dict[str, float]:
    """What training logs from the mean loss per loop count: ``val_loss`` (non-looped) or ``val_loss_loops_T``,
    and the fit's ``val_fit_l_inf/k/z`` when at least three loop counts gave finite losses."""
    means = means.tolist()
    if loop_counts is None:
        return {"val_loss": means[0]}
    results = {f"val_loss_loops_{loops}": mean for loops, mean in zip(loop_counts, means, strict=True)}
    if len(set(loop_counts)) >= 3 and all(math.isfinite(m) for m in means):
        fit, _ = try_fit(loop_counts, means)
        if fit is not None:
            results.update(val_fit_l_inf=fit.l_inf, val_fit_k=fit.k, val_fit_z=fit.z)
    return results
