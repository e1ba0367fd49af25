"""The reference implementation's released directories: ``config.json`` -> ParcaeConfig.

The reference (sandyresearch/parcae) writes a model directory with ``parcae_lm.save_pretrained``
(``dataclasses.asdict`` of its config plus ``_class_name``, weights in ``model.pt``) or with its evaluation
package's ``ModelingParcae.save_pretrained`` (the same fields without ``_class_name``, weights in
``pytorch_model.bin``). Its loaders build the config class from the JSON as it stands, so a field the file
leaves out takes the reference's dataclass default: `REFERENCE_DEFAULTS` holds those, read from
``parcae_lm/models/config.py`` (``Config``), ``parcae_lm/models/parcae/config.py`` (``ParcaeConfig``) and
``parcae_lm/models/gpt/config.py`` (``GPTConfig``).

Every field of those classes is in exactly one of three places here:

- `released_config` maps it onto a ParcaeConfig field, or checks that its value is one this model
  computes and refuses it otherwise, naming the field, the value and what is supported;
- `NOT_COMPUTING` lists the fields that do not change what a forward pass computes, each with the reason
  read in the reference's code; they are accepted silently whatever their value;
- anything else (a field the reference does not define) is named in a warning: the weights' names and
  shapes are still checked one by one when they load.

What the reference computes and this model does not (each refused when set): grouped-query attention,
biases (``bias``, ``qk_bias``), clipped q/k/v, an untied head, a logit soft-cap, other norms, MLPs, blocks
or activations than RMSNorm / BaseMLP / TransformerPreNormBlock / ReLU2, RoPE turned off or condensed,
random training positions, init strategies that scale the embedding or the logits (or draw h_0 with
another std), muP width scaling, a core with other widths or heads than the prelude's, other depth samplers
than per-sequence ``poisson-truncated-full``, and value-embedding gates on other layers than their tables.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from model.config import VOCAB_MULTIPLE, ParcaeConfig
from model.errors import WeightsError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.pt", "pytorch_model.bin")


# The reference's dataclass defaults (sandyresearch/parcae, parcae_lm/models/config.py and the two subclasses).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "name": "", "hf_config": {}, "block_size": 4096, "n_embd": 4096, "intermediate_size": None,
    "num_attention_heads": 32, "num_key_value_heads": None, "vocab_size": 50254, "padding_multiple": 512,
    "padded_vocab_size": None,
    "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50_000},
    "use_abacus": False, "randomize_positions_from": None, "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "LayerNorm", "attn_impl": "flash", "norm_eps": 1e-5, "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU", "bias": False, "qk_bias": False, "init_strategy": "scaled", "init_orthogonal": False,
    "skip_initialization": False, "mup_model_scaling_factor": 1, "use_fused_head": "pytorch",
    "debias_attention": False, "center_attention": False, "clip_qkv": None, "qk_norm": False,
    "logit_softcap": None, "activation_checkpoint_impl": "per-block", "simple_ops": False, "strategy": "single",
}  # fmt: skip
PARCAE_DEFAULTS: dict[str, Any] = {
    "injection_type": "diagonal", "n_layers_in_recurrent_block": 4, "n_layers_in_prelude": 1,
    "n_layers_in_coda": 1, "state_init": "like-init", "recurrent_embedding_dimension": 1024,
    "recurrent_intermediation_embedding_dimension": 3520, "recurrent_num_attention_heads": None,
    "prelude_norm": False, "sampling_scheme": "poisson-truncated-full", "mean_recurrence": 32,
    "mean_backprop_depth": 8, "lockstep_n": False, "lockstep_k": False, "curriculum_target": "forward",
    "recurrent_iteration_method": "per-batch", "qk_norm": False, "activation_checkpoint_impl": "per-iteration",
    "tie_embeddings": False, "model_class_name": "Parcae", "_is_recurrent_block_config": False,
}  # fmt: skip
GPT_DEFAULTS: dict[str, Any] = {"n_layer": 16, "tie_embeddings": False}

# Fields that do not change what a forward pass computes, and why (read in the reference's code).
NOT_COMPUTING: dict[str, str] = {
    "_class_name": "which config class to build; read by released_config to tell Parcae from GPT",
    "architecture_class_name": "the registry's name for that class (Parcae, GPT); read likewise",
    "name": "a label",
    "hf_config": "where the weights are published",
    "attn_impl": "declared but never read: the reference's attention always calls its flash/SDPA backend",
    "init_orthogonal": "initialisation only; loaded weights replace it",
    "skip_initialization": "initialisation only; loaded weights replace it",
    "activation_checkpoint_impl": "which activations the backward recomputes; the values are the same",
    "strategy": "the training run's device strategy (a tensor-parallel state dict fails the shape check)",
    "debias_attention": "read only by the reference's attention-entropy monitor",
    "center_attention": "read only by the reference's attention-entropy monitor",
    "use_abacus": "builds a position table for the GPT baseline that no forward reads; it is dropped at load",
    "use_fused_head": "a fused kernel or PyTorch for the same head: logits x W^T times the logit scale",
    "lockstep_n": "whether ranks share their loop-count draws: which random numbers, not their distribution",
    "lockstep_k": "whether ranks share their loop-count draws: which random numbers, not their distribution",
    "curriculum_target": "read only with a curriculum sampling_scheme, which is refused",
    "init": "written by some tooling beside the fields; the reference's loaders drop it",
    "_recurrent_block_config": "written by some tooling beside the fields; the reference's loaders drop it",
}

# Init strategies of the reference (parcae_lm/utils/init.py, get_factor_table) under which its forward is this
# model's: no embedding or logit scale, no residual/skip scales, and h_0 (state_init like-init) drawn with the
# embedding std sqrt(2 / (5 d)). The released models use "scaled-zero".
INIT_STRATEGIES = ("scaled", "scaled-zero", "scaled-geiping", "scaled-stuck", "small")


def class_of(raw: dict[str, Any]) -> str:
    """ParcaeConfig or GPTConfig (or the unsupported name given): ``_class_name`` when present, else the
    fields (the evaluation package writes ParcaeConfig files without ``_class_name``)."""
    if "_class_name" in raw:
        return str(raw["_class_name"])
    if "architecture_class_name" in raw:  # a config dict of the reference's registry (parcae_lm/configs/)
        name = str(raw["architecture_class_name"])
        return {"Parcae": "ParcaeConfig", "GPT": "GPTConfig"}.get(name, name)
    return "ParcaeConfig" if "n_layers_in_recurrent_block" in raw else "GPTConfig"


def effective_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields the reference's loader would build its config from: defaults, then the file, then what its
    ``__post_init__`` derives (head counts, MLP width, padded vocabulary)."""
    kind = class_of(raw)
    f = {**REFERENCE_DEFAULTS, **(PARCAE_DEFAULTS if kind == "ParcaeConfig" else GPT_DEFAULTS), **raw}
    rope = {**REFERENCE_DEFAULTS["rope_settings"], **(raw.get("rope_settings") or {})}
    f["rope_settings"] = rope
    if f["num_key_value_heads"] is None:
        f["num_key_value_heads"] = f["num_attention_heads"]
    if f["intermediate_size"] is None and isinstance(f["n_embd"], int):
        f["intermediate_size"] = 4 * f["n_embd"]
    if f["padded_vocab_size"] is None and isinstance(f["vocab_size"], int) and isinstance(f["padding_multiple"], int):
        f["padded_vocab_size"] = -(-f["vocab_size"] // f["padding_multiple"]) * f["padding_multiple"]
    return f


def released_config(raw: dict[str, Any], source: str | Path) -> ParcaeConfig:
    """The ParcaeConfig of a released model's config.json: every field that changes the computation mapped,
    or refused naming the field, its value and what this model supports."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: a released config.json holds a JSON object; this holds {type(raw).__name__}")
    kind = class_of(raw)
    if kind not in ("ParcaeConfig", "GPTConfig"):
        raise WeightsError(f"{source}: not a Parcae config: _class_name: {kind!r} (ParcaeConfig or GPTConfig)")
    f = effective_fields(raw)
    problems: list[str] = []

    def require(name: str, ok: bool, supported: str, value: Any = None) -> None:
        if not ok:
            problems.append(f"{name}: {f[name] if value is None else value!r} (this model supports {supported})")

    d, heads = f["n_embd"], f["num_attention_heads"]
    if not (isinstance(d, int) and d > 0 and isinstance(heads, int) and heads > 0):
        raise WeightsError(
            f"{source}: not a Parcae config: n_embd: {d!r}, num_attention_heads: {heads!r} (positive integers)"
        )
    require("num_key_value_heads", f["num_key_value_heads"] == heads, f"{heads}: no grouped-query attention")
    require("intermediate_size", f["intermediate_size"] == 4 * d, f"4 x n_embd = {4 * d}")
    require("bias", f["bias"] is False, "false: no biases")
    require("qk_bias", f["qk_bias"] is False, "false: no query/key biases")
    require("clip_qkv", f["clip_qkv"] is None, "null: queries, keys and values are not clipped")
    require("tie_embeddings", f["tie_embeddings"] is True, "true: the LM head is the embedding")
    require("logit_softcap", f["logit_softcap"] is None, "null: no logit soft-cap")
    require("qk_norm", f["qk_norm"] is True, "true: RMS-normed queries and keys")
    require("block_class_name", f["block_class_name"] == "TransformerPreNormBlock", "TransformerPreNormBlock")
    require("mlp_class_name", f["mlp_class_name"] == "BaseMLP", "BaseMLP: fc -> ReLU^2 -> proj, no gate")
    require("nonlin_name", f["nonlin_name"] == "ReLU2", "ReLU2: 0.5 relu(x)^2")
    norm = "RMSNorm" if f["simple_ops"] else f["norm_class_name"]
    require("norm_class_name", norm == "RMSNorm", "RMSNorm", norm)
    rope = f["rope_settings"]
    require("rope_settings", rope.get("use_rope") is True, "use_rope true", {"use_rope": rope.get("use_rope")})
    condense = rope.get("rope_condense_ratio")
    require("rope_settings", condense == 1, "rope_condense_ratio 1", {"rope_condense_ratio": condense})
    rope_base = rope.get("rope_base")
    rope_ok = isinstance(rope_base, int | float) and not isinstance(rope_base, bool) and rope_base > 0
    require("rope_settings", rope_ok, "a positive rope_base", {"rope_base": rope_base})
    require("randomize_positions_from", f["randomize_positions_from"] is None, "null: positions 0, 1, 2, ...")
    require("mup_model_scaling_factor", f["mup_model_scaling_factor"] == 1, "1: no muP width scaling")
    require(
        "init_strategy",
        f["init_strategy"] in INIT_STRATEGIES,
        f"{', '.join(INIT_STRATEGIES)}: no embedding or logit scale, h_0 std sqrt(2 / (5 d))",
    )
    padded = f["padded_vocab_size"]
    vocab = f["vocab_size"]
    if isinstance(vocab, int) and isinstance(padded, int):
        ours = -(-min(vocab, padded) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        supported = f"the vocabulary rounded up to a multiple of {VOCAB_MULTIPLE} = {ours}"
        name = "padded_vocab_size" if "padded_vocab_size" in raw else "padding_multiple"
        require(name, padded == ours, supported, padded if name == "padded_vocab_size" else f["padding_multiple"])
        vocab = min(vocab, padded)  # the reference's own rule
    values: dict[str, Any] = {"d_model": d, "n_head": heads, "vocab_size": vocab}
    values.update(
        max_seq_len=f["block_size"], norm_eps=f["norm_eps"], rope_base=float(rope_base) if rope_ok else 50000.0
    )
    if kind == "ParcaeConfig":
        _parcae_fields(f, d, heads, require, values)
        problems += _value_embedding_layers(f)
    else:
        values.update(arch="gpt", n_layers=f["n_layer"])
    if problems:
        raise WeightsError(f"{source}: this architecture cannot run the released model: " + "; ".join(problems))
    known = set(REFERENCE_DEFAULTS) | set(PARCAE_DEFAULTS) | set(GPT_DEFAULTS) | set(NOT_COMPUTING)
    unknown = sorted(set(raw) - known)
    if unknown:  # the weights' names and shapes are still checked one by one when they load
        log.warning(
            "%s: fields the reference does not define, taken not to change the computation: %s", source, unknown
        )
    bad = _out_of_bounds(values)
    if bad:
        raise WeightsError(f"{source}: " + "; ".join(bad))
    cfg = ParcaeConfig(**values)
    if cfg.problems():
        raise WeightsError(f"{source}: " + "; ".join(f"{p.field}: {p.message}" for p in cfg.problems()))
    return cfg


_THEIRS = {
    "d_model": "n_embd", "n_head": "num_attention_heads", "vocab_size": "vocab_size", "max_seq_len": "block_size",
    "norm_eps": "norm_eps", "rope_base": "rope_settings.rope_base", "n_prelude": "n_layers_in_prelude",
    "n_core": "n_layers_in_recurrent_block", "n_coda": "n_layers_in_coda", "n_layers": "n_layer",
    "mean_recurrence": "mean_recurrence", "mean_backprop_depth": "mean_backprop_depth",
}  # fmt: skip


_SIGNS = {"gt": ">", "ge": ">=", "le": "<="}


def _out_of_bounds(values: dict[str, Any]) -> list[str]:
    """The mapped numbers against ParcaeConfig's types and bounds, named by the reference's field."""
    bad = []
    for fld in dataclasses.fields(ParcaeConfig):
        if fld.name not in values or fld.name not in _THEIRS:
            continue
        value, kind = values[fld.name], int if fld.type in ("int", int) else float
        ok = (
            isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
        )
        bounds = {k: fld.metadata[k] for k in ("gt", "ge", "le") if k in fld.metadata}
        if ok:
            ok = all({"gt": value > b, "ge": value >= b, "le": value <= b}[k] for k, b in bounds.items())
        if not ok:
            limits = ", ".join(f"{_SIGNS[k]} {b if isinstance(b, int) else f'{b:g}'}" for k, b in bounds.items())
            wanted = "int" if kind is int else "a number"
            bad.append(f"{_THEIRS[fld.name]}: {value!r} (this model supports {wanted} {limits})")
    return bad


_INJECTIONS = {"diagonal": "diagonal", "linear": "concat", "add": "add"}  # the reference's names -> ours
_STATE_INIT = {"like-init": "like_init", "zero": "zeros"}


def _parcae_fields(f: dict[str, Any], d: int, heads: int, require, values: dict[str, Any]) -> None:
    values.update(
        n_prelude=f["n_layers_in_prelude"], n_core=f["n_layers_in_recurrent_block"], n_coda=f["n_layers_in_coda"]
    )
    require("model_class_name", f["model_class_name"] == "Parcae", "Parcae")
    require("_is_recurrent_block_config", f["_is_recurrent_block_config"] is False, "false (a top-level config)")
    require(
        "recurrent_embedding_dimension",
        f["recurrent_embedding_dimension"] == d,
        f"n_embd = {d}: the state has the model's width",
    )
    inter = f["recurrent_intermediation_embedding_dimension"]  # the core blocks' MLP width
    require(
        "recurrent_intermediation_embedding_dimension",
        inter == 4 * d,
        f"4 x n_embd = {4 * d}: the core's MLP width equals the prelude's",
    )
    rec_heads = f["recurrent_num_attention_heads"]
    require(
        "recurrent_num_attention_heads",
        rec_heads in (None, heads),
        f"null or {heads}: the core has the prelude's heads",
    )
    require("prelude_norm", f["prelude_norm"] is True, "true: the normed injected signal")
    injection = _INJECTIONS.get(f["injection_type"])
    require("injection_type", injection is not None, ", ".join(_INJECTIONS))
    values["injection"] = injection or "diagonal"
    state_init = _STATE_INIT.get(f["state_init"])
    require("state_init", state_init is not None, " or ".join(_STATE_INIT))
    values["h0_init"] = state_init or "like_init"
    scheme = str(f["sampling_scheme"])
    ok = "poisson-truncated-full" in scheme and "curriculum-" not in scheme
    require("sampling_scheme", ok, "poisson-truncated-full without a curriculum")
    method = f["recurrent_iteration_method"]
    require("recurrent_iteration_method", method == "per-sequence", "per-sequence loop counts")
    values.update(mean_recurrence=f["mean_recurrence"], mean_backprop_depth=f["mean_backprop_depth"])


def _value_embedding_layers(f: dict[str, Any]) -> list[str]:
    """The reference places a layer's value-embedding gate by its layer id against n_layer = core layers x
    mean_backprop_depth (coda ids start after the unrolled core), and the tables by unique index against
    the unique layer count; a layer uses a value embedding only where both sit. This model puts both on
    the unique layers with the last one's parity: refuse a config where the two placements differ."""
    n_pre, n_core, n_coda = f["n_layers_in_prelude"], f["n_layers_in_recurrent_block"], f["n_layers_in_coda"]
    counts = (n_pre, n_core, n_coda, f["mean_recurrence"], f["mean_backprop_depth"])
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        return []  # the field checks of ParcaeConfig name these
    unique, gate_count = n_pre + n_core + n_coda, n_core * f["mean_backprop_depth"]
    ids = [*range(n_pre + n_core), *(n_pre + n_core * f["mean_recurrence"] + i for i in range(n_coda))]
    tables = [i for i in range(unique) if i % 2 == (unique - 1) % 2]
    gates = [i for i, layer_id in enumerate(ids) if layer_id % 2 == (gate_count - 1) % 2]
    if tables == gates:
        return []
    return [
        f"value embeddings: the reference gates unique layers {gates} (n_layers_in_recurrent_block x "
        f"mean_backprop_depth = {gate_count}, mean_recurrence {f['mean_recurrence']}) but holds tables for "
        f"{tables} (this model supports the two on the same layers)"
    ]


def check_rope_table(table: torch.Tensor, cfg: ParcaeConfig, source: str | Path) -> None:
    """The reference saves its RoPE table (``freqs_cis``: 1 x positions x 1 x head_dim/2 x (cos, sin)) with the
    weights and loads it back, so the table, not config.json, is what it computes with: refuse one that is
    not this model's (another base, a condensed or shuffled position range)."""
    if (
        table.dim() != 5
        or table.shape[0] != 1
        or table.shape[2] != 1
        or tuple(table.shape[3:]) != (cfg.head_dim // 2, 2)
    ):
        raise WeightsError(
            f"{source}: freqs_cis has shape {tuple(table.shape)}; this model's RoPE table is "
            f"(1, positions, 1, {cfg.head_dim // 2}, 2)"
        )
    positions = min(table.shape[1], cfg.max_seq_len)
    inv_freq = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    ours = torch.stack((angles.cos(), angles.sin()), dim=-1)
    theirs = table[0, :positions, 0].double()
    worst = float((theirs - ours).abs().max()) if positions else 0.0
    if not math.isfinite(worst) or worst > 1e-3:
        raise WeightsError(
            f"{source}: freqs_cis (the RoPE table saved with the weights) differs from rope_base "
            f"{cfg.rope_base:g} by up to {worst:.3g}: the weights were trained with another RoPE base or "
            "position scaling than config.json states"
        )
