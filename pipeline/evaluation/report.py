"""What `parcae eval` reports: per loop count the loss, perplexity and bits per byte, the fitted L(T);
as a table, and as TensorBoard scalars and the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.evaluation.losses import mean_losses, try_fit


def loop_results(loop_counts: Sequence[int] | None, sums: torch.Tensor, n_bytes: int) -> list[dict[str, Any]]:
    """One row per loop count (``loops`` None for the non-looped baseline): loss in nats per target
    token, perplexity, and bits per byte = summed loss / ln 2 / bytes."""
    results = []
    for i, (loops, loss) in enumerate(zip(loop_counts or [None], mean_losses(sums), strict=True)):
        results.append(
            {
                "loops": loops,
                "loss": loss,
                "perplexity": math.exp(loss) if loss < 700 else math.inf,
                "bits_per_byte": float(sums[i, 0]) / math.log(2) / n_bytes,
            }
        )
    return results


def fit_results(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """The fitted L(T) as a dict, or why there is none (None, None for the non-looped baseline)."""
    if results[0]["loops"] is None:
        return None, None
    fit, error = try_fit([r["loops"] for r in results], [r["loss"] for r in results])
    return (fit.to_dict() if fit else None), error


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['label']}: {report['rows']} rows, {report['tokens']} target tokens, {report['bytes']} bytes, h0 = 0"
    )
    print(f"  {'loops':>5}  {'loss':>8}  {'ppl':>10}  {'bits/byte':>9}")
    for r in report["results"]:
        loops = "-" if r["loops"] is None else r["loops"]
        print(f"  {loops:>5}  {r['loss']:8.4f}  {r['perplexity']:10.3f}  {r['bits_per_byte']:9.4f}")
    fit = report["fit"]
    if fit:

        def pm(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3g}"

        print(
            f"  fit L(T) = L_inf + k exp(-z T): L_inf {fit['l_inf']:.4f} ± {pm(fit['l_inf_stderr'])}, "
            f"k {fit['k']:.4f} ± {pm(fit['k_stderr'])}, z {fit['z']:.4f} ± {pm(fit['z_stderr'])}, "
            f"rmse {fit['rmse']:.2e}" + (" (z at the edge of its search range)" if fit["z_at_bound"] else "")
        )
    elif report["fit_error"]:
        print(f"  no fit: {report['fit_error']}")


def write_tensorboard(directory: str, step: int, report: dict[str, Any], figure: Any) -> None:
    """``eval/{loss,perplexity,bits_per_byte}_loops_T``, ``eval/fit_*``, the curve against T as
    ``eval_curve_step_S/loss_vs_loops``, and the plot as an image."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=directory)
    try:
        for r in report["results"]:
            suffix = "" if r["loops"] is None else f"_loops_{r['loops']}"
            for key in ("loss", "perplexity", "bits_per_byte"):
                writer.add_scalar(f"eval/{key}{suffix}", r[key], step)
            if r["loops"] is not None:
                writer.add_scalar(f"eval_curve_step_{step}/loss_vs_loops", r["loss"], r["loops"])
        if report["fit"]:
            for key in ("l_inf", "k", "z"):
                writer.add_scalar(f"eval/fit_{key}", report["fit"][key], step)
        if figure is not None:
            writer.add_figure("eval/loss_vs_loops", figure, step)
    finally:
        writer.close()
