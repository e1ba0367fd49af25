"""The DeepSpeed config builder: pure, complete, strict about base configs; checked by DeepSpeed itself."""

from __future__ import annotations

import copy
import json

import pytest

from pipeline.jobspec import JobSpec
from pipeline.training.ds_config import (
    BASE_OFFLOAD_KEYS,
    BASE_TOP_KEYS,
    BASE_ZERO_KEYS,
    ConfigError,
    available_base_configs,
    build_ds_config,
    load_base_config,
)


def job(**sections) -> JobSpec:
    data = {"name": "t", "data": {"train_url": "x"}, "training": {"micro_batch_size": 4, "total_steps": 1}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return JobSpec.model_validate(data)


def build(spec: JobSpec, base="zero3", world=None, device="cuda"):
    world = spec.world_size if world is None else world
    return build_ds_config(spec.training, spec.optimizer, spec.zero, load_base_config(base), world, device)


def test_shipped_base_configs():
    assert {"zero3", "zero3_offload", "zero3_bf16"} <= set(available_base_configs())


def test_batch_fields_clipping_and_precision():
    spec = job(
        training={"gradient_accumulation_steps": 3},
        cluster={"procs_per_node": 2},
        optimizer={"grad_clip": 0.5},
    )
    cfg = build(spec)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24
    assert cfg["gradient_clipping"] == 0.5
    # auto on an accelerator: the reference's bf16 mixed precision (fp32 weights under autocast)
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    pure = build(job(training={"precision": "bf16", "gradient_accumulation_steps": 3}, cluster={"procs_per_node": 2}))
    assert pure["bf16"]["enabled"] is True and "torch_autocast" not in pure
    assert cfg["tensorboard"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["optimizer"]["type"] == "AdamW" and "torch_adam" not in cfg["optimizer"]["params"]
    cpu = build(spec, device="cpu")
    assert cpu["bf16"]["enabled"] is False and cpu["optimizer"]["params"]["torch_adam"] is True
    assert "torch_autocast" not in cpu


def test_clipping_is_always_written_even_when_off():
    # DeepSpeed clips at 1.0 when the key is absent; off must be an explicit 0.
    assert build(job(optimizer={"grad_clip": 0.0}))["gradient_clipping"] == 0.0


def test_builder_is_pure():
    spec = job()
    base = load_base_config("zero3")
    before = copy.deepcopy(base)
    first = build_ds_config(spec.training, spec.optimizer, spec.zero, base, 1, "cpu")
    second = build_ds_config(spec.training, spec.optimizer, spec.zero, base, 1, "cpu")
    assert first == second and base == before


def test_world_size_must_match_the_validated_spec():
    with pytest.raises(ConfigError, match="validated for another world size"):
        build(job(), world=2)


def test_offload_and_stages():
    cfg = build(
        job(zero={"offload_optimizer": True, "offload_params": True, "base_config": "zero3_offload"}),
        base="zero3_offload",
        device="cpu",
    )
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in cfg["optimizer"]["params"]  # DeepSpeed's CPU Adam runs offloaded state
    with pytest.raises(ConfigError, match="offloads to 'cpu' but zero.offload_optimizer is false"):
        build(job(zero={"base_config": "zero3_offload"}), base="zero3_offload")
    stage2 = build(job(zero={"stage": 2}))["zero_optimization"]
    assert stage2["stage"] == 2 and not any(k.startswith("stage3_") for k in stage2)
    assert "offload_param" not in stage2


def test_spec_bucket_sizes_override_the_base():
    zero = build(job(zero={"reduce_bucket_size": 123, "prefetch_bucket_size": 456}))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["stage3_prefetch_bucket_size"] == 456


def test_muon_optimizer_section():
    cfg = build(job(optimizer={"name": "muon-deepspeed", "lr": 0.01, "adam_lr": 0.002, "muon_weight_decay": 0.2}))
    assert cfg["optimizer"]["type"] == "Muon"
    params = cfg["optimizer"]["params"]
    assert params["muon_lr"] == 0.01 and params["adam_lr"] == 0.002 and params["weight_decay"] == 0.2
    assert cfg["zero_optimization"]["reduce_scatter"] is False  # DeepSpeed refuses Muon with reduce-scatter
    assert "torch_adam" not in params  # on a GPU its Adam half is DeepSpeed's FusedAdam
    cpu = build(job(optimizer={"name": "muon-deepspeed"}), device="cpu")
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # on CPU torch's: FusedAdam builds a C++ op
    # the reference's Muon is our own optimizer (given to deepspeed.initialize), not a config section
    reference = build(job(optimizer={"name": "muon"}))
    assert "optimizer" not in reference and reference["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize(
    "base, message",
    [
        ({"zero_optimisation": {}}, "zero_optimisation: unknown key"),
        (
            {"zero_optimization": {"stage3_prefetch_bucket": 1}},
            "zero_optimization.stage3_prefetch_bucket: unknown",
        ),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage: set by the job spec (zero.stage)"),
        ({"gradient_clipping": 1.0}, "gradient_clipping: set by the job spec (optimizer.grad_clip)"),
        ({"bf16": {"enabled": True}}, "bf16.enabled: set by the job spec (training.precision)"),
        ({"zero_optimization": {"offload_param": {"device": "cpu", "pinned": True}}}, "offload_param.pinned"),
    ],
)
def test_unknown_or_spec_owned_keys_in_a_base_config_are_errors(tmp_path, base, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(base))
    with pytest.raises(ConfigError) as info:
        load_base_config(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_missing_and_malformed_base_configs(tmp_path):
    with pytest.raises(ConfigError, match="'zero4' not found .*shipped: zero3"):
        load_base_config("zero4")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON at line 1"):
        load_base_config(str(bad))


def test_allowed_keys_are_real_deepspeed_keys():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import (
        DeepSpeedZeroOffloadOptimizerConfig,
        DeepSpeedZeroOffloadParamConfig,
    )

    zero_keys = set()
    for name, field in DeepSpeedZeroConfig.model_fields.items():
        zero_keys |= {name, field.alias} - {None}
    assert zero_keys >= BASE_ZERO_KEYS
    offload = set(DeepSpeedZeroOffloadOptimizerConfig.model_fields) | set(DeepSpeedZeroOffloadParamConfig.model_fields)
    assert offload >= BASE_OFFLOAD_KEYS
    from deepspeed.runtime import constants

    known_top = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    assert (
        BASE_TOP_KEYS
        - {
            "_comment",
            "zero_optimization",
            "bf16",
            "flops_profiler",
            "comms_logger",
            "checkpoint",
            "memory_breakdown",
            "communication_data_type",
        }
        <= known_top
    )


@pytest.mark.parametrize("base", ["zero3", "zero3_bf16"])
def test_deepspeed_parses_the_built_config(base):
    from deepspeed.runtime.config import DeepSpeedConfig

    spec = job(training={"gradient_accumulation_steps": 2}, optimizer={"grad_clip": 0.25}, zero={"base_config": base})
    parsed = DeepSpeedConfig(build(spec, base=base, device="cpu"))
    assert parsed.train_batch_size == 8
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.gradient_clipping == 0.25
    assert parsed.zero_optimization_stage == 3
    assert parsed.optimizer_name == "adamw"
    assert parsed.bfloat16_config.enabled is False
