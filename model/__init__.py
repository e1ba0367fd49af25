"""The Parcae looped language model and its baselines. Imports torch and its own config only.

The names below are imported on first use (PEP 562), so ``import model.config`` (the fields, bounds and
FLOP counts every job spec reads) does not import torch: `parcae --help`, `validate` and `status` start
in a fraction of torch's import time.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ParcaeConfig": "model.config",
    "count_params": "model.config",
    "hardware_flops_per_token": "model.config",
    "paper_flops_per_token": "model.config",
    "recompute_flops_per_token": "model.config",
    "ParcaeLM": "model.parcae",
    "build_model": "model.parcae",
    "empty_model": "model.parcae",
    "loop_generator": "model.sampling",
    "sample_loop_counts": "model.sampling",
    "seeded_generator": "model.sampling",
    "WeightsError": "model.weights",
    "load_pretrained": "model.weights",
    "load_reference": "model.weights",
    "save_reference": "model.weights",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
