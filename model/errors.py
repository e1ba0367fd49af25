"""The model package's user-facing error (the project's root is `parcae_errors.ParcaeError`)."""

from __future__ import annotations

from parcae_errors import ParcaeError


class WeightsError(ParcaeError):
    """Weights or a released config that do not fit the model: the message names the file, the keys or fields."""
