"""Shared fixtures. Tests mirror the package tree: tests/model, tests/pipeline, tests/data_prep."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# Everything runs on CPU here; keep DeepSpeed off any accelerator probing.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def repo() -> Path:
    return REPO


def parcae_cmd() -> list[str]:
    """The installed entry point, run the way a user runs it (a fresh interpreter)."""
    return [sys.executable, "-m", "pipeline"]
