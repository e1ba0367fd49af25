"""Data for training and evaluation: shard sets streamed from a manifest (local or s3://), exact resume."""

from pipeline.data.loader import DataError, ShardLoader, rows_loader, train_loader

__all__ = ["DataError", "ShardLoader", "rows_loader", "train_loader"]
