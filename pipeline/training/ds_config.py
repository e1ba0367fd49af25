"""Build the DeepSpeed config dict from the job spec, a base config and the world size.

`build_ds_config` is pure: it neither imports DeepSpeed nor reads the environment. The base configs
in ``ds_configs/`` carry the tuning knobs (bucket sizes, overlap, offload options); everything the
job spec owns (batch sizes, precision, clipping, optimizer, ZeRO stage and whether to offload) is
written by the builder, and a base config that tries to set it is refused rather than overridden.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from parcae_errors import UsageError
from pipeline.jobspec import OptimizerSpec, TrainingSpec, ZeroSpec
from pipeline.jobspec.schema import is_base_config_path


class ConfigError(UsageError):
    """A bad DeepSpeed base config, or a spec the config cannot be built for."""


DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# Keys a base config may hold. Checked against DeepSpeed's own config classes by the tests.
BASE_TOP_KEYS = {
    "_comment",
    "zero_optimization",
    "bf16",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "memory_breakdown",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "flops_profiler",
    "comms_logger",
    "checkpoint",
}
BASE_ZERO_KEYS = {
    "contiguous_gradients",
    "reduce_scatter",
    "reduce_bucket_size",
    "use_multi_rank_bucket_allreduce",
    "allgather_partitions",
    "allgather_bucket_size",
    "overlap_comm",
    "offload_param",
    "offload_optimizer",
    "sub_group_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_module_granularity_threshold",
    "round_robin_gradients",
    "ignore_unused_parameters",
    "zero_hpz_partition_size",
    "log_trace_cache_warnings",
    "memory_efficient_linear",
}
BASE_OFFLOAD_KEYS = {"device", "pin_memory", "buffer_count", "buffer_size", "max_in_cpu", "ratio"}
BASE_BF16_KEYS = {"immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads"}
SPEC_OWNED = {
    "train_batch_size": "training.global_batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "gradient_clipping": "optimizer.grad_clip",
    "optimizer": "optimizer",
    "scheduler": "schedule",
    "fp16": "training.precision",
    "amp": "training.precision",
    "torch_autocast": "training.precision",
    "tensorboard": "logging (the pipeline writes its own TensorBoard events)",
}


def base_config_path(name: str) -> Path:
    """``zero3`` -> ds_configs/zero3.json; anything with a slash or .json suffix is a path."""
    if is_base_config_path(name):
        return Path(name)
    return DS_CONFIG_DIR / f"{name}.json"


def available_base_configs() -> list[str]:
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def load_base_config(name: str) -> dict[str, Any]:
    path = base_config_path(name)
    if not path.is_file():
        raise ConfigError(
            f"zero.base_config: {name!r} not found ({path}); shipped: {', '.join(available_base_configs())}"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    check_base_config(data, str(path))
    return data


def check_base_config(base: dict[str, Any], source: str) -> None:
    problems = []
    for key, value in base.items():
        if key in SPEC_OWNED:
            problems.append(f"{key}: set by the job spec ({SPEC_OWNED[key]}), not by a base config")
        elif key not in BASE_TOP_KEYS:
            problems.append(f"{key}: unknown key (accepted: {', '.join(sorted(BASE_TOP_KEYS - {'_comment'}))})")
        elif key == "zero_optimization":
            problems += _check_section(value, key, BASE_ZERO_KEYS, owned={"stage": "zero.stage"})
            for sub in ("offload_param", "offload_optimizer"):
                if isinstance(value, dict) and sub in value:
                    problems += _check_section(value[sub], f"{key}.{sub}", BASE_OFFLOAD_KEYS, {})
        elif key == "bf16":
            problems += _check_section(value, key, BASE_BF16_KEYS, owned={"enabled": "training.precision"})
    if problems:
        raise ConfigError(f"{source}: invalid DeepSpeed base config:\n" + "\n".join(f"  {p}" for p in problems))


def _check_section(value: Any, where: str, known: set[str], owned: dict[str, str]) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: must be an object"]
    problems = []
    for key in value:
        if key in owned:
            problems.append(f"{where}.{key}: set by the job spec ({owned[key]}), not by a base config")
        elif key not in known:
            problems.append(f"{where}.{key}: unknown key (accepted: {', '.join(sorted(known))})")
    return problems


def resolve_precision(precision: str, device_type: str) -> str:
    """``auto``: the reference's bf16 mixed precision on accelerators, fp32 on CPU."""
    if precision == "auto":
        return "fp32" if device_type == "cpu" else "bf16-mixed"
    return precision


def build_ds_config(
    training: TrainingSpec,
    optimizer: OptimizerSpec,
    zero: ZeroSpec,
    base: dict[str, Any],
    world_size: int,
    device_type: str = "cuda",
) -> dict[str, Any]:
    """The final DeepSpeed config. ``training`` must come from a validated JobSpec (batch derived)."""
    check_base_config(base, "base config")
    micro, accum = training.micro_batch_size, training.gradient_accumulation_steps
    assert micro is not None and accum is not None and training.global_batch_size is not None
    if training.global_batch_size != micro * accum * world_size:
        raise ConfigError(
            f"training.global_batch_size={training.global_batch_size} != micro_batch_size {micro} x "
            f"gradient_accumulation_steps {accum} x world size {world_size}: the job spec was validated for "
            "another world size (cluster.nodes x cluster.procs_per_node)"
        )
    config = copy.deepcopy(base)
    config.pop("_comment", None)
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = accum
    config["train_batch_size"] = training.global_batch_size
    # DeepSpeed clips at 1.0 when the config is silent; always write the spec's value.
    config["gradient_clipping"] = float(optimizer.grad_clip)
    config["zero_optimization"] = _zero_section(config.get("zero_optimization", {}), zero)
    precision = resolve_precision(training.precision, device_type)
    # bf16: DeepSpeed's bf16 mode (bf16 parameters and activations, fp32 master weights in the optimizer).
    # bf16-mixed (the reference's): fp32 parameters under torch.autocast, so matmuls and attention run in
    # bf16 while the residual stream, e, the loop state h and the injection stay fp32; DeepSpeed reduces
    # the Linear layers' gradients in bf16.
    config["bf16"] = {**config.get("bf16", {}), "enabled": precision == "bf16"}
    if precision == "bf16-mixed":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    config["fp16"] = {"enabled": False}
    config["tensorboard"] = {"enabled": False}
    if optimizer.name == "muon":  # the reference's variant: our own optimizer, passed to deepspeed.initialize
        config["zero_allow_untested_optimizer"] = True
    else:
        config["optimizer"] = _optimizer_section(optimizer, device_type, zero)
    config.setdefault("steps_per_print", 10**9)
    if optimizer.name == "muon-deepspeed":
        config["zero_allow_untested_optimizer"] = True
        # DeepSpeed's ZeRO Muon needs whole gradients per parameter: "Muon and reduce scatter cannot be used together"
        config["zero_optimization"]["reduce_scatter"] = False
    return config


def _zero_section(base_zero: dict[str, Any], zero: ZeroSpec) -> dict[str, Any]:
    section = copy.deepcopy(base_zero)
    section["stage"] = zero.stage
    for key, wanted, flag in (
        ("offload_optimizer", zero.offload_optimizer, "zero.offload_optimizer"),
        ("offload_param", zero.offload_params, "zero.offload_params"),
    ):
        options = section.get(key, {})
        base_device = options.get("device", "none")
        if base_device not in ("none", None) and not wanted:
            raise ConfigError(
                f"zero_optimization.{key}: the base config zero.base_config={zero.base_config!r} offloads to "
                f"{base_device!r} but {flag} is false; set {flag}: true or choose a base config without offload"
            )
        section[key] = {**options, "device": "cpu"} if wanted else {"device": "none"}
    if zero.stage != 3:
        for key in [k for k in section if k.startswith("stage3_")]:
            del section[key]
        del section["offload_param"]
    if zero.reduce_bucket_size is not None:
        section["reduce_bucket_size"] = zero.reduce_bucket_size
    if zero.prefetch_bucket_size is not None and zero.stage == 3:
        section["stage3_prefetch_bucket_size"] = zero.prefetch_bucket_size
    if zero.param_persistence_threshold is not None and zero.stage == 3:
        section["stage3_param_persistence_threshold"] = zero.param_persistence_threshold
    return section


def _optimizer_section(optimizer: OptimizerSpec, device_type: str, zero: ZeroSpec) -> dict[str, Any]:
    adam = {
        "betas": list(optimizer.betas),
        "eps": optimizer.eps,
        "weight_decay": optimizer.weight_decay,
    }
    # No fused kernels on CPU: torch's AdamW (for muon-deepspeed, its Adam half) unless DeepSpeed's CPU Adam
    # runs the offloaded state. DeepSpeed's FusedAdam on CPU is a C++ op built at start-up (45 s on 2 cores).
    torch_adam = {"torch_adam": True} if device_type == "cpu" and not zero.offload_optimizer else {}
    if optimizer.name == "adamw":
        return {"type": "AdamW", "params": {"lr": optimizer.lr, **adam, **torch_adam}}
    params = {
        "lr": optimizer.lr,
        "muon_lr": optimizer.lr,
        "adam_lr": optimizer.adam_lr or optimizer.lr,
        "momentum": optimizer.muon_momentum,
        **adam,
        # The shared weight_decay is Muon's; the pipeline's parameter groups give the AdamW half
        # (embeddings, norms, injection) its own optimizer.weight_decay.
        "weight_decay": optimizer.muon_weight_decay,
        **torch_adam,
    }
    return {"type": "Muon", "params": params}
