"""The reference implementation's released models as they really are (tests/model/data/reference_parcae.json,
written by the reference's own code at sandyresearch/parcae dee8363; see tests/model/reference.py).

Every released config imports to the ParcaeConfig of our shipped config of that size, with the reference's
parameter count and state-dict shapes; tiny models at the released ratios give the reference's own logits;
every field that changes the computation is refused when set to a value this model does not compute."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
import yaml

from model import ParcaeConfig, ParcaeLM, WeightsError, build_model, count_params, load_pretrained
from model.released import NOT_COMPUTING, REFERENCE_DEFAULTS, released_config
from model.weights import load_state, normalize_names, reference_state_dict
from tests.model.reference import (
    REPO,
    SHIPPED,
    reference,
    released,
    released_json,
    rope_table,
    tiny_weights,
    write_released,
    write_state,
)
from tests.model.test_parcae import TINY, ids, randomize

RELEASED = sorted(reference()["released"])


def shipped_model(name: str) -> ParcaeConfig:
    """The model section of our shipped config for a released name, as a ParcaeConfig."""
    section = yaml.safe_load((REPO / "configs" / f"{SHIPPED[name]}.yaml").read_text())["model"]
    fields = {f.name for f in dataclasses.fields(ParcaeConfig)}
    return ParcaeConfig(**{k: v for k, v in section.items() if k in fields})


@pytest.mark.parametrize("name", RELEASED)
def test_every_released_config_imports_to_our_config_of_that_size(name):
    """The config.json the reference writes for each released size imports (before: refused for the
    recurrent MLP width, 4 x n_embd in every release) to our shipped config's model, with the reference's
    parameter count."""
    entry = released(name)
    cfg = released_config(entry["config_json"], f"{name}/config.json")
    assert cfg == dataclasses.replace(shipped_model(name), activation_checkpointing=cfg.activation_checkpointing)
    assert count_params(cfg)["total"] == entry["params"]


@pytest.mark.parametrize("name", RELEASED)
def test_a_released_state_dict_of_every_size_loads_without_memory(name):
    """The key and shape of every tensor in a released weights file of that size (the reference's
    state_dict, on the meta device: the 1.3B case allocates nothing) load into our model exactly."""
    entry = released(name)
    cfg = released_config(entry["config_json"], name)
    shapes = dict(entry["state_dict_shapes"])
    assert shapes.pop("freqs_cis") == [1, cfg.max_seq_len, 1, cfg.head_dim // 2, 2]
    tensors = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    head = tensors.pop("lm_head.weight", None)  # tied: the same tensor as the embedding in the file
    assert head is None or head.shape == tensors["transformer.wte.weight"].shape
    ours = {k: list(t.shape) for k, t in reference_state_dict(model).items()}
    assert ours == {k: list(t.shape) for k, t in tensors.items()}
    load_state(model, tensors, name)


@pytest.mark.parametrize("case", sorted(reference()["tiny"]))
@pytest.mark.parametrize("weights_file", ["model.pt", "pytorch_model.bin"])
def test_a_reference_written_directory_gives_the_references_logits(tmp_path, case, weights_file):
    """Tiny models at the released ratios (MLP and core MLP 4 x n_embd, 2/2/2 layers, diagonal, linear and
    additive injection, the GPT baseline): config.json as the reference wrote it, the fixture's weights,
    and the logits the reference's forward gave for them (h_0 = 0) equal ours. pytorch_model.bin is what
    the reference's evaluation package writes, without _class_name."""
    tiny = reference()["tiny"][case]
    config = dict(tiny["config_json"])
    if weights_file == "pytorch_model.bin":
        config.pop("_class_name")
    state = tiny_weights(case)
    assert torch.allclose(state["freqs_cis"][0, :3, 0], torch.tensor(tiny["freqs_cis_first_rows"]), atol=1e-6)
    model = load_pretrained(write_state(tmp_path / case, state, config, weights_file)).eval()
    x = torch.tensor(tiny["ids"])
    for loops, expected in tiny["logits"].items():
        with torch.no_grad():
            h0 = torch.zeros(*x.shape, model.cfg.d_model)
            logits = model(x, loops=int(loops), h0=h0) if model.cfg.looped else model(x)
        torch.testing.assert_close(logits, torch.tensor(expected), atol=2e-4, rtol=0, msg=f"{case} at {loops} loops")


def test_a_released_directory_round_trips_our_model(tmp_path):
    model = randomize(build_model(TINY, seed=3), seed=9)
    directory = write_released(tmp_path / "parcae-test", model)
    loaded = load_pretrained(directory)  # no config argument: config.json gives it
    assert loaded.cfg == TINY
    x = ids()
    with torch.no_grad():
        zeros = torch.zeros(*x.shape, TINY.d_model)
        assert torch.equal(loaded(x, loops=5, h0=zeros), model(x, loops=5, h0=zeros))
    with pytest.raises(WeightsError, match="its config differs from the one given: d_model"):
        load_pretrained(dataclasses.replace(TINY, d_model=128, n_head=4), directory)


# Each field that changes the computation, a value the reference computes and this model does not, and what
# the refusal says this model supports.
REFUSED = [
    ("num_key_value_heads", 1, "no grouped-query attention"),
    ("intermediate_size", 100, "4 x n_embd = 256"),
    ("bias", True, "no biases"),
    ("qk_bias", True, "no query/key biases"),
    ("clip_qkv", 8.0, "not clipped"),
    ("tie_embeddings", False, "the LM head is the embedding"),
    ("logit_softcap", 15.0, "no logit soft-cap"),
    ("qk_norm", False, "RMS-normed queries and keys"),
    ("block_class_name", "TransformerPostNormBlock", "TransformerPreNormBlock"),
    ("mlp_class_name", "GatedMLP", "BaseMLP"),
    ("nonlin_name", "GELU", "ReLU2"),
    ("norm_class_name", "LayerNorm", "RMSNorm"),
    ("randomize_positions_from", 4096, "positions 0, 1, 2"),
    ("mup_model_scaling_factor", 2, "no muP width scaling"),
    ("init_strategy", "takase", "no embedding or logit scale"),
    ("padded_vocab_size", 512, "multiple of 64 = 256"),
    ("recurrent_embedding_dimension", 128, "the state has the model's width"),
    ("recurrent_intermediation_embedding_dimension", 64, "the core's MLP width equals the prelude's"),
    ("recurrent_num_attention_heads", 4, "the core has the prelude's heads"),
    ("prelude_norm", False, "the normed injected signal"),
    ("injection_type", "gated", "diagonal, linear, add"),
    ("state_init", "normal", "like-init or zero"),
    ("sampling_scheme", "poisson-truncated-full-curriculum-1000", "without a curriculum"),
    ("sampling_scheme", "fixed", "poisson-truncated-full"),
    ("recurrent_iteration_method", "per-batch", "per-sequence"),
    ("recurrent_iteration_method", "per-token", "per-sequence"),
    ("model_class_name", "Huginn", "Parcae"),
    ("_is_recurrent_block_config", True, "a top-level config"),
]
# Fields read into the ParcaeConfig (their values are the model's), or checked with another: rope_settings
# (use_rope, rope_condense_ratio, rope_base: tested below), simple_ops (with norm_class_name), vocab_size
# and padding_multiple (with padded_vocab_size), n_layer (the GPT's depth).
MAPPED = {
    "n_embd", "num_attention_heads", "vocab_size", "block_size", "norm_eps", "rope_settings", "padding_multiple",
    "n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda", "mean_recurrence",
    "mean_backprop_depth", "simple_ops", "n_layer",
}  # fmt: skip


def test_every_field_the_reference_writes_is_mapped_refused_or_listed_as_not_computing():
    """A field added to the reference's configs fails here until it is placed."""
    written = set()
    for entry in reference()["released"].values():
        written |= set(entry["config_json"])
    placed = MAPPED | {field for field, _, _ in REFUSED} | set(NOT_COMPUTING)
    assert written - placed == set()
    assert not MAPPED & set(NOT_COMPUTING) and not {f for f, _, _ in REFUSED} & set(NOT_COMPUTING)


@pytest.mark.parametrize("field, value, needle", REFUSED)
def test_every_field_this_model_cannot_compute_is_refused_by_name(tmp_path, field, value, needle):
    directory = write_released(tmp_path / "m", build_model(dataclasses.replace(TINY, vocab_size=256)), **{field: value})
    with pytest.raises(WeightsError) as info:
        load_pretrained(directory)
    message = str(info.value)
    assert f"{field}: {value!r}" in message and needle in message and "config.json" in message


@pytest.mark.parametrize(
    "rope, needle",
    [
        ({"use_rope": False}, "use_rope true"),
        ({"rope_condense_ratio": 4}, "rope_condense_ratio 1"),
        ({"rope_base": -1}, "a positive rope_base"),
    ],
)
def test_rope_settings_this_model_cannot_compute_are_refused(tmp_path, rope, needle):
    config = released_json(TINY)
    config["rope_settings"].update(rope)
    with pytest.raises(WeightsError, match=f"rope_settings: .*{needle}"):
        released_config(config, "config.json")


def test_another_rope_base_is_read_and_held_against_the_saved_table(tmp_path):
    """rope_base 10,000 imports as such; a saved RoPE table that is not the base config.json states (the
    reference computes with the saved table) is refused."""
    model = randomize(build_model(dataclasses.replace(TINY, rope_base=10_000.0), seed=1), seed=2)
    directory = write_released(tmp_path / "m", model)
    assert load_pretrained(directory).cfg.rope_base == 10_000.0
    state = torch.load(directory / "model.pt", weights_only=True)
    state["freqs_cis"] = rope_table(TINY.max_seq_len, TINY.head_dim, 50_000.0)
    torch.save(state, directory / "model.pt")
    with pytest.raises(WeightsError, match="freqs_cis .* differs from rope_base 10000"):
        load_pretrained(directory)


def test_a_missing_field_takes_the_references_default(tmp_path):
    """The reference's loader builds its dataclass from the JSON, so an absent field is its default: absent
    qk_norm is False there, and refused here; absent display fields change nothing."""
    config = released_json(TINY)
    for field in ("qk_norm", "recurrent_iteration_method"):
        partial = {k: v for k, v in config.items() if k != field}
        with pytest.raises(WeightsError, match=f"{field}: {REFERENCE_DEFAULTS.get(field, 'per-batch')!r}"):
            released_config(partial, "config.json")
    trimmed = {k: v for k, v in config.items() if k not in ("name", "hf_config", "attn_impl", "padded_vocab_size")}
    assert released_config(trimmed, "config.json") == TINY


def test_fields_that_do_not_compute_are_accepted_silently_and_unknown_ones_named(caplog):
    config = released_json(TINY)
    config.update(attn_impl="debug-skip", use_fused_head="cce", use_abacus=True, debias_attention=True)
    config.update(activation_checkpoint_impl="per-block", lockstep_n=True, init_orthogonal=False)
    with caplog.at_level(logging.WARNING):
        assert released_config(config, "config.json") == TINY
    assert caplog.records == []
    config["attention_sink"] = True
    with caplog.at_level(logging.WARNING):
        released_config(config, "config.json")
    assert "attention_sink" in caplog.text and "does not define" in caplog.text


def test_value_embedding_gates_and_tables_on_different_layers_are_refused():
    """The reference places the gates by n_layers_in_recurrent_block x mean_backprop_depth and the tables by
    the unique layer count; with one core layer (5 unique layers) they part ways (the reference, built so,
    gates layers 1 and 4 and holds tables for 0, 2 and 4)."""
    config = released_json(dataclasses.replace(TINY, n_prelude=2, n_core=1, n_coda=2))
    with pytest.raises(
        WeightsError, match=r"value embeddings: the reference gates unique layers \[1, 4\] .* \[0, 2, 4\]"
    ):
        released_config(config, "config.json")


def test_a_registry_dict_of_the_reference_imports_too():
    """parcae_lm/configs/parcae/parcae-small-140m.py's dict (architecture_class_name, no _class_name, only
    the fields it sets: the rest take the reference's defaults) is the released 140M model."""
    registry = {k: v for k, v in released("parcae-small-140m")["config_json"].items() if k != "_class_name"}
    for field in ("attn_impl", "use_abacus", "strategy", "simple_ops", "lockstep_n", "padded_vocab_size"):
        registry.pop(field)  # not set by the registry's dict
    registry["architecture_class_name"] = "Parcae"
    assert released_config(registry, "parcae-small-140m.py") == released_config(
        released("parcae-small-140m")["config_json"], "config.json"
    )


def test_numbers_of_the_wrong_type_are_refused_by_the_references_name():
    config = released_json(TINY, n_layers_in_coda="2", block_size=True)
    with pytest.raises(WeightsError) as info:
        released_config(config, "config.json")
    assert "n_layers_in_coda: '2' (this model supports int" in str(info.value)
    assert "block_size: True" in str(info.value)


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


def test_the_concat_injection_takes_the_references_name_and_reads_our_older_one():
    """The reference's linear injection is a Linear named adapter: transformer.adapter.adapter.weight. Files
    this pipeline wrote before used transformer.adapter.weight; they still load."""
    model = randomize(build_model(dataclasses.replace(TINY, injection="concat"), seed=1), seed=3)
    names = reference_state_dict(model)
    assert "transformer.adapter.adapter.weight" in names
    older = {("transformer.adapter.weight" if k.endswith("adapter.adapter.weight") else k): v for k, v in names.items()}
    fresh = build_model(model.cfg, seed=5)
    load_state(fresh, normalize_names(older), "older.safetensors")
    assert torch.equal(fresh.transformer.recurrence.adapter.weight, model.transformer.recurrence.adapter.weight)
