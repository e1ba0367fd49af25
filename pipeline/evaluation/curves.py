"""Test-time loop scaling: fit L(T) = L_inf + k * exp(-z * T) to validation losses, and plot it.

The fit is least squares by variable projection: for a fixed rate z the model is linear in (L_inf, k),
so the residual is minimised over z alone (a log-spaced scan, then golden-section refinement) and
(L_inf, k) solved exactly for each z. Standard errors come from the Jacobian at the optimum,
cov = s^2 (J^T J)^-1 with s^2 = RSS / (n - 3); with three points there is no residual degree of
freedom and the uncertainties are reported as null.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

Z_RANGE = (1e-4, 20.0)  # rates outside this are indistinguishable from a line or a step at these T


@dataclass(frozen=True)
class CurveFit:
    l_inf: float
    k: float
    z: float
    l_inf_stderr: float | None
    k_stderr: float | None
    z_stderr: float | None
    rss: float
    rmse: float
    points: int
    z_at_bound: bool

    def predict(self, loops: np.ndarray | float) -> np.ndarray:
        return self.l_inf + self.k * np.exp(-self.z * np.asarray(loops, dtype=np.float64))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FitError(ValueError):
    pass


def _solve(t: np.ndarray, y: np.ndarray, z: float) -> tuple[float, float, float]:
    design = np.stack([np.ones_like(t), np.exp(-z * t)], axis=1)
    (l_inf, k), *_ = np.linalg.lstsq(design, y, rcond=None)
    rss = float(np.sum((design @ np.array([l_inf, k]) - y) ** 2))
    return float(l_inf), float(k), rss


def fit_loop_curve(loops: list[int] | np.ndarray, losses: list[float] | np.ndarray) -> CurveFit:
    """Least-squares fit of L(T) = L_inf + k exp(-z T); needs at least three distinct loop counts."""
    t = np.asarray(loops, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise FitError(f"loops and losses must be equal-length lists, got {t.shape} and {y.shape}")
    if not np.all(np.isfinite(y)):
        raise FitError(f"cannot fit non-finite losses {y.tolist()}")
    if len(np.unique(t)) < 3:
        counts = ", ".join(f"{x:g}" for x in sorted(set(t.tolist())))  # plain numbers, not np.float64(8.0)
        raise FitError(f"the curve has 3 parameters: needs losses at >= 3 distinct loop counts, got {counts}")
    lo, hi = math.log(Z_RANGE[0]), math.log(Z_RANGE[1])
    grid = np.linspace(lo, hi, 241)
    rss = np.array([_solve(t, y, math.exp(g))[2] for g in grid])
    best = int(np.argmin(rss))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):  # golden section on log z between the scan's neighbours
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if _solve(t, y, math.exp(c))[2] <= _solve(t, y, math.exp(d))[2]:
            b = d
        else:
            a = c
    log_z = (a + b) / 2
    if rss[best] < _solve(t, y, math.exp(log_z))[2]:
        log_z = grid[best]
    z = math.exp(log_z)
    l_inf, k, final_rss = _solve(t, y, z)
    n = len(t)
    errors: list[float | None] = [None, None, None]
    if n > 3:
        e = np.exp(-z * t)
        jac = np.stack([np.ones_like(t), e, -k * t * e], axis=1)
        try:
            cov = (final_rss / (n - 3)) * np.linalg.inv(jac.T @ jac)
            errors = [float(math.sqrt(v)) if v >= 0 else None for v in np.diag(cov)]
        except np.linalg.LinAlgError:
            pass
    edge = bool(min(abs(log_z - lo), abs(log_z - hi)) < 1e-3)
    return CurveFit(l_inf, k, z, *errors, final_rss, math.sqrt(final_rss / n), n, edge)


def plot_loop_curve(
    curves: dict[str, tuple[list[int], list[float], CurveFit | None]],
    title: str,
    path: str | Path | None = None,
    ylabel: str = "validation loss (nats/token)",
):
    """Loss (or a score) against loops (points and fitted curve) for one or more labelled runs; saves a PNG if ``path``.
    Returns the matplotlib figure (for TensorBoard's add_figure)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    many = len(curves) > 3
    fig, ax = plt.subplots(figsize=(9.0 if many else 6.4, 4.8 if many else 4.2), dpi=100)
    points = [v for loops, losses, _ in curves.values() for v in losses if np.isfinite(v)]
    for i, (label, (loops, losses, fit)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        marker = "os^vD"[(i // 10) % 5]
        if fit is not None:
            grid = np.linspace(min(loops), max(loops), 200)
            ax.plot(grid, fit.predict(grid), "-", color=color, alpha=0.7)
            if not many:
                label += f"; fit {fit.l_inf:.3f} + {fit.k:.3g}·exp(-{fit.z:.3g}T)" + (" (z at bound)" * fit.z_at_bound)
                ax.axhline(fit.l_inf, color=color, linestyle=":", alpha=0.6)
        ax.plot(loops, losses, marker, color=color, label=label)
    if points:  # the axis follows the measured points, not a fit that runs away between or beyond them
        low, high = min(points), max(points)
        pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.1
        ax.set_ylim(low - pad, high + pad)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops T (test time)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if not curves:  # a sweep none of whose runs has validated yet: say so, not an empty frame and a warning
        ax.text(0.5, 0.5, "no validation curve yet", ha="center", va="center", transform=ax.transAxes)
    elif many:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    return fig
