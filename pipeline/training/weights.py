"""Weights in and out of runs: released or reference-format weights checked and written with their config
(`parcae import`), a run's sharded DeepSpeed checkpoint consolidated into one model (`parcae export`, `eval`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from data_prep.storage import S3Options, is_s3, open_store, write_text
from model import ParcaeConfig, ParcaeLM, WeightsError, count_params, empty_model, load_pretrained, save_reference
from model.weights import config_differences, from_reference, load_state, read_weights
from parcae_errors import ParcaeError, UsageError
from pipeline.jobspec import JobSpec, ModelSpec, load_spec
from pipeline.training import checkpoint


def import_weights(
    weights: str, cfg: ParcaeConfig | None, out: str, loops: int, options: S3Options | None = None
) -> str:
    """Load weights (a released model directory of the reference implementation, local or s3://; a
    safetensors file; a torch state dict file) into the model their config describes (or ``cfg``, which
    must then agree with it), check a forward with ``loops`` loops is finite, and write them with their
    config, and beside them ``OUT.model.yaml``, the job spec's model section. Returns a summary line."""
    if loops < 1:
        raise UsageError(f"--loops must be >= 1, got {loops}")
    with tempfile.TemporaryDirectory(prefix="parcae-import-") as tmp:
        local = _local_copy(weights, Path(tmp), options)
        model = load_pretrained(cfg, local) if cfg is not None else load_pretrained(local)
    cfg = model.cfg
    ids = torch.arange(16).remainder(cfg.vocab_size).unsqueeze(0)
    with torch.no_grad():
        kwargs = {"loops": loops, "h0": torch.zeros(1, 16, cfg.d_model)} if cfg.looped else {}
        logits = model(ids, **kwargs)
    if not torch.isfinite(logits).all():
        raise ParcaeError(f"{weights}: a forward with {loops} loops gives non-finite logits; refusing to import")
    save_reference(model, out)
    fields = ModelSpec.model_construct(**dataclasses.asdict(cfg)).model_dump(mode="json")  # only what applies
    section = yaml.safe_dump({"model": fields}, sort_keys=False)
    model_yaml = Path(out).with_suffix(".model.yaml")
    write_text(model_yaml, section)
    total = count_params(cfg)["total"]
    return (
        f"imported {weights} -> {out}: {total / 1e6:.1f}M parameters, smoke forward with {loops} loops finite; "
        f"the job spec's model section: {model_yaml}"
    )


def initial_weights(source: str, cfg: ParcaeConfig, options: S3Options | None = None) -> dict[str, torch.Tensor]:
    """``checkpoint.init_from``: the weights at ``source`` (any form `parcae import` reads, local or s3://)
    as a state dict of the model ``cfg`` describes, refused by name when they are another model's."""
    with tempfile.TemporaryDirectory(prefix="parcae-init-") as tmp:
        local = _local_copy(source, Path(tmp), options)
        stored, tensors = read_weights(local)
        if stored is not None and stored != cfg:
            raise ParcaeError(
                f"checkpoint.init_from: {source} holds another model than this spec's model section: "
                f"{config_differences(stored, cfg)}"
            )
        model = empty_model(cfg)
        try:
            load_state(model, tensors, source)
        except WeightsError as exc:
            exc.add_note("(checkpoint.init_from must be weights of this spec's model section)")
            raise
    return model.state_dict()


def _local_copy(source: str, tmp: Path, options: S3Options | None = None) -> Path:
    """``source`` itself, or for an s3:// prefix (a released directory) or object its download into ``tmp``."""
    if not is_s3(source):
        path = Path(source)
        if not path.exists():
            raise ParcaeError(f"{source}: no such weights file or directory")
        return path
    options = options or S3Options.from_env()
    store = open_store(source, options)
    names = store.list()
    if not names:  # a single object: its parent prefix and name
        parent, _, name = source.rstrip("/").rpartition("/")
        store = open_store(parent, options)
        if not store.exists(name):
            raise ParcaeError(f"{source}: no such weights object or prefix (a released directory or a weights file)")
        target = tmp / name
        target.write_bytes(store.get_bytes(name))
        return target
    for name in names:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get_bytes(name))
    return tmp


def load_checkpoint_model(
    checkpoint_dir: str, tag: str | None = None, options: S3Options | None = None
) -> tuple[ParcaeLM, JobSpec, str]:
    """A run's sharded DeepSpeed checkpoint (local, or s3:// through ``options``) consolidated in this process:
    (model in fp32, its spec, tag)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or checkpoint.latest_tag(checkpoint_dir, options)
    if tag is None:
        raise ParcaeError(
            f"{checkpoint_dir}: no checkpoint (no {checkpoint.LATEST} file); pass the run's checkpoint.dir"
        )
    if is_s3(checkpoint_dir):
        with tempfile.TemporaryDirectory(prefix="parcae-checkpoint-") as tmp:
            if tag not in checkpoint.complete_tags(checkpoint_dir, options):
                available = ", ".join(checkpoint.complete_tags(checkpoint_dir, options)) or "none"
                raise ParcaeError(f"--tag {tag}: no complete checkpoint of that name in {checkpoint_dir} ({available})")
            checkpoint.fetch(checkpoint_dir, tag, Path(tmp), options)
            model, spec, _ = load_checkpoint_model(tmp, tag)
        return model, spec, tag
    spec_file = Path(checkpoint_dir) / tag / "spec.yaml"
    if not spec_file.is_file():
        raise ParcaeError(f"{spec_file}: missing; this does not look like a checkpoint written by `parcae train`")
    spec = load_spec(spec_file).spec
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress: stdout stays the command's
            state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    except Exception as exc:  # a damaged file: name it, and the checkpoint to use instead
        earlier = [t for t in checkpoint.complete_tags(checkpoint_dir) if t < tag]
        where = f"{checkpoint_dir}/{tag}"
        raise checkpoint.unreadable(where, Path(checkpoint_dir) / tag, exc, earlier, "pass --tag {tag}") from None
    model = empty_model(spec.model.build())
    # checkpoints written before the recurrence became one module hold the reference names
    state = {from_reference(name, model.cfg.core_layers): t for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ParcaeError(
            f"{checkpoint_dir}/{tag}: does not match its own spec (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return model, spec, tag


def export_checkpoint(checkpoint_dir: str, out: str, tag: str | None, options: S3Options | None = None) -> str:
    """A sharded DeepSpeed checkpoint of a run -> one fp32 safetensors file in the reference naming."""
    model, _, tag = load_checkpoint_model(checkpoint_dir, tag, options)
    save_reference(model, out)
    total = sum(p.numel() for p in model.parameters())
    return f"exported {checkpoint_dir}/{tag} -> {out}: {total / 1e6:.2f}M parameters, fp32, reference naming"
