"""One optimizer step: the micro-batches, their loop counts and h_0 draws, the loss guard, backward and step.

`train_step` is what `parcae train` runs and what the ZeRO-3 parity test runs; `DepthSampler` makes the
per-sequence depths and initial states reproducible from (seed, step, row of the global batch), so a
resumed run draws exactly what the uninterrupted one would have, on any world size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from model import ParcaeConfig, sample_loop_counts, seeded_generator
from parcae_errors import ParcaeError
from pipeline.data.mixture import MicroBatch
from pipeline.training.distributed import global_mean
from pipeline.training.guard import LossGuard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthSampler:
    """The loop counts and h_0 generators of a rank's rows, as functions of the rows' positions in the run
    (`MicroBatch`): step s draws the counts of its G rows at once from (seed, s), and each row's h_0 comes
    from (seed, s, slot). So the same global batch on 2 ranks or on 1 rank accumulating 2 micro batches
    draws the same, and a run resumed on another world size draws what the uninterrupted one would have.
    Every rank knows the largest counts of the whole global micro batch and runs that many iterations, so
    the ranks stay in step under ZeRO-3."""

    mean_recurrence: int
    mean_backprop_depth: int
    seed: int
    global_batch: int
    looped: bool = True  # False: the fixed-depth GPT baseline, which takes no loop counts

    @classmethod
    def for_model(cls, cfg: ParcaeConfig, *, seed: int, global_batch: int) -> DepthSampler:
        return cls(cfg.mean_recurrence, cfg.mean_backprop_depth, seed, global_batch, cfg.looped)

    def forward_kwargs(self, batch: MicroBatch, device: torch.device) -> dict:
        """The loop arguments of this micro-batch's forward (none for the GPT baseline)."""
        if not self.looped:
            return {}
        n_nograd, n_grad, at_least = self.loop_counts(batch)
        return {"loops": (n_nograd, n_grad), "min_iterations": at_least, "generator": self.h0_generators(batch, device)}

    def loop_counts(self, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(n_nograd, n_grad) for this rank's rows, and the largest of each over the global micro batch."""
        every = [self._step_counts(*divmod(p, self.global_batch)) for p in range(batch.first, batch.first + batch.size)]
        n_nograd = torch.tensor([c[0] for c in every], dtype=torch.long)
        n_grad = torch.tensor([c[1] for c in every], dtype=torch.long)
        mine = slice(batch.offset, batch.offset + len(batch.tokens))
        return n_nograd[mine], n_grad[mine], (int(n_nograd.max()), int(n_grad.max()))

    def _step_counts(self, step: int, slot: int) -> tuple[int, int]:
        rows, mean, depth = self.global_batch, self.mean_recurrence, self.mean_backprop_depth
        n_nograd, n_grad = _counts_of_step(self.seed, step, rows, mean, depth)
        return int(n_nograd[slot]), int(n_grad[slot])

    def h0_generators(self, batch: MicroBatch, device: torch.device) -> list[torch.Generator]:
        """One generator per row of this rank, seeded by (seed, step, slot) of the row."""
        return [seeded_generator("h0", self.seed, slot, step, 0, device) for step, slot in self.slots(batch)]

    def slots(self, batch: MicroBatch) -> list[tuple[int, int]]:
        return [divmod(p, self.global_batch) for p in batch.positions]


@functools.lru_cache(maxsize=4)
def _counts_of_step(seed: int, step: int, rows: int, mean: int, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The loop counts of every row of a step (one draw per step, shared by its micro batches)."""
    return sample_loop_counts(rows, mean, depth, seeded_generator("loops", seed, -1, step, 0))


@dataclass
class Progress:
    """Where the run is: steps and tokens done, micro-batches skipped (a stateful part of a checkpoint)."""

    step: int = 0
    tokens: int = 0
    nonfinite_total: int = 0
    spikes_skipped: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, int(state.get(f.name, 0)))


@dataclass
class StepResult:
    loss: float  # mean over the used micro-batches and over ranks
    # this rank's sampled total loops, per row of every used micro-batch (None for the GPT baseline)
    loop_counts: torch.Tensor | None
    data_wait_s: float
    loop_stats: list[dict[str, float]] | None = field(default=None)  # per loop, first micro-batch


class TrainingHalted(ParcaeError):
    """Too many micro-batches skipped: the trainer writes a checkpoint, then this reaches the user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason, self.saved_to = reason, ""

    def __str__(self) -> str:
        return self.reason + (f"; checkpoint written to {self.saved_to}" if self.saved_to else "")


def train_step(
    engine,
    batches: Iterator[MicroBatch],
    sampler: DepthSampler,
    guard: LossGuard,
    progress: Progress,
    *,
    accumulation: int,
    max_nonfinite: int,
    device: torch.device,
    collect_loop_stats: bool = False,
) -> StepResult:
    """Run micro-batches until ``accumulation`` of them were used, then the optimizer step.

    A micro-batch whose loss (averaged over ranks, so every rank decides the same) the guard refuses is
    skipped before its backward and replaced by the next one; skips are counted in ``progress``.
    Raises `TrainingHalted` after ``max_nonfinite`` non-finite losses in a row, or when far more
    micro-batches were skipped than used.
    """
    losses, counts, wait = [], [], 0.0
    loop_stats: list[dict[str, float]] | None = [] if collect_loop_stats else None
    micro = draw = nonfinite_in_a_row = 0
    while micro < accumulation:
        waited = time.perf_counter()
        rows = next(batches)
        batch = rows.tokens.to(device, non_blocking=True)
        wait += time.perf_counter() - waited
        loop_args = sampler.forward_kwargs(rows, device)
        loss = engine(batch[:, :-1], batch[:, 1:], **loop_args, loop_stats=loop_stats if micro == 0 else None)
        draw += 1
        verdict = guard.check(global_mean(loss.detach()))
        if verdict == "spike":
            progress.spikes_skipped += 1
            log.warning(
                "step %d: loss spike, micro-batch skipped (%d so far)", progress.step + 1, progress.spikes_skipped
            )
        elif verdict == "nonfinite":
            nonfinite_in_a_row += 1
            progress.nonfinite_total += 1
            log.warning(
                "step %d: non-finite loss, micro-batch skipped (%d in a row)", progress.step + 1, nonfinite_in_a_row
            )
            if nonfinite_in_a_row >= max_nonfinite:
                raise TrainingHalted(
                    f"training stopped at step {progress.step}: the loss was not finite for {nonfinite_in_a_row} "
                    "micro-batches in a row (training.max_nonfinite_steps)"
                )
        if verdict != "ok":
            if draw >= 10 * accumulation + max_nonfinite:
                raise TrainingHalted(
                    f"step {progress.step + 1}: {draw - micro} of {draw} micro-batches skipped "
                    "(loss spikes or non-finite); training.spike_zscore may be too strict"
                )
            continue
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
        if loop_args:
            counts.append(loop_args["loops"][0] + loop_args["loops"][1])
        micro += 1
        nonfinite_in_a_row = 0
    return StepResult(
        loss=global_mean(torch.stack(losses).mean()),
        loop_counts=torch.cat(counts) if counts else None,
        data_wait_s=wait,
        loop_stats=loop_stats,
    )
