"""One optimizer step: the micro-batches, their loop counts and h_0 draws, the loss guard, backward and step.

`train_step` is what `parcae train` runs and what the ZeRO-3 parity test runs; `DepthSampler` makes the
per-sequence depths and initial states reproducible from (seed, step, micro-step), so a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from model import ParcaeConfig, sample_loop_counts, seeded_generator
from parcae_errors import ParcaeError
from pipeline.training.distributed import global_mean
from pipeline.training.guard import LossGuard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthSampler:
    """This rank's loop counts and h_0 generators.

    Every rank draws the same global counts for the whole global micro-batch from (seed, step,
    micro-step) and takes its own rows: sequences on different ranks get different depths, yet every
    rank knows the largest counts and runs that many iterations, so the ranks stay in step under ZeRO-3.
    """

    mean_recurrence: int
    mean_backprop_depth: int
    seed: int
    micro_batch_size: int
    world_size: int
    rank: int
    looped: bool = True  # False: the fixed-depth GPT baseline, which takes no loop counts

    @classmethod
    def for_model(cls, cfg: ParcaeConfig, *, seed: int, micro_batch_size: int, world_size: int, rank: int):
        return cls(cfg.mean_recurrence, cfg.mean_backprop_depth, seed, micro_batch_size, world_size, rank, cfg.looped)

    def forward_kwargs(self, step: int, micro: int, device: torch.device) -> dict:
        """The loop arguments of this micro-batch's forward (none for the GPT baseline)."""
        if not self.looped:
            return {}
        n_nograd, n_grad, at_least = self.loop_counts(step, micro)
        return {
            "loops": (n_nograd, n_grad),
            "min_iterations": at_least,
            "generator": self.h0_generator(step, micro, device),
        }

    def loop_counts(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(n_nograd, n_grad) for this rank's rows, and the largest of each over all ranks."""
        n_nograd, n_grad = sample_loop_counts(
            self.micro_batch_size * self.world_size,
            self.mean_recurrence,
            self.mean_backprop_depth,
            seeded_generator("loops", self.seed, -1, step, micro),
        )
        rows = slice(self.rank * self.micro_batch_size, (self.rank + 1) * self.micro_batch_size)
        return n_nograd[rows], n_grad[rows], (int(n_nograd.max()), int(n_grad.max()))

    def h0_generator(self, step: int, micro: int, device: torch.device) -> torch.Generator:
        return seeded_generator("h0", self.seed, self.rank, step, micro, device)


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
    batches: Iterator[torch.Tensor],
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
        batch = next(batches).to(device, non_blocking=True)
        wait += time.perf_counter() - waited
        loop_args = sampler.forward_kwargs(progress.step, draw, device)
        loss = engine(batch[:, :-1], batch[:, 1:], **loop_args, loop_stats=loop_stats if micro == 0 else None)
        draw += 1
        verdict = guard.check(global_mean(loss.detach(), sampler.world_size))
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
        loss=global_mean(torch.stack(losses).mean(), sampler.world_size),
        loop_counts=torch.cat(counts) if counts else None,
        data_wait_s=wait,
        loop_stats=loop_stats,
    )
