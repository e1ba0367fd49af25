"""`parcae sweep`: one job spec expanded over a grid into validated runs, run here one after another or
submitted as one Slurm job array; `parcae sweep summary` gathers their results into a table and plots.

    parcae sweep run SPEC --grid optimizer.lr=1e-3,3e-3 --grid model.injection=diagonal,add [--name N]
    parcae sweep run SPEC --points points.yaml        # explicit points, e.g. an isoFLOP design
    parcae sweep run SPEC ... --submit [--dry-run]    # one Slurm job array, a task per point
    parcae sweep summary runs/sweeps/N

Layout: ``DIR/sweep.json`` lists the points (name, overrides, run_dir); every point is a normal run
directory ``DIR/<point>`` (spec.yaml, metrics.jsonl, checkpoints, tensorboard), so `parcae eval`,
`status` and `tb` work on each. Every point is validated before anything runs. Run locally, each
point is its own `parcae train` process (log in ``DIR/<point>/train.log``); a failed point is
recorded and the sweep goes on; running the sweep again skips finished points and resumes the others
from their checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ParcaeError, SpecError
from pipeline.spec_io import load_spec

SWEEP_FILE = "sweep.json"
STATUS_FILE = "sweep-status.json"


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ParcaeError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. optimizer.lr=1e-3,3e-3)")
        parsed = [yaml.safe_load(v) for v in values.split(",")]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ParcaeError(f"--grid {item!r}: a value is repeated")
        if any(k == key for k, _ in grid):
            raise ParcaeError(f"--grid {key}: given twice; put every value in one --grid")
        grid.append((key, parsed))
    return grid


def _short(key: str, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    joint = "" if text[:1].isdigit() or text[:1] == "-" else "-"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{key.split('.')[-1]}{joint}{text}")


def expand(grid: list[tuple[str, list[Any]]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grid product times explicit points; each point: {"name", "values": {key: value}}."""
    combos = [
        dict(zip([k for k, _ in grid], values, strict=True)) for values in itertools.product(*[v for _, v in grid])
    ]
    extra = points or [{}]
    out, seen = [], set()
    for combo in combos:
        for point in extra:
            values = {**combo, **{k: v for k, v in point.items() if k != "name"}}
            name = point.get("name") or "_".join(_short(k, v) for k, v in values.items()) or "base"
            if combo and point.get("name"):
                name = "_".join([*(_short(k, v) for k, v in combo.items()), point["name"]])
            if name in seen:
                raise ParcaeError(f"sweep point {name!r} appears twice; give the points distinct names or values")
            seen.add(name)
            out.append({"name": name, "values": values})
    return out


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()]


def plan_sweep(args: argparse.Namespace) -> tuple[Path, list[dict[str, Any]]]:
    grid = parse_grid(args.grid)
    points: list[dict[str, Any]] = []
    if args.points:
        path = Path(args.points)
        if not path.is_file():
            raise ParcaeError(f"--points {path}: no such file")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, list) or not all(isinstance(p, dict) and p for p in data):
            raise ParcaeError(f"{path}: expected a YAML list of mappings, e.g. - {{name: small, model.d_model: 256}}")
        points = data
    if not grid and not points:
        raise ParcaeError("a sweep needs --grid KEY=V1,V2,... and/or --points FILE")
    base = load_spec(args.spec, args.overrides).spec
    name = args.name or base.name + "-sweep"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ParcaeError(f"--name {name!r}: use letters, digits and . _ -")
    directory = Path(args.dir or f"runs/sweeps/{name}").resolve()
    expanded = expand(grid, points)
    problems, planned = [], []
    for point in expanded:
        run_dir = directory / point["name"]
        overrides = [
            *args.overrides,
            *_overrides(point["values"]),
            f"name={name}-{point['name']}",
            f"run_dir={run_dir}",
        ]
        try:
            loaded = load_spec(args.spec, overrides)
        except SpecError as exc:
            problems.append(f"point {point['name']}:\n{exc}")
            continue
        planned.append({**point, "overrides": overrides, "run_dir": str(run_dir), "loaded": loaded})
    if problems:
        raise ParcaeError(f"{len(problems)} of {len(expanded)} sweep points are invalid:\n" + "\n".join(problems))
    return directory, planned


def _write_record(directory: Path, spec: str, points: list[dict[str, Any]]) -> None:
    record = {
        "spec": str(Path(spec).resolve()),
        "points": [{k: p[k] for k in ("name", "values", "overrides", "run_dir")} for p in points],
    }
    (directory / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")


def run_sweep(args: argparse.Namespace) -> int:
    directory, points = plan_sweep(args)
    print(f"sweep {directory.name}: {len(points)} points in {directory}")
    for point in points:
        print(f"  {point['name']:<40} {' '.join(_overrides(point['values']))}")
    if args.submit:
        return _submit(args, directory, points)
    if args.dry_run:
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    _write_record(directory, args.spec, points)
    failed = []
    for i, point in enumerate(points, 1):
        run_dir = Path(point["run_dir"])
        status = run_dir / STATUS_FILE
        if status.is_file() and json.loads(status.read_text()).get("exit_code") == 0:
            print(f"[{i}/{len(points)}] {point['name']}: finished before, skipped")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{i}/{len(points)}] {point['name']}: training (log {run_dir / 'train.log'})", flush=True)
        cmd = [sys.executable, "-m", "pipeline", "train", args.spec, *[f"--set={o}" for o in point["overrides"]]]
        with (run_dir / "train.log").open("a") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
        status.write_text(json.dumps({"exit_code": code}) + "\n")
        if code != 0:
            failed.append(point["name"])
            tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or [""]
            print(f"    exit {code}: {tail[0][:200]}")
    print(
        f"done: {len(points) - len(failed)} finished, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}"
    )
    print(f"summary: parcae sweep summary {directory}")
    return 0


def _submit(args: argparse.Namespace, directory: Path, points: list[dict[str, Any]]) -> int:
    from pipeline.slurm import _run, check_against_cluster, render

    clusters = {json.dumps(p["loaded"].spec.cluster.model_dump(), sort_keys=True) for p in points}
    if len(clusters) > 1:
        raise ParcaeError("--submit: one job array has one cluster section; the grid must not vary cluster.*")
    first = points[0]["loaded"]
    script = render(first, directory, output=f"{directory}/slurm/%A_%a.out")
    if args.dry_run:
        print(script, end="")
        return 0
    check_against_cluster(first.spec.cluster)
    (directory / "slurm").mkdir(parents=True, exist_ok=True)
    _write_record(directory, args.spec, points)
    for point in points:  # every task reads its own resolved spec, as `parcae submit` writes it
        Path(point["run_dir"]).mkdir(parents=True, exist_ok=True)
        point["loaded"].save(Path(point["run_dir"]) / "spec.yaml")
    path = directory / "slurm" / "job.sbatch"
    path.write_text(script)
    job = _run(["sbatch", "--parsable", f"--array=0-{len(points) - 1}", str(path)]).strip().split(";")[0]
    with (directory / "slurm" / "jobs.txt").open("a") as f:
        f.write(job + "\n")
    print(f"submitted job array {job} ({len(points)} tasks): {path}")
    print(job)
    return 0


def point_run_dir(directory: Path, task: int) -> Path:
    """The run directory of array task ``task`` of the sweep in ``directory``."""
    points = json.loads((directory / SWEEP_FILE).read_text())["points"]
    if not 0 <= task < len(points):
        raise ParcaeError(f"{directory}: array task {task} but the sweep has {len(points)} points")
    return Path(points[task]["run_dir"])


# ------------------------------------------------------------------------------------------------
# summary
def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize_run(point: dict[str, Any]) -> dict[str, Any]:
    from model.config import flops_per_token
    from pipeline.curves import FitError, fit_loop_curve

    run_dir = Path(point["run_dir"])
    records = _records(run_dir)
    status_file = run_dir / STATUS_FILE
    exit_code = json.loads(status_file.read_text()).get("exit_code") if status_file.is_file() else None
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
    if exit_code not in (None, 0):
        reasons.append(f"training exited with {exit_code}")
    curve = None
    if evals:
        last = evals[-1]
        pts = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in last.items() if k.startswith("val_loss_loops_"))
        if len(pts) >= 3 and all(_finite(v) for _, v in pts):
            try:
                fit = fit_loop_curve([p for p, _ in pts], [v for _, v in pts])
                curve = {"loops": [p for p, _ in pts], "losses": [v for _, v in pts], "fit": fit.to_dict()}
            except FitError:
                curve = {"loops": [p for p, _ in pts], "losses": [v for _, v in pts], "fit": None}
    tokens = max((r.get("tokens_seen", 0) for r in records), default=0)
    flops = None
    if spec is not None and tokens:
        flops = flops_per_token(spec.model.build(), spec.data.seq_len) * tokens
    return {
        "name": point["name"],
        "values": point["values"],
        "run_dir": str(run_dir),
        "exit_code": exit_code,
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


def summarize(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    sweep_file = directory / SWEEP_FILE
    if not sweep_file.is_file():
        raise ParcaeError(f"{directory}: not a sweep directory ({SWEEP_FILE} missing); `parcae sweep run` writes it")
    points = json.loads(sweep_file.read_text())["points"]
    runs = [summarize_run(p) for p in points]
    (directory / "summary.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    keys = list(points[0]["values"]) if points else []
    _print_summary(runs, keys)
    _plot(directory, runs)
    print(f"wrote {directory / 'summary.json'}, {directory / 'curves.png'}, {directory / 'training.png'}")
    return 0


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else (format(x, spec) if isinstance(x, float) else str(x))


def _print_summary(runs: list[dict[str, Any]], keys: list[str]) -> None:
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
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _plot(directory: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from pipeline.curves import CurveFit, plot_loop_curve

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
