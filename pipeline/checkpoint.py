"""Checkpoints through DeepSpeed (sharded), marked as the newest only once completely written.

Layout: ``DIR/step-00000100/`` (DeepSpeed's files, plus ``spec.yaml``, the resolved spec) and
``DIR/LATEST`` naming the newest complete one. ``LATEST`` is replaced atomically after every rank has
finished writing, so a crash during a save leaves the previous checkpoint as the one to resume.
Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline.errors import ParcaeError

log = logging.getLogger(__name__)

LATEST = "LATEST"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def local_dir(url: str) -> Path:
    if url.startswith("s3://"):
        raise ParcaeError(
            f"checkpoint.dir: {url}: checkpoints to s3:// are not supported yet; use a local or shared file system path"
        )
    return Path(url)


def latest_tag(directory: str) -> str | None:
    marker = local_dir(directory) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (local_dir(directory) / tag).is_dir():
        raise ParcaeError(f"{marker} names {tag!r}, which is not in {directory}; remove {marker} to start over")
    return tag


def param_layout(module: Any) -> list[str]:
    """Parameter names and full shapes in order: DeepSpeed's ZeRO checkpoints store flat partitions in
    this order, so a model whose layout changed would load silently scrambled."""
    return [f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))}" for name, p in module.named_parameters()]


def save(engine: Any, directory: str, step: int, client_state: dict[str, Any], keep_last: int, spec_yaml: str) -> str:
    path = local_dir(directory)
    tag = tag_for(step)
    client_state = {**client_state, "param_layout": param_layout(engine.module)}
    engine.save_checkpoint(str(path), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        (path / tag / "spec.yaml").write_text(spec_yaml)
        tmp = path / f".{LATEST}.tmp"
        tmp.write_text(tag + "\n")
        tmp.replace(path / LATEST)
        tags = sorted(p.name for p in path.glob("step-*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(path / old, ignore_errors=True)
    dist.barrier()
    log.info("checkpoint %s written", path / tag)
    return tag


def load(engine: Any, directory: str) -> dict[str, Any] | None:
    """Load the newest complete checkpoint into the engine; its client state, or None if there is none."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    loaded, client_state = engine.load_checkpoint(str(local_dir(directory)), tag=tag)
    if loaded is None:
        raise ParcaeError(f"{local_dir(directory) / tag}: DeepSpeed could not load this checkpoint")
    saved, current = client_state.get("param_layout"), param_layout(engine.module)
    if saved != current:
        where = local_dir(directory) / tag
        if saved is None:
            raise ParcaeError(
                f"{where}: written before checkpoints recorded their parameter layout (before the recurrence became "
                "one module); it cannot be resumed safely by this version. Start a new run_dir, or export its "
                "weights with `parcae export` and import them"
            )
        first = next(
            (i for i, (a, b) in enumerate(zip(saved, current, strict=False)) if a != b), min(len(saved), len(current))
        )
        theirs = saved[first] if first < len(saved) else "nothing"
        ours = current[first] if first < len(current) else "nothing"
        raise ParcaeError(
            f"{where}: parameter layout differs from this model's (first difference at #{first}: checkpoint "
            f"{theirs}, model {ours}); the model section of the spec must match the run that wrote it"
        )
    log.info("resumed from %s", loaded)
    return client_state
