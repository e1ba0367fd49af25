"""Every shipped job spec validates, round-trips through its saved form, and matches the brief."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import ParcaeLM
from model.config import ParcaeConfig, count_params, hardware_flops_per_token, paper_flops_per_token
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


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_flops_per_token_of_every_shipped_config(path):
    """The paper's convention, computed here from the real module's parameters: 6 N_other + (2 R + 4 B) x the
    core blocks + attention (4 d L per layer forward, x3 outside the core, (R + 2 B) x inside it), N_other =
    all parameters - the token embedding - the core blocks. The hardware count adds the head's matmul and
    leaves the embedding tables out."""
    spec = load_spec(path, environ={}).spec
    cfg = spec.model.build()
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # the tied head counted once
    embedding = model.transformer.wte.weight.numel()
    tables = sum(p.numel() for n, p in model.named_parameters() if "value_embeds" in n)
    attention = 4 * cfg.d_model * spec.data.seq_len
    if cfg.looped:
        r, b = cfg.mean_recurrence, cfg.mean_backprop_depth
        core = sum(p.numel() for p in model.transformer.recurrence.core_block.parameters())
        injection = sum(p.numel() for p in model.transformer.recurrence.adapter.parameters())
        outside, inside = cfg.num_unique_layers - cfg.n_core, cfg.n_core
        paper = 6 * (total - embedding - core) + (2 * r + 4 * b) * core
        paper += 3 * attention * outside + (r + 2 * b) * attention * inside
        hardware = 6 * (total - tables - core - injection) + (2 * r + 4 * b) * (core + injection)
        hardware += 3 * attention * outside + (r + 2 * b) * attention * inside
    else:
        paper = 6 * (total - embedding) + 3 * attention * cfg.n_layers
        hardware = 6 * (total - tables) + 3 * attention * cfg.n_layers
    assert paper_flops_per_token(cfg, spec.data.seq_len) == pytest.approx(paper, rel=1e-12)
    assert hardware_flops_per_token(cfg, spec.data.seq_len) == pytest.approx(hardware, rel=1e-12)
    if path.stem == "parcae-140m":
        assert paper == pytest.approx(1.36e9, rel=0.01) and hardware == pytest.approx(1.07e9, rel=0.01)


RELEASED_OPTIMIZER = {  # the released runs: Muon lr, AdamW lr
    "140m": (8e-3, 8e-3),
    "370m": (8e-3, 8e-3),
    "770m": (8e-3, 6e-3),
    "1.3b": (8e-3, 6e-3),
}


@pytest.mark.parametrize("size", sorted(RELEASED_OPTIMIZER))
@pytest.mark.parametrize("arch", ["parcae", "gpt"])
def test_shipped_optimizers_are_the_released_recipe(arch, size):
    opt = load_spec(CONFIGS / f"{arch}-{size}.yaml", environ={}).spec.optimizer
    muon_lr, adam_lr = RELEASED_OPTIMIZER[size]
    assert opt.name == "muon" and opt.lr == muon_lr and opt.adam_lr == adam_lr
    assert (opt.betas, opt.eps, opt.weight_decay) == ((0.8, 0.95), 1e-10, 0.0)  # AdamW: no decay
    assert (opt.muon_weight_decay, opt.muon_momentum, opt.muon_beta2) == (0.2, 0.95, 0.95)
    assert (opt.muon_momentum_warmup_start, opt.muon_momentum_warmup_steps, opt.grad_clip) == (0.85, 300, 1.0)
