"""Checkpoints through DeepSpeed (sharded), marked as the newest only once completely written.

Layout: ``DIR/step-00000100/`` (DeepSpeed's files, plus ``spec.yaml``, the resolved spec) and
``DIR/LATEST`` naming the newest complete one. ``LATEST`` is replaced atomically after every rank has
finished writing, so a crash during a save leaves the previous checkpoint as the one to resume.
Only the newest ``keep_last`` are kept.

``DIR`` is a local (or shared) path, or an ``s3://`` prefix. For S3, DeepSpeed writes into a staging
directory (``checkpoint.staging_dir``; node-local or shared both work), every rank uploads the files
it wrote (``*pp_rank_R_*``; rank 0 also the rest), and only then rank 0 writes ``spec.yaml`` and
``LATEST``; the staged copy is removed. To resume, the first rank of every node downloads the newest
checkpoint into its staging directory and the ranks load it from there.

`Checkpointer` is the trainer's component (built from `CheckpointSpec` and the storage options): the
parts of the trainer that have state (progress, loader position, loss guard, ...) register themselves with
it by name (`register`), each with ``state_dict`` / ``load_state_dict``; ``save`` writes every part's state
beside DeepSpeed's, ``load`` gives each part its own back, and ``due`` says when a save is due. A new part
needs no change here or in the trainer's loop. The module's functions read checkpoints for everything
else (`parcae eval`, `export`, `status`, `validate`): they import no torch (the `Checkpointer`'s methods, which
run in the ranks, import torch.distributed themselves), so `parcae validate` says what a resume would do
without torch's import.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from data_prep.storage import S3Options, is_s3, open_store
from parcae_errors import ParcaeError
from pipeline.jobspec import CheckpointSpec

log = logging.getLogger(__name__)

LATEST = "LATEST"
LAYOUT = "layout.json"  # parameter names and shapes in order, checked before a resume loads anything
_OWNER = re.compile(r"pp_rank_(\d+)_")  # DeepSpeed's per-data-parallel-rank files


class Stateful(Protocol):
    """A part of the trainer whose state a checkpoint carries."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# Checkpoints written before the parts registered themselves kept the progress's fields at the top level.
_FLAT_PROGRESS = ("step", "tokens", "nonfinite_total", "spikes_skipped")


def parts_state(client_state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's client state by part name (a checkpoint of the earlier flat layout read the same way)."""
    if "progress" in client_state or "step" not in client_state:
        return client_state
    rest = {k: v for k, v in client_state.items() if k not in _FLAT_PROGRESS}
    return {**rest, "progress": {k: client_state[k] for k in _FLAT_PROGRESS if k in client_state}}


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _store(url: str, options: S3Options | None = None):
    return open_store(url, options or S3Options.from_env())


def latest_tag(directory: str, options: S3Options | None = None) -> str | None:
    """The tag ``LATEST`` names, or None when there is no checkpoint yet. A ``LATEST`` naming a checkpoint
    that is gone or incomplete is refused, naming the newest complete one to resume from instead."""
    store = _store(directory, options)
    if not store.exists(LATEST):
        return None
    tag = store.get_bytes(LATEST).decode().strip()
    if not store.exists(f"{tag}/spec.yaml"):
        raise CheckpointError(
            f"{store.child_url(LATEST)} names {tag!r}, which is missing or incomplete; {_advice(store)}"
        )
    return tag


def _advice(store: Any) -> str:
    """What to do when the newest checkpoint cannot be used: resume from the newest complete one (named), or
    start over with --restart, which moves the checkpoints aside and deletes nothing."""
    tags = _complete(store.list())
    restart = "or start over with `parcae train SPEC --restart` (it moves every checkpoint aside, deleting none)"
    if tags:
        return (
            f"the newest complete checkpoint is {tags[-1]}: resume from it with "
            f"`parcae train SPEC --resume-from {tags[-1]}`, {restart}"
        )
    return f"there is no complete checkpoint: {restart}"


SUPERSEDED = "superseded-"  # DIR/superseded-<UTC time>/: checkpoints set aside by --restart or --resume-from


@dataclass(frozen=True)
class ResumePlan:
    """Where a run starts: ``tag`` (None: step 0), after moving ``set_aside`` (step directories, ``LATEST``)
    into ``DIR/superseded-<time>/`` so that no checkpoint is ever written over."""

    tag: str | None
    set_aside: tuple[str, ...] = ()


def plan_resume(
    directory: str, options: S3Options | None = None, resume_from: str | None = None, restart: bool = False
) -> ResumePlan:
    """The newest checkpoint (``LATEST``) by default; ``resume_from`` names another, and the step directories
    after it are set aside (the run redoes those steps); ``restart`` starts at step 0 with every checkpoint
    set aside. Starting at step 0 beside checkpoints that ``LATEST`` does not name is refused, with the one
    to resume from: a deleted or damaged newest checkpoint never silently restarts the run."""
    store = _store(directory, options)
    names = store.list()
    steps = sorted({n.split("/")[0] for n in names if n.startswith("step-") and "/" in n})
    complete = _complete(names)
    if restart and resume_from:
        raise CheckpointError("--restart starts at step 0 and --resume-from at a checkpoint: give one of them")
    if restart:
        return ResumePlan(None, (*steps, LATEST) if LATEST in names else tuple(steps))
    if resume_from is not None:
        if resume_from not in complete:
            available = ", ".join(complete) or "none"
            raise CheckpointError(
                f"--resume-from {resume_from}: no complete checkpoint of that name in {directory} ({available})"
            )
        return ResumePlan(resume_from, tuple(t for t in steps if t > resume_from))
    tag = latest_tag(directory, options)
    if tag is None and complete:
        raise CheckpointError(
            f"{directory} holds checkpoints ({', '.join(complete)}) but no {LATEST} names one; {_advice(store)}"
        )
    newer = [t for t in complete if tag is not None and t > tag]
    if newer:
        raise CheckpointError(
            f"{store.child_url(LATEST)} names {tag}, but {', '.join(newer)} is complete too (a save was cut off "
            f"after it was written): resume from one with `parcae train SPEC --resume-from {newer[-1]}` (or {tag})"
        )
    return ResumePlan(tag, tuple(t for t in steps if tag is None or t > tag))


def set_aside(directory: str, names: tuple[str, ...], options: S3Options | None = None) -> str | None:
    """Move ``names`` (step directories, ``LATEST``) into ``DIR/superseded-<UTC time>/``; its URL."""
    if not names:
        return None
    store = _store(directory, options)
    folder = SUPERSEDED + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for name in names:
        store.move(name, f"{folder}/{name}")
    where = store.child_url(folder)
    log.warning("moved %s aside into %s (nothing is deleted)", ", ".join(names), where)
    return where


def param_layout(module: Any) -> list[str]:
    """Parameter names and full shapes in order: DeepSpeed's ZeRO checkpoints store flat partitions in
    this order, so a model whose layout changed would load silently scrambled."""
    return [f"{name}:{tuple(getattr(p, 'ds_shape', p.shape))}" for name, p in module.named_parameters()]


def fetch(directory: str, tag: str, destination: Path, options: S3Options | None = None) -> Path:
    """Copy checkpoint ``tag`` of an s3:// checkpoint dir into ``destination``; returns the local dir."""
    store = _store(directory, options)
    names = [n for n in store.list() if n.startswith(tag + "/")]
    for name in names:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with store.open(name) as body, tmp.open("wb") as out:
            shutil.copyfileobj(body, out, 8 << 20)
        tmp.replace(target)
    log.info("downloaded %s (%d files) to %s", store.child_url(tag), len(names), destination)
    return destination


class CheckpointError(ParcaeError):
    """A checkpoint that cannot be read: names the file and the newest complete earlier checkpoint."""


class LayoutMismatch(CheckpointError):
    """The checkpoint holds another model's parameters (found the same way on every rank)."""


def _check_layout(store: Any, tag: str, where: str, current: list[str]) -> None:
    """Refuse, before DeepSpeed reads anything, a checkpoint whose parameters are not this model's."""
    saved = json.loads(store.get_bytes(f"{tag}/{LAYOUT}")) if store.exists(f"{tag}/{LAYOUT}") else None
    if saved == current:
        return
    if saved is None:
        raise LayoutMismatch(
            f"{where}: written before checkpoints recorded their parameter layout (before the recurrence became "
            "one module); it cannot be resumed safely by this version. Start a new run_dir, or export its "
            "weights with `parcae export` and import them"
        )
    first = next(
        (i for i, (a, b) in enumerate(zip(saved, current, strict=False)) if a != b), min(len(saved), len(current))
    )
    theirs = saved[first] if first < len(saved) else "nothing"
    ours = current[first] if first < len(current) else "nothing"
    raise LayoutMismatch(
        f"{where}: parameter layout differs from this model's (first difference at #{first}: checkpoint "
        f"{theirs}, model {ours}); the model section of the spec must match the run that wrote it"
    )


def complete_tags(directory: str, options: S3Options | None = None) -> list[str]:
    """Tags of complete checkpoints (their spec.yaml is written last), oldest first."""
    return _complete(_store(directory, options).list())


def _complete(names: list[str]) -> list[str]:
    """The complete checkpoints among a listing (spec.yaml is written last), oldest first."""
    return sorted({n.split("/")[0] for n in names if n.startswith("step-") and n.endswith("/spec.yaml")})


def corrupt_file(tag_dir: Path) -> Path | None:
    """The first of a checkpoint's files that does not read back (DeepSpeed's files are zip archives
    whose every member carries a CRC), or None."""
    for file in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(file) as archive:
                if archive.testzip() is None:
                    continue
        except (OSError, zipfile.BadZipFile, EOFError):
            pass
        return file
    return None


def unreadable(where: str, tag_dir: Path, exc: Exception, earlier: list[str], how: str) -> CheckpointError:
    """The error for a checkpoint that failed to load: which file, why, and what to do instead. An earlier
    checkpoint is advised only when a file of this one is damaged: when every file reads back, the cause is
    not this checkpoint's bytes, and an earlier one would fail the same way."""
    file = corrupt_file(tag_dir)
    if file is None:
        return CheckpointError(
            f"{where}: cannot be loaded ({type(exc).__name__}: {str(exc)[:300]}); its files read back intact, so "
            "an earlier checkpoint would most likely fail the same way: the spec or the software differs from the "
            "run that wrote it"
        )
    if earlier:
        advice = f"the newest complete earlier checkpoint is {earlier[-1]}: {how.format(tag=earlier[-1])}"
    else:
        advice = "there is no earlier complete checkpoint"
    return CheckpointError(f"{where}: cannot be loaded ({file.name} is corrupt or truncated); {advice}")


def saved_spec(directory: str, tag: str, options: S3Options | None = None) -> dict[str, Any]:
    """The resolved spec a checkpoint was written with (its ``spec.yaml``), parsed."""
    import yaml

    return yaml.safe_load(_store(directory, options).get_bytes(f"{tag}/spec.yaml")) or {}


class Checkpointer:
    """Saves and resumes the trainer's state in ``checkpoint.dir`` (local or s3://); every rank calls both."""

    def __init__(self, spec: CheckpointSpec, options: S3Options, spec_yaml: str):
        assert spec.dir is not None  # JobSpec fills it in
        self.dir, self.staging, self.keep_last = spec.dir, spec.staging_dir, spec.keep_last
        self.interval = spec.interval_steps
        self.parts: dict[str, Stateful] = {}
        self.options, self.spec_yaml = options, spec_yaml
        self.remote = is_s3(self.dir)
        if self.remote and not self.staging:
            raise ParcaeError(f"checkpoint.dir: {self.dir}: an s3:// destination needs checkpoint.staging_dir")

    def register(self, name: str, part: Stateful) -> None:
        """``part``'s state goes into every checkpoint under ``name`` and comes back to it on resume."""
        self.parts[name] = part

    def due(self, step: int, last: bool = False, stop: bool = False) -> bool:
        """A checkpoint is written every ``checkpoint.interval_steps``, at the last step and on a stop signal."""
        return step % self.interval == 0 or last or stop

    def load(self, engine: Any, tag: str | None, local_rank: int = 0) -> dict[str, Any] | None:
        """Load checkpoint ``tag`` (a `plan`'s; None: nothing to load) into the engine and every registered
        part; its client state by part name. A checkpoint that fails to load is named, with the earlier one
        to use instead; nothing falls back on its own."""
        if tag is None:
            return None
        import torch.distributed as dist

        where = f"{self.dir.rstrip('/')}/{tag}"
        _check_layout(_store(self.dir, self.options), tag, where, param_layout(engine.module))
        path = Path(self.dir)
        if self.remote:
            path = Path(self.staging) / "resume"
            if local_rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                fetch(self.dir, tag, path, self.options)
            dist.barrier()
        load_dir = self._for_this_world_size(engine, path, tag)
        try:
            loaded, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
        except Exception as exc:  # torch's zip reader, pickle, DeepSpeed: whatever a damaged file raises
            earlier = [t for t in complete_tags(self.dir, self.options) if t < tag]
            how = "resume from it with `parcae train SPEC --resume-from {tag}`"
            raise unreadable(where, path / tag, exc, earlier, how) from None
        if loaded is None:
            raise ParcaeError(f"{where}: DeepSpeed could not load this checkpoint")
        if self.remote:
            dist.barrier()
            if local_rank == 0:
                shutil.rmtree(path, ignore_errors=True)
        state = parts_state(client_state or {})
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
            else:  # a part this checkpoint predates starts from its initial state
                log.warning("%s holds no state for %r: it starts afresh", where, name)
        log.info("resumed from %s", where)
        return state

    def _for_this_world_size(self, engine: Any, path: Path, tag: str) -> Path:
        """Where DeepSpeed loads ``tag`` from: ``path``, or, for a ZeRO-3 checkpoint written by another number of
        ranks, its copy rewritten for this engine's ranks in ``tag/world-<N>/`` (made once: every rank writes
        its own files, and on S3 uploads them beside the checkpoint for the next resume on N ranks)."""
        import torch.distributed as dist

        from pipeline.training import reshard

        written_by = reshard.world_size_of(path / tag)  # 0: not ZeRO's files (stage 0 loads on any world size)
        if not written_by or written_by == engine.world_size:
            return path
        world = engine.world_size
        converted = path / tag / f"world-{world}"
        rank = dist.get_rank()
        mine = reshard.files(converted / tag, rank)
        if not all(f.is_file() for f in mine):
            started = time.perf_counter()
            reshard.reshard(path / tag, converted / tag, engine, rank)
            log.info(
                "%s: rewritten from %d rank(s) for %d in %.1f s (%.1f MB for this rank)",
                tag, written_by, world, time.perf_counter() - started, sum(f.stat().st_size for f in mine) / 1e6,
            )  # fmt: skip
            if self.remote:
                store = _store(self.dir, self.options)
                for file in mine:
                    store.put_file(file, f"{tag}/{file.relative_to(path / tag)}")
        dist.barrier()
        return converted

    def save(self, engine: Any, step: int) -> str:
        """Write step ``step`` with every registered part's state, then mark it newest (``LATEST``) and drop
        all but the newest ``keep_last``."""
        import torch.distributed as dist

        tag, started = tag_for(step), time.perf_counter()
        client_state = {name: part.state_dict() for name, part in self.parts.items()}
        path = Path(self.staging) if self.remote else Path(self.dir)
        if _store(self.dir, self.options).exists(f"{tag}/spec.yaml"):  # the resume plan sets such ones aside
            raise CheckpointError(f"{self.dir.rstrip('/')}/{tag}: a complete checkpoint is there; not writing over it")
        try:
            engine.save_checkpoint(str(path), tag=tag, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as exc:  # a full or failing disk: say where, and what is still there
            previous = latest_tag(self.dir, self.options)
            kept = f"the newest complete checkpoint, {previous}, is intact" if previous else "no checkpoint is complete"
            free = shutil.disk_usage(path).free if path.is_dir() else None
            why = f"no space left: {free / 2**20:.1f} MB free there" if free is not None and free < 64 << 20 else exc
            raise CheckpointError(f"{path / tag}: cannot write the checkpoint of step {step} ({why}); {kept}") from None
        dist.barrier()
        rank = dist.get_rank()
        store = _store(self.dir, self.options)
        if self.remote:  # every rank uploads (then drops) the staged files it wrote
            for file in sorted((path / tag).rglob("*")):
                owner = _OWNER.search(file.name)
                if file.is_file() and (int(owner.group(1)) if owner else 0) == rank:
                    store.put_file(file, f"{tag}/{file.relative_to(path / tag)}")
                    file.unlink()
            dist.barrier()
        if rank == 0:
            store.put_bytes(json.dumps(param_layout(engine.module)).encode(), f"{tag}/{LAYOUT}")
            store.put_bytes(self.spec_yaml.encode(), f"{tag}/spec.yaml")
            store.put_bytes((tag + "\n").encode(), LATEST)  # atomic on a file system (rename) and on S3 (one PUT)
            self._prune(store, path)
        dist.barrier()
        if self.remote:
            shutil.rmtree(path / tag, ignore_errors=True)  # what is left of the staged copy: empty directories
        log.info("checkpoint %s written in %.2f s", store.child_url(tag), time.perf_counter() - started)
        return tag

    def _prune(self, store: Any, path: Path) -> None:
        if self.remote:
            names = store.list()
            tags = sorted({name.split("/")[0] for name in names if name.startswith("step-")})
            for old in tags[: -self.keep_last]:
                for name in [n for n in names if n.startswith(old + "/")]:
                    store.delete(name)
        else:
            tags = sorted(p.name for p in path.glob("step-*") if p.is_dir())
            for old in tags[: -self.keep_last]:
                shutil.rmtree(path / old, ignore_errors=True)
