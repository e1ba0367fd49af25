"""What `parcae eval` reports: per loop count the loss, perplexity and bits per byte, the fitted L(T);
as a table, and as TensorBoard scalars and the plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.evaluation.dashboard import LAYOUT
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


def seed_results(loop_counts: Sequence[int] | None, per_seed: list[torch.Tensor], n_bytes: int) -> list[dict[str, Any]]:
    """`loop_results` averaged over h_0 seeds (the paper's protocol), with each value's spread (standard
    deviation over the seeds) and the per-seed losses; one seed gives the plain results."""
    runs = [loop_results(loop_counts, sums, n_bytes) for sums in per_seed]
    if len(runs) == 1:
        return runs[0]
    merged = []
    for rows in zip(*runs, strict=True):
        losses = [r["loss"] for r in rows]
        bits = [r["bits_per_byte"] for r in rows]
        loss = statistics.fmean(losses)
        merged.append(
            {
                "loops": rows[0]["loops"],
                "loss": loss,
                "loss_std": statistics.stdev(losses),
                "perplexity": math.exp(loss) if loss < 700 else math.inf,
                "bits_per_byte": statistics.fmean(bits),
                "bits_per_byte_std": statistics.stdev(bits),
                "loss_per_seed": losses,
            }
        )
    return merged


def fit_results(results: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """The fitted L(T) as a dict, or why there is none (None, None for the non-looped baseline)."""
    if results[0]["loops"] is None:
        return None, None
    fit, error = try_fit([r["loops"] for r in results], [r["loss"] for r in results])
    return (fit.to_dict() if fit else None), error


def print_table(report: dict[str, Any]) -> None:
    protocol = report.get("protocol", {"name": "pipeline", "h0": "zeros", "rows": "the packed token stream"})
    print(
        f"{report['label']}: {report['rows']} rows, {report['tokens']} target tokens, {report['bytes']} bytes; "
        f"protocol {protocol['name']}: h0 {protocol['h0']}, rows {protocol['rows']}"
    )
    spread = "loss_std" in report["results"][0]
    print(f"  {'loops':>5}  {'loss':>8}  {'ppl':>10}  {'bits/byte':>9}" + ("  (± over h0 seeds)" if spread else ""))
    for r in report["results"]:
        loops = "-" if r["loops"] is None else r["loops"]
        line = f"  {loops:>5}  {r['loss']:8.4f}  {r['perplexity']:10.3f}  {r['bits_per_byte']:9.4f}"
        if spread:
            line += f"  ± {r['loss_std']:.4f} nats, ± {r['bits_per_byte_std']:.4f} bits/byte"
        print(line)
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
    ``eval_curve_step_S/loss_vs_loops``, and the plot as an image (``eval_paper/...`` for the paper's
    protocol, with the spread over h_0 seeds as ``loss_std_loops_T``)."""
    from torch.utils.tensorboard import SummaryWriter

    group = "eval" if report.get("protocol", {}).get("name", "pipeline") == "pipeline" else "eval_paper"
    writer = SummaryWriter(log_dir=directory)
    try:
        writer.add_custom_scalars(LAYOUT)  # the run's dashboards, also where only `parcae eval` wrote
        for r in report["results"]:
            suffix = "" if r["loops"] is None else f"_loops_{r['loops']}"
            for key in ("loss", "perplexity", "bits_per_byte", "loss_std"):
                if key in r:
                    writer.add_scalar(f"{group}/{key}{suffix}", r[key], step)
            if r["loops"] is not None:
                writer.add_scalar(f"{group}_curve_step_{step}/loss_vs_loops", r["loss"], r["loops"])
        if report["fit"]:
            for key in ("l_inf", "k", "z"):
                writer.add_scalar(f"{group}/fit_{key}", report["fit"][key], step)
        if figure is not None:
            writer.add_figure(f"{group}/loss_vs_loops", figure, step)
    finally:
        writer.close()


def write_downstream_tensorboard(directory: str, step: int, report: dict[str, Any], figure: Any) -> None:
    """``downstream/{core,core_extended}_loops_T`` (with ``_std`` over few-shot seeds), each task's
    ``downstream/centered/<task>_loops_T``, the curve against T as ``downstream_curve_step_S/core_vs_loops``,
    and the plot as an image."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=directory)
    try:
        for name, value in downstream_scalars(report["results"]).items():
            writer.add_scalar(name, value, step)
        for r in report["results"]:
            if r["loops"] is not None:
                for name in report["aggregates"]:
                    writer.add_scalar(f"downstream_curve_step_{step}/{name}_vs_loops", r[name], r["loops"])
        for name, fit in report["fit"].items():
            if fit:
                for key in ("l_inf", "k", "z"):
                    writer.add_scalar(f"downstream/{name}_fit_{key}", fit[key], step)
        if figure is not None:
            writer.add_figure("downstream/core_vs_loops", figure, step)
    finally:
        writer.close()


def downstream_scalars(results: list[dict[str, Any]]) -> dict[str, float]:
    """The scalars of downstream results, as training and `parcae eval` log them."""
    scalars = {}
    for r in results:
        suffix = "" if r["loops"] is None else f"_loops_{r['loops']}"
        for key in ("core", "core_std", "core_extended", "core_extended_std"):
            if key in r:
                scalars[f"downstream/{key}{suffix}"] = r[key]
        for label, task in r["tasks"].items():
            scalars[f"downstream/centered/{label}{suffix}"] = task["centered"]
    return scalars
