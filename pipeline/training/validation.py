"""The training loop's periodic validation: the loss at every ``eval.loop_counts`` T (h_0 = 0), every rank
its share of the validation rows, the sums reduced over ranks, and the fitted L(T)."""

from __future__ import annotations

from typing import Any

import torch

from data_prep.storage import S3Options
from model import ParcaeConfig
from pipeline.data import rows_loader
from pipeline.evaluation.losses import loss_sums, validation_metrics
from pipeline.jobspec import EvalSpec


class Validator:
    """Built at start-up, so a validation set that cannot work fails then, not at the first evaluation.
    The rows are read once, at the first evaluation, and kept on the device (at most ``max_batches``)."""

    def __init__(
        self,
        spec: EvalSpec,
        url: str,
        options: S3Options,
        cfg: ParcaeConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seq_len: int,
        device: torch.device,
    ):
        self.interval, self.max_batches = spec.interval_steps, spec.max_batches
        self.loop_counts = list(spec.loop_counts) if cfg.looped else None
        self.d_model, self.device = cfg.d_model, device
        self.loader = rows_loader(
            url, options, rank=rank, world_size=world_size, batch_size=batch_size, seq_len=seq_len
        )
        self.batches: list[torch.Tensor] | None = None

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    @torch.no_grad()
    def run(self, engine: Any) -> dict[str, float]:
        """Every rank calls it: ``val_loss_loops_T`` per loop count (``val_loss`` for GPT), and the fit."""
        import torch.distributed as dist

        if self.batches is None:
            n = min(self.loader.batches_per_epoch(0), self.max_batches)
            self.batches = [b.to(self.device) for _, b in zip(range(n), self.loader, strict=False)]
        was_training = engine.training
        engine.eval()
        try:
            sums = loss_sums(engine, self.batches, self.loop_counts, self.d_model)
        finally:
            engine.train(was_training)
        dist.all_reduce(sums)
        return validation_metrics(self.loop_counts, sums)
