"""What resuming a checkpoint on this run's ranks changes, and whether it can: the global batch is kept.

A checkpoint keeps the resolved spec that wrote it (``spec.yaml``). A resume may run on another world size
or split the global batch into other micro batches: the data continues at the same row and the depth
draws are the same (both are functions of the rows' positions, `pipeline.data.mixture`), and a ZeRO-3
checkpoint is rewritten for the new ranks (`pipeline.training.reshard`). What must stay is the global
batch: another one is another optimization, so it is refused, naming the batch sizes that keep it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parcae_errors import UsageError
from pipeline.jobspec import JobSpec


class ResumeRefused(UsageError):
    """A resume that would change the global batch, or the world size where that is refused (exit 2)."""


@dataclass(frozen=True)
class Layout:
    """How a run splits its global batch."""

    world_size: int
    micro_batch_size: int
    accumulation: int
    zero_stage: int

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch_size * self.accumulation

    @classmethod
    def of_spec(cls, spec: JobSpec) -> Layout:
        t = spec.training
        assert t.micro_batch_size is not None and t.gradient_accumulation_steps is not None
        return cls(spec.world_size, t.micro_batch_size, t.gradient_accumulation_steps, spec.zero.stage)

    @classmethod
    def of_saved(cls, saved: dict[str, Any]) -> Layout:
        """From a checkpoint's ``spec.yaml`` (parsed)."""
        cluster, t = saved.get("cluster", {}), saved.get("training", {})
        world = int(cluster.get("nodes", 1)) * int(cluster.get("procs_per_node", 1))
        stage = int(saved.get("zero", {}).get("stage", 3))
        return cls(world, int(t["micro_batch_size"]), int(t["gradient_accumulation_steps"]), stage)


def splits(global_batch: int, world_size: int) -> list[tuple[int, int]]:
    """(micro batch size, accumulation) pairs that form ``global_batch`` rows on ``world_size`` ranks."""
    if global_batch % world_size:
        return []
    per_rank = global_batch // world_size
    return [(micro, per_rank // micro) for micro in range(per_rank, 0, -1) if per_rank % micro == 0]


def resume_change(saved: Layout, now: Layout, tag: str, policy: str = "convert") -> str | None:
    """What resuming ``tag`` (written with ``saved``) on ``now`` changes, in words (None: nothing), or a
    `ResumeRefused` when it cannot keep the global batch, or the world size changes under a ``refuse`` policy
    or a ZeRO stage whose checkpoints cannot be rewritten."""
    if saved == now:
        return None
    where = f"{tag} was written by {saved.world_size} rank(s) with a global batch of {saved.global_batch} rows"
    if now.global_batch != saved.global_batch:
        options = splits(saved.global_batch, now.world_size)
        if options:
            pairs = ", ".join(f"micro_batch_size {m} x accumulation {a}" for m, a in options[:4])
            advice = (
                f"on {now.world_size} rank(s) set training.global_batch_size={saved.global_batch} "
                f"(and training.micro_batch_size; {pairs})"
            )
        else:
            fits = [w for w in range(1, saved.global_batch + 1) if saved.global_batch % w == 0]
            advice = f"{saved.global_batch} rows cannot be split over {now.world_size} ranks; world sizes that can: "
            advice += ", ".join(str(w) for w in fits[:12])
        raise ResumeRefused(
            f"training.global_batch_size: {where}, this run's is {now.global_batch}; a resume keeps the global "
            f"batch (another is another optimization): {advice}. To train with another batch, start from these "
            "weights with checkpoint.init_from"
        )
    change = (
        f"world size {saved.world_size} -> {now.world_size}, micro batch {saved.micro_batch_size} -> "
        f"{now.micro_batch_size}, accumulation {saved.accumulation} -> {now.accumulation}, "
        f"global batch {now.global_batch} kept"
    )
    if now.world_size == saved.world_size:
        return change
    if policy == "refuse":
        raise ResumeRefused(
            f"training.on_world_size_change: refuse, and {where} ({change}); resume on {saved.world_size} rank(s), "
            "or set training.on_world_size_change: convert"
        )
    if saved.zero_stage in (1, 2) or now.zero_stage in (1, 2):
        raise ResumeRefused(
            f"zero.stage: {where} under ZeRO stage {saved.zero_stage}; only ZeRO-3 (and stage 0) checkpoints are "
            f"rewritten for another world size: resume on {saved.world_size} rank(s)"
        )
    return change + ("; the checkpoint is rewritten for the new ranks (once, kept beside it)" if now.zero_stage else "")


def check_resume(spec: JobSpec, tag: str) -> str | None:
    """What resuming checkpoint ``tag`` of ``spec``'s checkpoint directory changes (see `resume_change`)."""
    from pipeline.training.checkpoint import saved_spec

    assert spec.checkpoint.dir is not None
    saved = saved_spec(spec.checkpoint.dir, tag, spec.storage.s3_options())
    try:
        layout = Layout.of_saved(saved)
    except (KeyError, TypeError, ValueError):  # a spec.yaml without the resolved batch sizes: nothing to compare
        return None
    return resume_change(layout, Layout.of_spec(spec), tag, spec.training.on_world_size_change)
