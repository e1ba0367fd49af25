"""`parcae plan`: compute-optimal mean recurrence and token budget for a compute budget, from power laws.

The paper reports (docs/parcae.md, "What the paper reports", marked unverified there) that at the training-time
compute optimum the mean recurrence grows as C^0.40 and the tokens as C^0.78. Power laws need an
anchor: by default the job spec itself (its mean recurrence and token budget at its own compute, taken
to be a good point), or an explicit ``--anchor-flops/--anchor-recurrence/--anchor-tokens``. Then

    recurrence(C) = R0 (C / C0)^a,    tokens(C) = D0 (C / C0)^b,    a = 0.40, b = 0.78 by default,

so doubling C multiplies the recurrence by 2^a and the tokens by 2^b exactly. The plan also reports
the steps at the spec's batch, the FLOPs the rounded plan really costs with the model's
FLOPs-per-token formula (the paper's convention, `model.config.paper_flops_per_token`; the two laws
need not agree with it: a + b is not 1), and the wall clock at
a peak FLOP/s per device, an MFU and the spec's device count. ``--from-sweep`` refits a and b from a
finished sweep's summary (the best run per compute budget, least squares in log-log).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from model.config import paper_flops_per_token
from parcae_errors import ParcaeError, UsageError
from pipeline.jobspec import JobSpec

LOOPS_EXPONENT = 0.40  # the paper's fit for the optimal mean recurrence (docs/parcae.md, "What the paper reports")
TOKENS_EXPONENT = 0.78  # the paper's fit for the optimal token budget
DEFAULT_PEAK = 989e12  # H100 SXM dense bf16 FLOP/s, as logging.peak_flops_per_device defaults on GPU
DEFAULT_MFU = 0.4


def check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ParcaeError(f"{name}: must be a positive finite number, got {value}")


def plan(
    spec: JobSpec,
    flops: float,
    anchor: tuple[float, float, float] | None = None,
    loops_exponent: float = LOOPS_EXPONENT,
    tokens_exponent: float = TOKENS_EXPONENT,
    peak_flops: float = DEFAULT_PEAK,
    mfu: float = DEFAULT_MFU,
    backprop_depth: int | None = None,
) -> dict[str, Any]:
    """The plan for ``flops`` of training compute (the paper's FLOP convention); ``anchor`` = (C0, R0, D0),
    default from the spec; the backprop depth is ``backprop_depth`` or the reference's sweeps' (R + 1) // 2."""
    cfg = spec.model.build()
    if not cfg.looped:
        raise ParcaeError("model.arch: gpt has no recurrence to plan; plan a Parcae spec (model.arch: parcae)")
    check_positive("--flops", flops)
    check_positive("--peak-flops", peak_flops)
    check_positive("--loops-exponent", loops_exponent)
    check_positive("--tokens-exponent", tokens_exponent)
    if not 0 < mfu <= 1:
        raise UsageError(f"--mfu: a fraction in (0, 1], got {mfu}")
    seq_len = spec.data.seq_len
    if anchor is None:
        tokens0 = float(spec.total_steps * spec.tokens_per_step)
        anchor = (paper_flops_per_token(cfg, seq_len) * tokens0, float(cfg.mean_recurrence), tokens0)
        anchor_source = "the spec (its mean recurrence and token budget)"
    else:
        anchor_source = "--anchor-*"
    c0, r0, d0 = anchor
    for name, value in zip(("anchor flops", "anchor recurrence", "anchor tokens"), anchor, strict=True):
        check_positive(name, value)
    scale = flops / c0
    recurrence = r0 * scale**loops_exponent
    tokens = d0 * scale**tokens_exponent
    rounded = max(1, round(recurrence))
    depth = depth_for(rounded, backprop_depth)
    steps = max(1, math.ceil(tokens / spec.tokens_per_step))
    planned_tokens = steps * spec.tokens_per_step
    fpt = paper_flops_per_token(cfg, seq_len, mean_recurrence=rounded, mean_backprop_depth=depth)
    cost = fpt * planned_tokens
    devices = spec.world_size
    return {
        "budget_flops": flops,
        "anchor": {"flops": c0, "mean_recurrence": r0, "tokens": d0, "from": anchor_source},
        "exponents": {"mean_recurrence": loops_exponent, "tokens": tokens_exponent},
        "mean_recurrence": recurrence,
        "mean_recurrence_rounded": rounded,
        "mean_backprop_depth": depth,
        "tokens": tokens,
        "steps": steps,
        "tokens_per_step": spec.tokens_per_step,
        "flops_per_token": fpt,
        "plan_flops": cost,
        "plan_flops_over_budget": cost / flops,
        "devices": devices,
        "peak_flops_per_device": peak_flops,
        "mfu": mfu,
        "wall_clock_hours": cost / (devices * peak_flops * mfu) / 3600,
        "overrides": [
            f"model.mean_recurrence={rounded}",
            f"model.mean_backprop_depth={depth}",
            f"training.total_steps={steps}",
        ],
    }


def depth_for(mean_recurrence: int, backprop_depth: int | None = None) -> int:
    """The backprop depth at a mean recurrence: the one given (capped at the recurrence), else the
    reference's isoFLOP sweeps' rule, (R + 1) // 2."""
    if backprop_depth is not None:
        check_positive("--backprop-depth", backprop_depth)
        return min(backprop_depth, mean_recurrence)
    return (mean_recurrence + 1) // 2


def isoflop_points(
    spec: JobSpec, flops: float, recurrences: list[int], backprop_depth: int | None = None
) -> list[dict[str, Any]]:
    """Sweep points spending ``flops`` each: for every mean recurrence, the steps that budget buys.
    Written as `parcae sweep run --points` input (an isoFLOP design); `--from-sweep` refits from it."""
    cfg = spec.model.build()
    if not cfg.looped:
        raise ParcaeError("model.arch: gpt has no recurrence to sweep; use a Parcae spec (model.arch: parcae)")
    check_positive("--flops", flops)
    if not recurrences or min(recurrences) < 1:
        raise UsageError(f"--isoflop: mean recurrences must be integers >= 1, got {recurrences}")
    points = []
    for r in sorted(set(recurrences)):
        depth = depth_for(r, backprop_depth)
        fpt = paper_flops_per_token(cfg, spec.data.seq_len, mean_recurrence=r, mean_backprop_depth=depth)
        steps = max(1, round(flops / fpt / spec.tokens_per_step))
        points.append(
            {
                "name": f"C{flops:.2g}-r{r}".replace("+", ""),
                "model.mean_recurrence": r,
                "model.mean_backprop_depth": depth,
                "training.total_steps": steps,
            }
        )
    return points


def refit(summary_path: str | Path) -> dict[str, Any]:
    """Exponents from a sweep summary: per compute budget (runs within 5% of each other) the run with
    the lowest final validation loss; log R and log D regressed on log C."""
    path = Path(summary_path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise ParcaeError(f"{path}: no sweep summary; run `parcae sweep summary DIR` first")
    runs = [r for r in json.loads(path.read_text())["runs"] if r.get("final_val_loss") is not None]
    usable = [r for r in runs if r.get("flops") and r.get("mean_recurrence") and r.get("tokens") and not r["diverged"]]
    groups: list[list[dict[str, Any]]] = []
    for run in sorted(usable, key=lambda r: r["flops"]):
        if groups and run["flops"] <= groups[-1][0]["flops"] * 1.05:
            groups[-1].append(run)
        else:
            groups.append([run])
    best = [min(g, key=lambda r: r["final_val_loss"]) for g in groups]
    if len(best) < 2:
        raise ParcaeError(
            f"{path}: the refit needs finished runs at >= 2 compute budgets (isoFLOP groups), found {len(best)}"
        )
    log_c = np.log([r["flops"] for r in best])
    fits = {}
    for key in ("mean_recurrence", "tokens"):
        slope, intercept = np.polyfit(log_c, np.log([r[key] for r in best]), 1)
        fits[key] = {"exponent": float(slope), "coefficient": float(math.exp(intercept))}
    return {
        "summary": str(path),
        "optima": [{k: r[k] for k in ("name", "flops", "mean_recurrence", "tokens", "final_val_loss")} for r in best],
        "fits": fits,
    }
