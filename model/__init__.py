"""The Parcae looped language model and its baselines. Imports torch and its own config only."""

from model.config import ParcaeConfig, count_params, flops_per_token

__all__ = ["ParcaeConfig", "count_params", "flops_per_token"]
