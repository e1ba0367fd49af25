"""The one place DeepSpeed is initialised: model construction, parameter groups, optimizer, schedule.

Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (each rank allocates only its
partition) and initialised one module at a time: rank 0 fills the gathered parameters with the
model's own init (the same generator order as `model.build_model`) and DeepSpeed scatters them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from model import ParcaeLM
from model.parcae import INIT_TYPES
from pipeline.ds_config import build_ds_config, load_base_config, resolve_precision
from pipeline.schedule import lr_multiplier
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("A_log", "dt_bias", "adapter.B", "adapter.weight", "C.weight")


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine
    model: ParcaeLM
    ds_config: dict[str, Any]
    device: torch.device
    device_type: str
    precision: str


def accelerator_device(local_rank: int) -> tuple[torch.device, str]:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    if name == "cpu":
        return torch.device("cpu"), "cpu"
    acc.set_device(local_rank)
    return torch.device(acc.device_name(local_rank)), name


def init_distributed(device_type: str) -> None:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if device_type == "cpu" else get_accelerator().communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norms, embeddings (token and value), and the injection/readout (A_log, dt_bias, B, C) take no decay."""
    ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions hold a flat shard: ask the full shape
    return ndim < 2 or "wte" in name or "value_embeds" in name or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(model: ParcaeLM, spec: JobSpec) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if is_no_decay(name, p) else decay).append(p)
        # Muon for the blocks' 2-D matrices; AdamW for everything in the no-decay set (the recipe).
        p.use_muon = not is_no_decay(name, p)
    if spec.optimizer.name == "muon":
        return [
            {"params": decay, "name": "matrices"},
            {"params": no_decay, "name": "adamw", "weight_decay": spec.optimizer.weight_decay},
        ]
    return [
        {"params": decay, "weight_decay": spec.optimizer.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def gather_units(model: ParcaeLM) -> list[torch.nn.Module]:
    """The modules ZeRO-3 gathers whole (DeepSpeed "leaf modules"): every block outside the loop, and the
    recurrence, whose one forward runs all loops. Per call of such a unit DeepSpeed runs one hook pair
    instead of one per Linear and norm, and the order of units does not depend on the loop count, so
    the prefetch trace stays valid. (A block inside the loop cannot be a unit of its own: DeepSpeed
    reduces a unit's gradients after each call's backward, and a core block is called once per loop.)"""
    tr = model.transformer
    if not model.cfg.looped:
        return list(tr.h)
    return [*tr.prelude, tr.recurrence, *tr.coda]


def build_engine(spec: JobSpec, world_size: int, local_rank: int, rank: int) -> Engine:
    import deepspeed

    device, device_type = accelerator_device(local_rank)
    base = load_base_config(spec.zero.base_config)
    ds_config = build_ds_config(spec.training, spec.optimizer, spec.zero, base, world_size, device_type)
    precision = resolve_precision(spec.training.precision, device_type)
    cfg = spec.model.build()
    generator = torch.Generator(device="cpu").manual_seed(spec.training.seed)
    if spec.zero.stage == 3:
        # dtype comes from the config: passing dtype= picks bf16 on CPU in DeepSpeed 0.19 (operator precedence)
        remote = "cpu" if spec.zero.offload_params else None
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote):
            model = ParcaeLM(cfg)
        for module in model.modules():
            if not isinstance(module, INIT_TYPES):
                continue
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                if rank == 0:
                    model.init_module(module, generator)
    else:
        with torch.device("meta"):
            model = ParcaeLM(cfg)
        model.to_empty(device="cpu")
        model.init_weights(generator)
    if spec.zero.stage == 3 and spec.zero.gather_unit == "block":
        from deepspeed.utils import set_z3_leaf_module

        for module in gather_units(model):
            set_z3_leaf_module(module, True)
    total_steps = spec.total_steps
    schedule = spec.schedule

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, schedule))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, spec),
        config=ds_config,
        lr_scheduler=scheduler,
    )
    log.info(
        "DeepSpeed engine: ZeRO stage %d, %s, world size %d, device %s", spec.zero.stage, precision, world_size, device
    )
    return Engine(
        engine=engine, model=model, ds_config=ds_config, device=device, device_type=device_type, precision=precision
    )
