"""Validation loss at test-time loop counts, with h_0 = 0 so the numbers are reproducible.

Every rank evaluates the same number of batches (its share of the validation shards, capped by
``eval.max_batches``); losses are token-weighted and averaged over ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.distributed import RankInfo
from pipeline.spec import JobSpec


def val_loader(spec: JobSpec, info: RankInfo, options: Any):
    """Every rank reads the whole (small) validation set and keeps its own rows, unshuffled."""
    from pipeline.loader import DataError, ShardLoader

    assert spec.data.val_url is not None
    loader = ShardLoader(
        spec.data.val_url,
        rank=info.rank,
        world_size=info.world_size,
        micro_batch_size=spec.training.micro_batch_size,
        seq_len=spec.data.seq_len,
        seed=spec.training.seed,
        shuffle_buffer=0,
        options=options,
        shuffle=False,
        prefetch=0,
        max_retries=spec.storage.max_retries,
        split_by="samples",
    )
    if loader.batches_per_epoch(0) == 0:
        raise DataError(
            f"{spec.data.val_url}: too few validation rows for one batch of "
            f"{spec.training.micro_batch_size} per rank on {info.world_size} ranks"
        )
    return loader


@torch.no_grad()
def evaluate(engine: Any, spec: JobSpec, info: RankInfo, options: Any, device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    loader = val_loader(spec, info, options)
    n_batches = min(loader.batches_per_epoch(0), spec.eval.max_batches)
    batches = [b.to(device) for _, b in zip(range(n_batches), loader, strict=False)]
    looped = spec.model.arch == "parcae"
    counts = spec.eval.loop_counts if looped else [1]
    was_training = engine.training
    engine.eval()
    results: dict[str, float] = {}
    try:
        for loops in counts:
            total = torch.zeros(2, dtype=torch.float64)
            for batch in batches:
                inputs, targets = batch[:, :-1], batch[:, 1:]
                kwargs = {"loops": loops, "h0": torch.zeros(*inputs.shape, spec.model.d_model, device=device)}
                loss = engine(inputs, targets, **(kwargs if looped else {}))
                total += torch.tensor([float(loss) * targets.numel(), targets.numel()], dtype=torch.float64)
            dist.all_reduce(total)
            mean = float(total[0] / total[1]) if total[1] else math.nan
            results[f"val_loss_loops_{loops}" if looped else "val_loss"] = mean
    finally:
        engine.train(was_training)
    return results
