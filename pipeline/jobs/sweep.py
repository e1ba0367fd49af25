"""`parcae sweep run`: one job spec expanded over a grid (and/or explicit points) into validated runs, run
here one after another or submitted as one Slurm job array.

Every point is validated before anything runs and becomes a normal run directory ``DIR/<point>``
(`pipeline.jobs.sweep_record` describes the directory), so `parcae eval`, `status` and `tb` work on
each. Run locally, each point is its own `parcae train` process (log in ``DIR/<point>/train.log``); a
failed point is recorded and the sweep goes on; running the sweep again skips finished points and
resumes the others from their checkpoints. `pipeline.jobs.sweep_summary` reads the results.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from data_prep.storage import make_dir, write_text
from parcae_errors import ParcaeError, UsageError
from pipeline.jobs import slurm
from pipeline.jobs.sweep_record import exit_code, write_exit_code, write_record
from pipeline.jobspec import SpecError, load_spec
from pipeline.jobspec.load import YamlProblem, load_yaml


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. optimizer.lr=1e-3,3e-3)")
        parsed = [yaml.safe_load(v) for v in values.split(",")]
        if len(set(map(repr, parsed))) != len(parsed):
            raise UsageError(f"--grid {item!r}: a value is repeated")
        if any(k == key for k, _ in grid):
            raise UsageError(f"--grid {key}: given twice; put every value in one --grid")
        grid.append((key, parsed))
    return grid


def read_points_file(path: str) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise ParcaeError(f"--points {file}: no such file")
    try:
        data = load_yaml(file.read_bytes(), str(file))
    except YamlProblem as exc:
        raise ParcaeError(f"--points {file}: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(p, dict) and p for p in data):
        raise ParcaeError(f"{file}: expected a YAML list of mappings, e.g. - {{name: small, model.d_model: 256}}")
    return data


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


def as_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()]


def plan_sweep(
    spec_path: str,
    overrides: list[str],
    grid: list[tuple[str, list[Any]]],
    points: list[dict[str, Any]],
    name: str | None = None,
    directory: str | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """The sweep directory and its points, each with its overrides, run_dir and validated spec
    (``loaded``); every invalid point is reported at once and nothing is written."""
    if not grid and not points:
        raise ParcaeError("a sweep needs --grid KEY=V1,V2,... and/or --points FILE")
    base = load_spec(spec_path, overrides).spec
    name = name or base.name + "-sweep"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UsageError(f"--name {name!r}: use letters, digits and . _ -")
    root = Path(directory or f"runs/sweeps/{name}").resolve()
    expanded = expand(grid, points)
    problems, planned = [], []
    for point in expanded:
        run_dir = root / point["name"]
        point_overrides = [
            *overrides,
            *as_overrides(point["values"]),
            f"name={name}-{point['name']}",
            f"run_dir={run_dir}",
        ]
        try:
            loaded = load_spec(spec_path, point_overrides)
        except SpecError as exc:
            problems.append(f"point {point['name']}:\n{exc}")
            continue
        planned.append({**point, "overrides": point_overrides, "run_dir": str(run_dir), "loaded": loaded})
    if problems:
        raise ParcaeError(f"{len(problems)} of {len(expanded)} sweep points are invalid:\n" + "\n".join(problems))
    return root, planned


def run_locally(
    spec_path: str, directory: Path, points: list[dict[str, Any]], say: Callable[[str], None] = lambda _: None
) -> list[str]:
    """Train the points one after another, each its own `parcae train`; returns the failed points' names.
    ``say`` receives a line as each point starts, is skipped or fails (the CLI prints them)."""
    make_dir(directory)
    write_record(directory, spec_path, points)
    failed = []
    for i, point in enumerate(points, 1):
        run_dir = Path(point["run_dir"])
        if exit_code(run_dir) == 0:
            say(f"[{i}/{len(points)}] {point['name']}: finished before, skipped")
            continue
        make_dir(run_dir)
        say(f"[{i}/{len(points)}] {point['name']}: training (log {run_dir / 'train.log'})")
        cmd = [sys.executable, "-m", "pipeline", "train", spec_path, *[f"--set={o}" for o in point["overrides"]]]
        with (run_dir / "train.log").open("a") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
        write_exit_code(run_dir, code)
        if code != 0:
            failed.append(point["name"])
            tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or [""]
            say(f"    exit {code}: {tail[0][:200]}")
    return failed


def array_script(directory: Path, points: list[dict[str, Any]]) -> str:
    """The batch script of the sweep's job array (one cluster section for every point)."""
    clusters = {json.dumps(p["loaded"].spec.cluster.model_dump(), sort_keys=True) for p in points}
    if len(clusters) > 1:
        raise UsageError("--submit: one job array has one cluster section; the grid must not vary cluster.*")
    return slurm.render(points[0]["loaded"], directory, output=f"{directory}/slurm/%A_%a.out")


def submit_array(spec_path: str, directory: Path, points: list[dict[str, Any]]) -> tuple[str, Path]:
    """Submit one Slurm job array, a task per point; returns (job id, batch script path)."""
    script = array_script(directory, points)
    slurm.check_against_cluster(points[0]["loaded"].spec.cluster)
    make_dir(directory / "slurm")
    write_record(directory, spec_path, points)
    for point in points:  # every task reads its own resolved spec, as `parcae submit` writes it
        point["loaded"].save(Path(point["run_dir"]) / "spec.yaml")
    path = directory / "slurm" / "job.sbatch"
    write_text(path, script)
    job = slurm.sbatch(path, f"--array=0-{len(points) - 1}")
    with (directory / "slurm" / "jobs.txt").open("a") as f:
        f.write(job + "\n")
    return job, path
