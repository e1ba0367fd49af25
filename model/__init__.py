"""The Parcae looped language model and its baselines. Imports torch and its own config only."""

from model.config import (
    ParcaeConfig,
    count_params,
    hardware_flops_per_token,
    paper_flops_per_token,
    recompute_flops_per_token,
)
from model.parcae import ParcaeLM, build_model
from model.sampling import loop_generator, sample_loop_counts, seeded_generator
from model.weights import WeightsError, load_pretrained, load_reference, save_reference

__all__ = [
    "ParcaeConfig",
    "ParcaeLM",
    "WeightsError",
    "build_model",
    "count_params",
    "hardware_flops_per_token",
    "load_pretrained",
    "load_reference",
    "loop_generator",
    "paper_flops_per_token",
    "recompute_flops_per_token",
    "sample_loop_counts",
    "save_reference",
    "seeded_generator",
]
