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
