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

from model.config import VOCAB_MULTIPLE, ParcaeConfig
from model.parcae import ParcaeLM
from parcae_errors import ParcaeError

log = logging.getLogger(__name__)

FORMAT = "parcae-reference"
_PREFIXES = ("_orig_mod.", "module.")


class WeightsError(ParcaeError):
    """A weights file that does not fit the model: the message names the file and the keys."""


_RECURRENCE = "transformer.recurrence."


def to_reference(name: str) -> str:
    """Our parameter name -> the reference implementation's."""
    if name.startswith(_RECURRENCE):
        rest = name[len(_RECURRENCE) :]
        return rest if rest.startswith("value_embeds.") else "transformer." + rest
    return name


def from_reference(name: str, core_layers: range) -> str:
    """The reference implementation's parameter name -> ours (``core_layers``: the core's layer indices)."""
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


def normalize_names(tensors: dict[str, torch.Tensor], source: str | Path = "weights") -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in tensors.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if name == "transformer.adapter.B.weight":
            name = "transformer.adapter.B"
        out[name] = tensor
    out.pop("freqs_cis", None)  # the reference's RoPE table: recomputed here
    out.pop("transformer.freqs_cis", None)
    head = out.pop("lm_head.weight", None)
    if head is not None and "transformer.wte.weight" in out and not torch.equal(head, out["transformer.wte.weight"]):
        raise WeightsError(f"{source}: lm_head.weight differs from transformer.wte.weight, but this model ties them")
    return out


def load_state(model: ParcaeLM, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load reference-named ``tensors`` into ``model`` exactly: every key present, no extra key, every shape
    equal, every tensor floating point; the message names ``source`` and the keys that did not fit."""
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
        cfg = released_config(raw, config_file)
        weights = next((path / n for n in RELEASED_WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise WeightsError(f"{path}: no weights file ({' or '.join(RELEASED_WEIGHT_FILES)})")
        return cfg, normalize_names(_torch_state(weights), weights)
    if path.suffix in (".pt", ".bin", ".pth"):
        return None, normalize_names(_torch_state(path), path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: cannot read as safetensors: {exc}") from None
    return read_config(path), normalize_names(tensors, path)


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
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    model.to_empty(device=device)
    load_state(model, tensors, path)
    return model


def config_differences(theirs: ParcaeConfig, ours: ParcaeConfig) -> str:
    """``field: theirs vs ours`` for every field that differs."""
    a, b = dataclasses.asdict(theirs), dataclasses.asdict(ours)
    return "; ".join(f"{k}: {a[k]!r} in the weights, {b[k]!r} given" for k in a if a[k] != b[k])


# ------------------------------------------------------------------------------------------------
# The reference implementation's released directories: config.json -> ParcaeConfig
RELEASED_WEIGHT_FILES = ("model.pt", "pytorch_model.bin")
# Fields of the reference's config.json that do not change the computation of a forward pass.
RELEASED_IGNORED = {
    "_class_name", "name", "hf_config", "attn_impl", "init_strategy", "init_orthogonal", "rope_settings",
    "sampling_scheme", "mean_recurrence", "mean_backprop_depth", "state_init", "lockstep_n", "lockstep_k",
    "activation_checkpoint_impl", "simple_ops", "strategy", "init_values", "architecture_class_name",
}  # fmt: skip
RELEASED_MAPPED = {
    "n_embd", "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "bias", "tie_embeddings",
    "logit_softcap", "qk_norm", "prelude_norm", "nonlin_name", "padding_multiple", "padded_vocab_size", "vocab_size",
    "recurrent_iteration_method", "block_size", "norm_eps", "n_layers_in_prelude", "n_layers_in_recurrent_block",
    "n_layers_in_coda", "recurrent_embedding_dimension", "recurrent_intermediation_embedding_dimension",
    "injection_type", "n_layer", "n_layers",
}  # fmt: skip
_INJECTIONS = {"diagonal": "diagonal", "parcae": "diagonal", "add": "add", "additive": "add", "concat": "concat"}
_RELU2 = {"relu2", "relu_squared", "squared_relu", "relusquared", "relusq", "relu^2"}


def released_config(raw: dict[str, Any], source: str | Path) -> ParcaeConfig:
    """The ParcaeConfig of a released model's config.json. Every field that changes the computation is
    mapped, or refused naming the field, its value and what this model supports (grouped-query attention,
    biases, an untied head, a logit soft-cap, other widths or activations are not this architecture)."""
    problems: list[str] = []

    def field(name: str, default: Any = None) -> Any:
        return raw.get(name, default)

    def require(name: str, ok: bool, supported: str) -> None:
        if not ok:
            problems.append(f"{name}: {field(name)!r} (this model supports {supported})")

    kind = field("_class_name", "ParcaeConfig")
    require("_class_name", kind in ("ParcaeConfig", "GPTConfig"), "ParcaeConfig or GPTConfig")
    d = field("n_embd")
    heads = field("num_attention_heads", field("n_head"))
    require("n_embd", isinstance(d, int) and d > 0, "a positive width")
    require("num_attention_heads", isinstance(heads, int) and heads > 0, "a positive head count")
    if problems:
        raise WeightsError(f"{source}: not a Parcae config: " + "; ".join(problems))
    require("num_key_value_heads", field("num_key_value_heads", heads) == heads, f"{heads}: no grouped-query attention")
    require("intermediate_size", field("intermediate_size", 4 * d) == 4 * d, f"4 x n_embd = {4 * d}")
    require("bias", not field("bias", False), "false: no biases")
    require("tie_embeddings", field("tie_embeddings", True), "true: the LM head is the embedding")
    require("logit_softcap", not field("logit_softcap"), "none: no logit soft-cap")
    require("qk_norm", field("qk_norm", True), "true: RMS-normed queries and keys")
    require("prelude_norm", field("prelude_norm", True) or kind == "GPTConfig", "true: the normed injected signal")
    nonlin = str(field("nonlin_name", "relu2")).lower().replace("-", "_")
    require("nonlin_name", nonlin in _RELU2, "ReLU^2")
    require("padding_multiple", field("padding_multiple", VOCAB_MULTIPLE) == VOCAB_MULTIPLE, str(VOCAB_MULTIPLE))
    method = field("recurrent_iteration_method", "per-sequence")
    require("recurrent_iteration_method", "token" not in str(method), "per-sequence recurrence, not per-token")
    values: dict[str, Any] = {"d_model": d, "n_head": heads, "vocab_size": field("vocab_size")}
    values.update(max_seq_len=field("block_size", 2048), norm_eps=field("norm_eps", 1e-5), rope_base=50000.0)
    if kind == "ParcaeConfig":
        for ours, theirs in (("n_prelude", "n_layers_in_prelude"), ("n_core", "n_layers_in_recurrent_block")):
            values[ours] = field(theirs)
        values["n_coda"] = field("n_layers_in_coda")
        rec = field("recurrent_embedding_dimension", d)
        require("recurrent_embedding_dimension", rec == d, f"n_embd = {d}: the state has the model's width")
        inter = field("recurrent_intermediation_embedding_dimension", d)
        require("recurrent_intermediation_embedding_dimension", inter in (d, None), f"n_embd = {d}")
        injection = _INJECTIONS.get(str(field("injection_type", "diagonal")).lower())
        require("injection_type", injection is not None, ", ".join(sorted(_INJECTIONS)))
        values["injection"] = injection or "diagonal"
        values.update(mean_recurrence=field("mean_recurrence", 8), mean_backprop_depth=field("mean_backprop_depth", 4))
        state_init = str(field("state_init", "like-init")).lower()
        require("state_init", state_init in ("like-init", "like_init", "zero", "zeros"), "like-init or zero")
        values["h0_init"] = "zeros" if state_init.startswith("zero") else "like_init"
    else:
        values.update(arch="gpt", n_layers=field("n_layer", field("n_layers")))
    padded = field("padded_vocab_size")
    if padded is not None and isinstance(values["vocab_size"], int):
        expected = -(-values["vocab_size"] // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        require("padded_vocab_size", padded == expected, f"vocab_size rounded up to a multiple of 64 = {expected}")
    if problems:
        raise WeightsError(f"{source}: this architecture cannot run the released model: " + "; ".join(problems))
    unknown = sorted(set(raw) - RELEASED_MAPPED - RELEASED_IGNORED)
    if unknown:  # the weights' shapes are still checked one by one when they load
        log.warning("%s: fields this pipeline does not know, taken not to change the computation: %s", source, unknown)
    cfg = ParcaeConfig(**values)
    if cfg.problems():
        raise WeightsError(f"{source}: " + "; ".join(f"{p.field}: {p.message}" for p in cfg.problems()))
    return cfg
