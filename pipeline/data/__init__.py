"""Shard streams: one shard set (`loader.ShardLoader`, also the evaluation sets), the training mixture
(`mixture`), and what shard sets must agree on (`manifests`, torch-free: the launcher's preflight reads it).
Import from the module that defines a name; this package re-exports nothing, so importing one module
loads only what it needs."""
