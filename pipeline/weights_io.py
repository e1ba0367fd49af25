"""`parcae import`: take reference-format weights into the pipeline, checked against a job spec."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from model import WeightsError, count_params, load_pretrained, save_reference
from pipeline.errors import ParcaeError
from pipeline.spec_io import load_spec

log = logging.getLogger(__name__)


def import_weights(weights: str, spec_path: str, overrides: list[str], out: str, loops: int) -> int:
    cfg = load_spec(spec_path, overrides).spec.model.build()
    if not Path(weights).is_file():
        raise ParcaeError(f"{weights}: no such weights file")
    if loops < 1:
        raise ParcaeError(f"--loops must be >= 1, got {loops}")
    try:
        model = load_pretrained(cfg, weights)
    except WeightsError as exc:
        raise ParcaeError(f"{exc}\n(the model comes from {spec_path}: model section)") from None
    ids = torch.arange(16).remainder(cfg.vocab_size).unsqueeze(0)
    with torch.no_grad():
        kwargs = {"loops": loops, "h0": torch.zeros(1, 16, cfg.d_model)} if cfg.looped else {}
        logits = model(ids, **kwargs)
    if not torch.isfinite(logits).all():
        raise ParcaeError(f"{weights}: a forward with {loops} loops gives non-finite logits; refusing to import")
    save_reference(model, out)
    total = count_params(cfg)["total"]
    print(f"imported {weights} -> {out}: {total / 1e6:.1f}M parameters, smoke forward with {loops} loops finite")
    return 0
