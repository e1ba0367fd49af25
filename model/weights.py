"""Weights in the reference implementation's naming, as safetensors.

The reference names are ``transformer.wte.weight``, ``transformer.prelude.N...``,
``transformer.adapter.A_log|dt_bias|B``, ``transformer.core_block.N...``, ``transformer.C.weight``,
``transformer.coda.N...``, ``transformer.ln_f.weight``, ``transformer.ln_prelude.weight``,
``value_embeds.N.weight``; ``attn.c_q|c_k|c_v|c_proj|ve_gate``, ``mlp.fc|proj``, ``norm_1|norm_2``.
Ours differ only in that the looped part lives in one module, ``transformer.recurrence`` (adapter,
core_block and the core's value embeddings): `to_reference` and `from_reference` map one to one.
Loading also accepts the spellings other tooling writes (``transformer.adapter.B.weight``, an
explicit ``lm_head.weight`` equal to the tied embedding, a ``_orig_mod.`` or ``module.`` prefix) and
refuses anything else with the names that did not fit.

A notebook loads released weights like this::

    from model import ParcaeConfig, load_pretrained
    model = load_pretrained(ParcaeConfig(), "parcae-140m.safetensors")
    logits = model(ids, loops=16, h0=torch.zeros(*ids.shape, model.cfg.d_model))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ParcaeConfig
from model.errors import WeightsError
from model.parcae import ParcaeLM, empty_model
from model.released import WEIGHT_FILES, check_rope_table, released_config

log = logging.getLogger(__name__)

FORMAT = "parcae-reference"
_PREFIXES = ("_orig_mod.", "module.")


_RECURRENCE = "transformer.recurrence."


# The concat (RDM) injection: one matrix here, the reference's LinearInjection wraps a Linear named "adapter".
_CONCAT_OURS, _CONCAT_THEIRS = "adapter.weight", "transformer.adapter.adapter.weight"


def to_reference(name: str) -> str:
    """Our parameter name -> the reference implementation's."""
    if name.startswith(_RECURRENCE):
        rest = name[len(_RECURRENCE) :]
        if rest == _CONCAT_OURS:
            return _CONCAT_THEIRS
        return rest if rest.startswith("value_embeds.") else "transformer." + rest
    return name


def from_reference(name: str, core_layers: range) -> str:
    """The reference implementation's parameter name -> ours (``core_layers``: the core's layer indices)."""
    if name == _CONCAT_THEIRS:
        return _RECURRENCE + _CONCAT_OURS
    if name.startswith(("transformer.adapter.", "transformer.core_block.")):
        return _RECURRENCE + name[len("transformer.") :]
    if name.startswith("value_embeds.") and name.split(".")[1].isdigit() and int(name.split(".")[1]) in core_layers:
        return _RECURRENCE + name
    return name


def reference_state_dict(model: ParcaeLM) -> dict[str, torch.Tensor]:
    return {to_reference(name): t for name, t in model.state_dict().items()}


def save_reference(model: ParcaeLM, path: str | Path) -> Path:
    """Write the model's weights (fp32 unless they are already another float type) and config.

    Written to a temporary name in the destination folder and renamed when complete (nothing partial
    is ever left), with the usual permissions (0666 less the umask); failures name the path."""
    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in reference_state_dict(model).items()}
    metadata = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(model.cfg))}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory; name a .safetensors file")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.replace(path)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WeightsError(f"{path}: cannot write: {getattr(exc, 'strerror', None) or exc}") from None
    return path


def read_config(path: str | Path) -> ParcaeConfig | None:
    """The config stored in a file we wrote, or None for files from other tooling."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: cannot read as safetensors: {exc}") from None
    if "config" not in metadata:
        return None
    return ParcaeConfig(**json.loads(metadata["config"]))


_SPELLINGS = {
    "transformer.adapter.B.weight": "transformer.adapter.B",
    "transformer.adapter.weight": _CONCAT_THEIRS,  # our own files before the concat injection took the reference's name
}


def normalize_names(tensors: dict[str, torch.Tensor], source: str | Path = "weights") -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        name = _SPELLINGS.get(name, name)
        out[name] = tensor
    if "transformer.freqs_cis" in out:
        out["freqs_cis"] = out.pop("transformer.freqs_cis")
    out.pop("transformer.abacus.weight", None)  # the reference's GPT builds it with use_abacus; no forward reads it
    head = out.pop("lm_head.weight", None)
    if head is not None and "transformer.wte.weight" in out and not torch.equal(head, out["transformer.wte.weight"]):
        raise WeightsError(f"{source}: lm_head.weight differs from transformer.wte.weight, but this model ties them")
    return out


def load_state(model: ParcaeLM, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load reference-named ``tensors`` into ``model`` exactly: every key present, no extra key, every shape
    equal, every tensor floating point; the message names ``source`` and the keys that did not fit."""
    tensors = dict(tensors)
    table = tensors.pop("freqs_cis", None)  # the reference's RoPE table, saved with its weights
    if table is not None:
        check_rope_table(table, model.cfg, source)
    expected = reference_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(tensors) & set(expected))
        if tensors[k].shape != expected[k].shape
    ]
    not_float = [f"{k}: {t.dtype}" for k, t in sorted(tensors.items()) if not t.is_floating_point()]
    if not_float:
        raise WeightsError(
            f"{source}: weights must be floating point (fp32, bf16 or fp16); "
            f"{', '.join(not_float[:8])}{' ...' if len(not_float) > 8 else ''}"
        )
    if missing or unexpected or wrong:
        lines = [f"{source}: does not fit the model ({model.cfg.arch}, d_model {model.cfg.d_model})"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
            lines.append(f"  unexpected ({len(unexpected)}): {shown}")
        lines += [f"  shape {w}" for w in wrong[:8]]
        raise WeightsError("\n".join(lines))
    core = model.cfg.core_layers
    model.load_state_dict({from_reference(k, core): t for k, t in tensors.items()}, strict=True)


def read_weights(path: str | Path) -> tuple[ParcaeConfig | None, dict[str, torch.Tensor]]:
    """(config or None, reference-named tensors) of a safetensors file (ours carry their config), a
    released directory of the reference implementation (``config.json`` + ``model.pt`` or
    ``pytorch_model.bin``), or a bare ``torch.save``d state dict file (no config)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise WeightsError(f"{path}: a released model directory holds config.json; it is missing")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{config_file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(raw, dict) and raw.get("model_type") == "parcae":  # our own `parcae export --format hf`
            return _hf_export(path, raw)
        cfg = released_config(raw, config_file)
        weights = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise WeightsError(f"{path}: no weights file ({' or '.join(WEIGHT_FILES)})")
        return cfg, normalize_names(_torch_state(weights), weights)
    if path.suffix in (".pt", ".bin", ".pth"):
        return None, normalize_names(_torch_state(path), path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: cannot read as safetensors: {exc}") from None
    return read_config(path), normalize_names(tensors, path)


def _hf_export(path: Path, raw: dict[str, Any]) -> tuple[ParcaeConfig, dict[str, torch.Tensor]]:
    """A directory `parcae export --format hf` wrote: our config's fields in config.json, our parameter names
    in model.safetensors."""
    fields = {f.name for f in dataclasses.fields(ParcaeConfig)}
    try:
        cfg = ParcaeConfig(**{k: v for k, v in raw.items() if k in fields})
        cfg.check()
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path / 'config.json'}: not a config this version reads: {exc}") from None
    file = path / "model.safetensors"
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{file}: cannot read as safetensors: {exc}") from None
    return cfg, normalize_names({to_reference(k): t for k, t in tensors.items()}, file)


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle that weights_only refuses
        raise WeightsError(f"{path}: cannot read as a torch state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state_dict, ...}
        state = state["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(t) for t in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return dict(state)


def load_reference(model: ParcaeLM, path: str | Path) -> None:
    """Load weights in the reference naming (any form `read_weights` reads) into ``model`` exactly."""
    load_state(model, read_weights(path)[1], path)


def load_pretrained(
    cfg_or_path: ParcaeConfig | str | Path | None, path: str | Path | None = None, device: str | torch.device = "cpu"
) -> ParcaeLM:
    """The model, built and loaded: ``load_pretrained(PATH)`` takes the config from the file (our safetensors)
    or the directory (a released model's config.json); ``load_pretrained(cfg, PATH)`` builds ``cfg`` and
    refuses weights whose own config differs from it."""
    if path is None:
        cfg, path = None, cfg_or_path
    else:
        cfg = cfg_or_path  # type: ignore[assignment]
    assert path is not None
    stored, tensors = read_weights(path)
    if cfg is not None and stored is not None and cfg != stored:
        raise WeightsError(f"{path}: its config differs from the one given: {config_differences(stored, cfg)}")
    cfg = cfg or stored
    if cfg is None:
        raise WeightsError(f"{path}: holds no model config; pass the ParcaeConfig of the released size")
    model = empty_model(cfg, device)
    load_state(model, tensors, path)
    return model


def config_differences(theirs: ParcaeConfig, ours: ParcaeConfig) -> str:
    """``field: theirs vs ours`` for every field that differs."""
    a, b = dataclasses.asdict(theirs), dataclasses.asdict(ours)
    return "; ".join(f"{k}: {a[k]!r} in the weights, {b[k]!r} given" for k in a if a[k] != b[k])
