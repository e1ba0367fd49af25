"""Shard streams: one shard set (`ShardLoader`, also the evaluation sets) and the training mixture."""

from pipeline.data.loader import DataError, DataWaitInterrupted, ShardLoader, rows_loader
from pipeline.data.mixture import MixSchedule, MixtureLoader, train_loader

__all__ = [
    "DataError",
    "DataWaitInterrupted",
    "MixSchedule",
    "MixtureLoader",
    "ShardLoader",
    "rows_loader",
    "train_loader",
]
