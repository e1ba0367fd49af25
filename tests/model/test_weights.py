"""Reference-naming safetensors: lossless round trip, tolerant of other tooling's spellings, strict otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import WeightsError, build_model, load_pretrained, load_reference, save_reference
from model.weights import from_reference, reference_state_dict, to_reference
from tests.model.test_parcae import TINY, ids, randomize

REFERENCE_KEYS = [
    "transformer.wte.weight",
    "transformer.prelude.0.norm_1.weight",
    "transformer.prelude.0.attn.c_q.weight",
    "transformer.prelude.0.attn.c_k.weight",
    "transformer.prelude.0.attn.c_v.weight",
    "transformer.prelude.0.attn.c_proj.weight",
    "transformer.prelude.0.norm_2.weight",
    "transformer.prelude.0.mlp.fc.weight",
    "transformer.prelude.0.mlp.proj.weight",
    "transformer.ln_prelude.weight",
    "transformer.adapter.A_log",
    "transformer.adapter.dt_bias",
    "transformer.adapter.B",
    "transformer.core_block.0.attn.ve_gate.weight",
    "transformer.C.weight",
    "transformer.coda.0.attn.c_proj.weight",
    "transformer.ln_f.weight",
    "value_embeds.1.weight",
    "value_embeds.3.weight",
]


def test_names_map_one_to_one_onto_the_reference_naming(tmp_path):
    model = build_model(TINY)
    ours = set(model.state_dict())
    keys = set(reference_state_dict(model))
    assert set(REFERENCE_KEYS) <= keys and len(keys) == len(ours)
    assert {k.split(".")[0] for k in keys} == {"transformer", "value_embeds"}
    assert not any("recurrence" in k for k in keys)
    assert {from_reference(to_reference(k), TINY.core_layers) for k in ours} == ours
    assert set(load_file(str(save_reference(model, tmp_path / "w.safetensors")))) == keys


def test_round_trip_is_lossless(tmp_path):
    model = randomize(build_model(TINY))
    path = save_reference(model, tmp_path / "w.safetensors")
    loaded = load_pretrained(None, path)  # config read back from the file
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = ids()
    with torch.no_grad():
        h0 = torch.zeros(4, 16, TINY.d_model)
        assert torch.equal(model(x, loops=6, h0=h0), loaded(x, loops=6, h0=h0))


def test_other_spellings_load(tmp_path):
    model = randomize(build_model(TINY))
    tensors = {f"_orig_mod.{k}": v.clone() for k, v in reference_state_dict(model).items()}
    tensors["_orig_mod.transformer.adapter.B.weight"] = tensors.pop("_orig_mod.transformer.adapter.B")
    tensors["lm_head.weight"] = model.transformer.wte.weight.detach().clone()
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    fresh = build_model(TINY, seed=9)
    load_reference(fresh, tmp_path / "ref.safetensors")
    assert torch.equal(fresh.transformer.recurrence.adapter.B, model.transformer.recurrence.adapter.B)


def test_mismatches_are_named(tmp_path):
    model = build_model(TINY)
    tensors = dict(load_file(str(save_reference(model, tmp_path / "w.safetensors"))))
    del tensors["transformer.C.weight"]
    tensors["transformer.extra"] = torch.zeros(1)
    tensors["transformer.ln_f.weight"] = torch.ones(7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as info:
        load_reference(model, tmp_path / "bad.safetensors")
    text = str(info.value)
    assert "missing (1): transformer.C.weight" in text and "unexpected (1): transformer.extra" in text
    assert "shape transformer.ln_f.weight: file (7,), model (64,)" in text
    other = build_model(dataclasses.replace(TINY, injection="add"))
    with pytest.raises(WeightsError, match="unexpected .*transformer.adapter.A_log"):
        load_reference(other, tmp_path / "w.safetensors")


def test_untied_head_and_garbage_are_refused(tmp_path):
    model = build_model(TINY)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["lm_head.weight"] = torch.zeros_like(tensors["transformer.wte.weight"])
    save_file(tensors, str(tmp_path / "untied.safetensors"))
    with pytest.raises(WeightsError, match="lm_head.weight differs"):
        load_reference(model, tmp_path / "untied.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read as safetensors"):
        load_pretrained(TINY, tmp_path / "junk.safetensors")
    save_file({"transformer.wte.weight": torch.zeros(256, 64)}, str(tmp_path / "noconfig.safetensors"))
    with pytest.raises(WeightsError, match="holds no model config"):
        load_pretrained(None, tmp_path / "noconfig.safetensors")


# ------------------------------------------------------------------------------------------------
# The reference implementation's released directories


def released_config(cfg, **changes) -> dict:
    """config.json as the reference's save_pretrained writes it: its field names, its class name, and the
    fields that do not change the computation."""
    d = cfg.d_model
    config = {
        "_class_name": "ParcaeConfig",
        "name": "parcae-test",
        "n_embd": d,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "intermediate_size": 4 * d,
        "recurrent_embedding_dimension": d,
        "recurrent_intermediation_embedding_dimension": d,
        "n_layers_in_prelude": cfg.n_prelude,
        "n_layers_in_recurrent_block": cfg.n_core,
        "n_layers_in_coda": cfg.n_coda,
        "vocab_size": cfg.vocab_size,
        "padding_multiple": 64,
        "padded_vocab_size": cfg.padded_vocab_size,
        "block_size": cfg.max_seq_len,
        "injection_type": cfg.injection,
        "state_init": "like-init",
        "prelude_norm": True,
        "qk_norm": True,
        "nonlin_name": "ReLU2",
        "norm_eps": cfg.norm_eps,
        "tie_embeddings": True,
        "bias": False,
        "logit_softcap": None,
        "mean_recurrence": cfg.mean_recurrence,
        "mean_backprop_depth": cfg.mean_backprop_depth,
        "sampling_scheme": "poisson-truncated-full",
        "recurrent_iteration_method": "per-sequence",
        "rope_settings": {"rope_base": 50000},
        "attn_impl": "sdpa",
        "init_strategy": "scaled",
        "hf_config": {"org": "x", "name": "parcae-test"},
    }
    config.update(changes)
    return config


def write_released(directory, model, weights_file="model.pt", **changes):
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(released_config(model.cfg, **changes)))
    state = dict(reference_state_dict(model))
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    state["freqs_cis"] = torch.randn(model.cfg.max_seq_len, model.cfg.head_dim // 2, 2)
    torch.save(state, directory / weights_file)
    return directory


@pytest.mark.parametrize("weights_file", ["model.pt", "pytorch_model.bin"])
def test_a_released_directory_loads_with_its_own_config(tmp_path, weights_file):
    model = randomize(build_model(TINY, seed=3), seed=9)
    directory = write_released(tmp_path / "parcae-test", model, weights_file)
    loaded = load_pretrained(directory)  # no config argument: config.json gives it
    assert loaded.cfg == TINY
    x = ids()
    with torch.no_grad():
        zeros = torch.zeros(*x.shape, TINY.d_model)
        assert torch.equal(loaded(x, loops=5, h0=zeros), model(x, loops=5, h0=zeros))
    with pytest.raises(WeightsError, match="its config differs from the one given: d_model"):
        load_pretrained(dataclasses.replace(TINY, d_model=128, n_head=4), directory)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("num_key_value_heads", 1, "no grouped-query attention"),
        ("intermediate_size", 100, "4 x n_embd"),
        ("bias", True, "no biases"),
        ("tie_embeddings", False, "the LM head is the embedding"),
        ("logit_softcap", 15.0, "no logit soft-cap"),
        ("nonlin_name", "SwiGLU", "ReLU^2"),
        ("recurrent_iteration_method", "per-token", "not per-token"),
        ("injection_type", "gated", "concat, diagonal"),
        ("recurrent_embedding_dimension", 128, "the state has the model's width"),
        ("qk_norm", False, "RMS-normed queries and keys"),
        ("prelude_norm", False, "the normed injected signal"),
        ("padding_multiple", 128, "supports 64"),
        ("state_init", "random", "like-init or zero"),
        ("_class_name", "LlamaConfig", "ParcaeConfig or GPTConfig"),
    ],
)
def test_every_field_this_model_cannot_run_is_refused_by_name(tmp_path, field, value, needle):
    directory = write_released(tmp_path / "m", build_model(TINY), **{field: value})
    with pytest.raises(WeightsError) as info:
        load_pretrained(directory)
    assert f"{field}: {value!r}" in str(info.value) and needle in str(info.value)


def test_an_untied_head_and_a_missing_weights_file_are_refused(tmp_path):
    model = build_model(TINY)
    directory = write_released(tmp_path / "m", model)
    state = torch.load(directory / "model.pt", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    torch.save(state, directory / "model.pt")
    with pytest.raises(WeightsError, match="lm_head.weight differs from transformer.wte.weight"):
        load_pretrained(directory)
    (directory / "model.pt").unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        load_pretrained(directory)
