"""A sweep directory on disk: ``DIR/sweep.json`` lists the points (name, values, overrides, run_dir); each
point is a normal run directory holding ``metrics.jsonl`` and, once run locally, ``sweep-status.json``.

Read by the local runner, the Slurm job array (each task finds its point here) and the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_prep.storage import write_text
from parcae_errors import ParcaeError

SWEEP_FILE = "sweep.json"
STATUS_FILE = "sweep-status.json"
POINT_KEYS = ("name", "values", "overrides", "run_dir")


def write_record(directory: Path, spec: str, points: list[dict[str, Any]]) -> None:
    record = {"spec": str(Path(spec).resolve()), "points": [{k: p[k] for k in POINT_KEYS} for p in points]}
    write_text(directory / SWEEP_FILE, json.dumps(record, indent=2) + "\n")


def read_points(directory: Path) -> list[dict[str, Any]]:
    path = directory / SWEEP_FILE
    if not path.is_file():
        raise ParcaeError(f"{directory}: not a sweep directory ({SWEEP_FILE} missing); `parcae sweep run` writes it")
    return json.loads(path.read_text())["points"]


def is_sweep(directory: Path) -> bool:
    return (directory / SWEEP_FILE).is_file()


def point_run_dir(directory: Path, task: int) -> Path:
    """The run directory of array task ``task`` of the sweep in ``directory``."""
    points = read_points(directory)
    if not 0 <= task < len(points):
        raise ParcaeError(f"{directory}: array task {task} but the sweep has {len(points)} points")
    return Path(points[task]["run_dir"])


def exit_code(run_dir: Path) -> int | None:
    """How the point's local training ended (None: not run here, or still running)."""
    status = run_dir / STATUS_FILE
    return json.loads(status.read_text()).get("exit_code") if status.is_file() else None


def write_exit_code(run_dir: Path, code: int) -> None:
    write_text(run_dir / STATUS_FILE, json.dumps({"exit_code": code}) + "\n")


def metrics_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
