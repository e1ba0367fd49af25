"""Released-format directories as the reference implementation writes them, for tests.

Every field name and value comes from ``tests/model/data/reference_parcae.json``, written by the reference's
own code (sandyresearch/parcae at dee8363; the file's ``how`` says how each part was made): the config.json
of each released size as ``parcae_lm.save_pretrained`` writes it, the parameter counts and state-dict shapes
of the reference's modules, and the logits its forward gives on tiny models at the released ratios.
`write_released` scales a released config down to a test model's widths (every other field as released)
and writes its weights the way the reference's ``torch.save(model.state_dict())`` does: with the tied
``lm_head.weight`` and the RoPE table ``freqs_cis``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import torch

from model import ParcaeConfig, ParcaeLM
from model.weights import reference_state_dict

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data" / "reference_parcae.json"

# Our shipped configs (configs/*.yaml) for each released name of the reference.
SHIPPED = {
    "parcae-small-140m": "parcae-140m",
    "parcae-medium-370m": "parcae-370m",
    "parcae-large-770m": "parcae-770m",
    "parcae-xlarge-1_3b": "parcae-1.3b",
    "gpt-small-140m": "gpt-140m",
    "gpt-medium-380m": "gpt-370m",
    "gpt-large-770m": "gpt-770m",
    "gpt-xlarge-1_3b": "gpt-1.3b",
}
_INJECTION = {"diagonal": "diagonal", "concat": "linear", "add": "add"}


@cache
def reference() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def released(name: str) -> dict[str, Any]:
    return reference()["released"][name]


def released_json(cfg: ParcaeConfig, **changes: Any) -> dict[str, Any]:
    """config.json of the reference's 140M release (Parcae or GPT), scaled to ``cfg``'s widths and depths."""
    looped = cfg.looped
    config = json.loads(json.dumps(released("parcae-small-140m" if looped else "gpt-small-140m")["config_json"]))
    d = cfg.d_model
    config.update(
        name="parcae-test" if looped else "gpt-test",
        hf_config={"org": "SandyResearch", "name": "parcae-test"},
        block_size=cfg.max_seq_len,
        n_embd=d,
        intermediate_size=4 * d,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        vocab_size=cfg.vocab_size,
        padded_vocab_size=cfg.padded_vocab_size,
        norm_eps=cfg.norm_eps,
    )
    config["rope_settings"]["rope_base"] = cfg.rope_base if cfg.rope_base != int(cfg.rope_base) else int(cfg.rope_base)
    if looped:
        config.update(
            recurrent_embedding_dimension=d,
            recurrent_intermediation_embedding_dimension=4 * d,  # the core's MLP width, 4 x n_embd as released
            n_layers_in_prelude=cfg.n_prelude,
            n_layers_in_recurrent_block=cfg.n_core,
            n_layers_in_coda=cfg.n_coda,
            mean_recurrence=cfg.mean_recurrence,
            mean_backprop_depth=cfg.mean_backprop_depth,
            injection_type=_INJECTION[cfg.injection],
            state_init="like-init" if cfg.h0_init == "like_init" else "zero",
        )
    else:
        config["n_layer"] = cfg.n_layers
    config.update(changes)
    return config


def rope_table(positions: int, head_dim: int, base: float = 50_000.0) -> torch.Tensor:
    """The reference's ``freqs_cis`` buffer: (1, positions, 1, head_dim / 2, (cos, sin)) in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)[None, :, None]


def write_state(directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any], weights_file: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    torch.save(state, directory / weights_file)
    return directory


def write_released(directory: Path, model: ParcaeLM, weights_file: str = "model.pt", **changes: Any) -> Path:
    """A released-format directory of ``model``: config.json (the released 140M config at the model's widths,
    ``changes`` applied) and its weights as the reference saves them. ``weights_file`` "pytorch_model.bin"
    writes what the reference's evaluation package writes: the same fields without ``_class_name``."""
    config = released_json(model.cfg, **changes)
    if weights_file == "pytorch_model.bin":
        config.pop("_class_name", None)
    state = dict(reference_state_dict(model))
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, saved under both names
    state["freqs_cis"] = rope_table(model.cfg.max_seq_len, model.cfg.head_dim, model.cfg.rope_base)
    return write_state(directory, state, config, weights_file)


def tiny_weights(case: str) -> dict[str, torch.Tensor]:
    """The tiny case's weights as the fixture drew them (its 'weights' entry), with the tied head and the
    reference's RoPE table."""
    tiny = reference()["tiny"][case]
    gen = torch.Generator().manual_seed(42)
    state = {}
    for key, shape in sorted(tiny["state_dict_shapes"].items()):
        if key in ("freqs_cis", "lm_head.weight"):
            continue
        if key.endswith(("A_log", "dt_bias")):
            state[key] = torch.randn(shape, generator=gen) * 0.5
        elif key.endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight", "ln_prelude.weight")):
            state[key] = 1 + torch.randn(shape, generator=gen) * 0.1
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.1
    state["lm_head.weight"] = state["transformer.wte.weight"]
    config = tiny["config_json"]
    state["freqs_cis"] = rope_table(config["block_size"], config["n_embd"] // config["num_attention_heads"])
    return state
