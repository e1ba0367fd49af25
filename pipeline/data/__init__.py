"""Shard streams: one shard set (`ShardLoader`, also the evaluation sets) and the training mixture.

The names below are imported on first use (PEP 562): `pipeline.data.manifests`, which the launcher's
preflight reads, imports no torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "DataError": "pipeline.data.manifests",
    "DataWaitInterrupted": "pipeline.data.loader",
    "ShardLoader": "pipeline.data.loader",
    "rows_loader": "pipeline.data.loader",
    "MixSchedule": "pipeline.data.mixture",
    "MixtureLoader": "pipeline.data.mixture",
    "train_loader": "pipeline.data.mixture",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
