"""A run directory as the commands that read it see it: the spec it saved, with the run's own files
wherever the directory is now (copied or moved), and the copy of the tokenizer it keeps.

A run is relocatable: its spec names shards and tokenizer by absolute paths (or s3://), its own outputs
(checkpoints, TensorBoard, eval/) are found under the directory as given, and the tokenizer it trained
with is copied into ``RUN/tokenizer/`` at the start of training, so `parcae generate RUN` and `parcae
eval RUN` work from another directory, on a copy, or on another machine.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from data_prep.storage import S3Options, StorageError, open_store, write_atomic
from pipeline.jobspec.load import load_spec
from pipeline.jobspec.schema import JobSpec

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"
SEGMENTS = "segments.jsonl"  # one line per start of training: the step, the ranks, the Slurm job


def record_segment(run_dir: Path, **fields: Any) -> None:
    """Append the start of a segment of training (a first start, a resume, a requeue) to ``RUN/segments.jsonl``."""
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    with (run_dir / SEGMENTS).open("a") as out:
        out.write(json.dumps(record) + "\n")


def segments(run_dir: Path) -> list[dict[str, Any]]:
    """The segments a run recorded, oldest first (none for a run that predates them)."""
    path = run_dir / SEGMENTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_spec(run_dir: str | Path) -> JobSpec:
    """The spec a run saved (``RUN/spec.yaml``), with the run's own locations (its run_dir, checkpoints,
    staging and TensorBoard directories, where they lie inside the run directory that wrote the spec) moved
    to ``run_dir`` as given: a copied or moved run reads and writes its own files. Locations elsewhere
    (s3://, shared directories) stay."""
    run = Path(run_dir).resolve()
    spec = load_spec(run / "spec.yaml").spec
    old = spec.run_dir
    spec.checkpoint.dir = rebase(spec.checkpoint.dir or f"{old}/checkpoints", old, run)
    if spec.checkpoint.staging_dir:
        spec.checkpoint.staging_dir = rebase(spec.checkpoint.staging_dir, old, run)
    if spec.logging.tensorboard_dir:
        spec.logging.tensorboard_dir = rebase(spec.logging.tensorboard_dir, old, run)
    spec.run_dir = str(run)
    return spec


def rebase(location: str, old_root: str | None, new_root: Path) -> str:
    """``location`` inside ``old_root``, moved to ``new_root``; a location elsewhere stays."""
    old = (old_root or "").rstrip("/")
    if old and (location == old or location.startswith(old + "/")):
        return str(new_root / location[len(old) :].lstrip("/"))
    return location


def keep_tokenizer(location: str, run_dir: Path, options: S3Options | None = None) -> Path | None:
    """Copy the run's tokenizer (local or s3://) into ``RUN/tokenizer/`` unless the same bytes are there;
    the copy, or None (said, not fatal) when it cannot be read."""
    parent, _, name = location.rstrip("/").rpartition("/")
    target = run_dir / TOKENIZER_DIR / name
    try:
        data = open_store(parent or ".", options).get_bytes(name)
    except StorageError as exc:
        log.warning("the run keeps no copy of its tokenizer (%s); generate and eval will need --tokenizer", exc)
        return None
    if not (target.is_file() and target.read_bytes() == data):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp: tmp.write_bytes(data))
    for other in target.parent.iterdir():  # one tokenizer: the one this run trains with now
        if other != target:
            other.unlink()
    return target


def run_tokenizer(run_dir: Path | None) -> Path | None:
    """The tokenizer a run keeps (`keep_tokenizer`), or None."""
    folder = run_dir / TOKENIZER_DIR if run_dir else None
    found = sorted(p for p in folder.iterdir() if p.suffix in (".model", ".json")) if folder and folder.is_dir() else []
    return found[0] if found else None
