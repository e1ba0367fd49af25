"""`parcae import`: take reference-format weights into the pipeline, checked against a job spec."""

from __future__ import annotations

from pathlib import Path

import torch

from model import WeightsError, count_params, load_pretrained, save_reference
from pipeline.errors import ParcaeError
from pipeline.spec_io import load_spec


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


def load_checkpoint_model(checkpoint_dir: str, tag: str | None = None):
    """A run's sharded DeepSpeed checkpoint consolidated in this process: (model in fp32, its spec, tag)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from model.parcae import ParcaeLM
    from pipeline import checkpoint

    tag = tag or checkpoint.latest_tag(checkpoint_dir)
    if tag is None:
        raise ParcaeError(
            f"{checkpoint_dir}: no checkpoint (no {checkpoint.LATEST} file); pass the run's checkpoint.dir"
        )
    if checkpoint.is_remote(checkpoint_dir):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="parcae-checkpoint-") as tmp:
            checkpoint.fetch(checkpoint_dir, tag, Path(tmp))
            model, spec, _ = load_checkpoint_model(tmp, tag)
        return model, spec, tag
    spec_file = Path(checkpoint_dir) / tag / "spec.yaml"
    if not spec_file.is_file():
        raise ParcaeError(f"{spec_file}: missing; this does not look like a checkpoint written by `parcae train`")
    spec = load_spec(spec_file).spec
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    with torch.device("meta"):
        model = ParcaeLM(spec.model.build())
    model.to_empty(device="cpu")
    from model.weights import from_reference

    # checkpoints written before the recurrence became one module hold the reference names
    state = {from_reference(name, model.cfg.core_layers): t for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ParcaeError(
            f"{checkpoint_dir}/{tag}: does not match its own spec (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, spec, tag


def export_checkpoint(checkpoint_dir: str, out: str, tag: str | None) -> int:
    """A sharded DeepSpeed checkpoint of a run -> one fp32 safetensors file in the reference naming."""
    model, _, tag = load_checkpoint_model(checkpoint_dir, tag)
    save_reference(model, out)
    total = sum(p.numel() for p in model.parameters())
    print(f"exported {checkpoint_dir}/{tag} -> {out}: {total / 1e6:.2f}M parameters, fp32, reference naming")
    return 0
