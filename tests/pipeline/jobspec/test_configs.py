"""Every shipped job spec validates, round-trips through its saved form, and matches the brief."""

from __future__ import annotations

import dataclasses

import pytest

from model.config import ParcaeConfig, count_params
from pipeline.jobspec import ModelSpec, load_spec
from tests.conftest import CONFIGS

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_the_released_sizes_and_demo_are_shipped():
    names = {p.stem for p in SHIPPED}
    for size in ("140m", "370m", "770m", "1.3b"):
        assert f"parcae-{size}" in names and f"gpt-{size}" in names
    assert "demo-tiny" in names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_validates_and_round_trips(path, tmp_path):
    loaded = load_spec(path, environ={})
    assert loaded.spec.name == path.stem
    saved = loaded.save(tmp_path / "resolved.yaml")
    assert load_spec(saved, environ={}).spec == loaded.spec


@pytest.mark.parametrize(
    "size, params, value_embeddings",
    [
        ("140m", 144.3e6, 75.5e6),
        ("370m", 388.0e6, 201.3e6),
        ("770m", 776.7e6, 377.5e6),
        ("1.3b", 1338.6e6, 604e6),
    ],
)
def test_released_parcae_sizes_match_the_brief(size, params, value_embeddings):
    counts = count_params(load_spec(CONFIGS / f"parcae-{size}.yaml", environ={}).spec.model.build())
    assert abs(counts["total"] - params) / params < 1e-3
    assert abs(counts["value_embeddings"] - value_embeddings) / value_embeddings < 1e-3


def test_model_spec_and_model_config_have_the_same_fields():
    spec_fields = set(ModelSpec.model_fields)
    config_fields = {f.name for f in dataclasses.fields(ParcaeConfig)}
    assert spec_fields == config_fields
    defaults = ModelSpec().build()
    assert defaults == ParcaeConfig()
