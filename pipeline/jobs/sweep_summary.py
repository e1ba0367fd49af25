"""`parcae sweep summary`: each point's steps, losses, validation at the mean recurrence, largest spectral
radius, fitted L(T), and whether (and why) it diverged; ``summary.json``, a table, ``curves.png`` and
``training.png``. The summary is also the input of `parcae plan --from-sweep`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from data_prep.storage import write_text
from model.config import paper_flops_per_token
from pipeline.evaluation.curves import CurveFit, plot_loop_curve
from pipeline.evaluation.losses import try_fit
from pipeline.jobs.sweep_record import exit_code, metrics_records, read_points
from pipeline.jobspec import load_spec


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize_run(point: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(point["run_dir"])
    records = metrics_records(run_dir)
    code = exit_code(run_dir)
    spec_file = run_dir / "spec.yaml"
    spec = load_spec(spec_file).spec if spec_file.is_file() else None
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}  # a resumed run rewrites steps: last wins
    losses = [by_step[step] for step in sorted(by_step)]
    radii = [r["spectral_radius"] for r in records if _finite(r.get("spectral_radius"))]
    evals = [r for r in records if any(k.startswith("val_loss") for k in r)]
    loops_key = None
    if evals and spec is not None:
        available = sorted(int(k.rsplit("_", 1)[1]) for k in evals[-1] if k.startswith("val_loss_loops_"))
        if available:
            wanted = spec.model.mean_recurrence
            loops_key = f"val_loss_loops_{wanted if wanted in available else available[-1]}"
        elif "val_loss" in evals[-1]:
            loops_key = "val_loss"
    val = [r[loops_key] for r in evals if loops_key in r] if loops_key else []
    max_radius = max(radii) if radii else None
    reasons = []
    if any(not _finite(x) for x in losses + val) or any(r.get("nonfinite_skipped", 0) for r in records):
        reasons.append("non-finite loss")
    window = max(1, len(losses) // 10)
    start, end = losses[:window], losses[-window:]
    if start and all(_finite(x) for x in start + end) and sum(end) / len(end) > sum(start) / len(start):
        reasons.append("loss ended above where it started")
    if start and max((x for x in losses if _finite(x)), default=0) > 2 * sum(start) / len(start):
        reasons.append("loss spiked above twice its start")
    if max_radius is not None and max_radius >= 1.0 and not _is_add(spec):
        reasons.append("spectral radius >= 1")
    if code not in (None, 0):
        reasons.append(f"training exited with {code}")
    curve = None
    if evals:
        last = evals[-1]
        pts = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in last.items() if k.startswith("val_loss_loops_"))
        if len(pts) >= 3 and all(_finite(v) for _, v in pts):
            fit, _ = try_fit([p for p, _ in pts], [v for _, v in pts])
            curve = {"loops": [p for p, _ in pts], "losses": [v for _, v in pts], "fit": fit.to_dict() if fit else None}
    tokens = max((r.get("tokens_seen", 0) for r in records), default=0)
    flops = None
    if spec is not None and tokens:
        flops = paper_flops_per_token(spec.model.build(), spec.data.seq_len) * tokens  # the paper's convention
    return {
        "name": point["name"],
        "values": point["values"],
        "run_dir": str(run_dir),
        "exit_code": code,
        "steps": max(by_step, default=0),
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": val[-1] if val and _finite(val[-1]) else None,
        "best_val_loss": min((v for v in val if _finite(v)), default=None),
        "val_metric": loops_key,
        "max_spectral_radius": max_radius,
        "diverged": bool(reasons),
        "diverged_because": reasons,
        "curve": curve,
        "tokens": tokens or None,
        "flops": flops,
        "mean_recurrence": spec.model.mean_recurrence if spec is not None and spec.model.arch == "parcae" else None,
        "losses": [[step, v if _finite(v) else None] for step, v in sorted(by_step.items())],
    }


def _is_add(spec) -> bool:
    """u = h + e has spectral radius exactly 1 by construction: that alone is not a divergence."""
    return spec is not None and spec.model.arch == "parcae" and spec.model.injection == "add"


def summarize(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every point's summary, written to ``summary.json`` and plotted (``curves.png``, ``training.png``);
    also the grid's keys (the table's first columns)."""
    points = read_points(directory)
    runs = [summarize_run(p) for p in points]
    write_text(directory / "summary.json", json.dumps({"runs": runs}, indent=2) + "\n")
    _plot(directory, runs)
    return runs, list(points[0]["values"]) if points else []


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else (format(x, spec) if isinstance(x, float) else str(x))


def summary_table(runs: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The sweep's runs as a table: the grid's values, steps, losses, the largest spectral radius, the fitted
    L_inf and whether (and why) a run diverged; one line each, after the header."""
    header = [
        *(k.split(".")[-1] for k in keys),
        "steps",
        "final loss",
        "final val",
        "best val",
        "max radius",
        "L_inf (fit)",
        "diverged",
    ]
    rows = []
    for r in runs:
        fit = (r["curve"] or {}).get("fit")
        rows.append(
            [
                *(_fmt(r["values"].get(k), "g") for k in keys),
                str(r["steps"]),
                _fmt(r["final_loss"]),
                _fmt(r["final_val_loss"]),
                _fmt(r["best_val_loss"]),
                _fmt(r["max_spectral_radius"], ".5f"),
                _fmt(fit["l_inf"]) if fit else "-",
                "; ".join(r["diverged_because"]) or "no",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    return lines + ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]


def _plot(directory: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    curves = {
        r["name"]: (
            r["curve"]["loops"],
            r["curve"]["losses"],
            CurveFit(**r["curve"]["fit"]) if r["curve"]["fit"] else None,
        )
        for r in runs
        if r["curve"]
    }
    plt.close(
        plot_loop_curve(curves, f"{directory.name}: validation loss vs test-time loops", directory / "curves.png")
    )
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, r in enumerate(runs):
        finite = [(step, v) for step, v in r["losses"] if _finite(v)]
        if finite:
            ax.plot(
                *zip(*finite, strict=True),
                color=f"C{i % 10}",
                linestyle="--" if r["diverged"] else "-",
                label=r["name"] + (" (diverged)" if r["diverged"] else ""),
            )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{directory.name}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(directory / "training.png", format="png")
    plt.close(fig)
