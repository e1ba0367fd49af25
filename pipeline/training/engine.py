"""The one place DeepSpeed is initialised: model construction, parameter groups, optimizer, schedule.

Under ZeRO-3 the model is built inside ``deepspeed.zero.Init`` (each rank allocates only its
partition) and initialised one module at a time: rank 0 fills the gathered parameters with the
model's own init (the same generator order as `model.build_model`) and DeepSpeed scatters them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Callable
from typing import Any

import torch

from model import ParcaeConfig, ParcaeLM, empty_model
from model.parcae import INIT_TYPES
from pipeline.jobspec import OptimizerSpec, ZeroSpec
from pipeline.training.muon_optimizer import MuonAdamW

log = logging.getLogger(__name__)

NO_DECAY_SUFFIXES = ("A_log", "dt_bias", "adapter.B", "adapter.weight", "C.weight")

# DeepSpeed's ZeRO optimizers import this module only to ask isinstance(optimizer, MuonWithAuxAdam); importing
# it applies torch.compile decorators, which import dynamo and inductor: 1.2-2.5 s of every rank's start-up
# on CPU, for a class a run that does not use DeepSpeed's Muon never instantiates.
_DEEPSPEED_MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def _deepspeed_muon_stand_in(needed: bool) -> None:
    """Unless ``needed`` (optimizer.name: muon-deepspeed), give DeepSpeed a stand-in for its Muon module whose
    class nothing is an instance of; when needed, take a stand-in out so the real module is imported."""
    current = sys.modules.get(_DEEPSPEED_MUON)
    stand_in = getattr(current, "PARCAE_STAND_IN", False)
    if needed and stand_in:
        del sys.modules[_DEEPSPEED_MUON]
    elif not needed and current is None:
        module = types.ModuleType(_DEEPSPEED_MUON, "stand-in: this run does not use DeepSpeed's Muon")
        module.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})  # type: ignore[attr-defined]
        module.PARCAE_STAND_IN = True  # type: ignore[attr-defined]
        sys.modules[_DEEPSPEED_MUON] = module


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norms, embeddings (token and value), and the injection/readout (A_log, dt_bias, B, C) take no decay."""
    ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions hold a flat shard: ask the full shape
    return ndim < 2 or "wte" in name or "value_embeds" in name or name.endswith(NO_DECAY_SUFFIXES)


def param_groups(model: ParcaeLM, optimizer: OptimizerSpec) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if is_no_decay(name, p) else decay).append(p)
        # Muon for the blocks' 2-D matrices; AdamW for everything in the no-decay set (the recipe).
        p.use_muon = not is_no_decay(name, p)
    if optimizer.name == "muon":  # the reference's variant: `MuonAdamW`'s groups
        adam = {"lr": optimizer.adam_lr or optimizer.lr, "betas": optimizer.betas, "eps": optimizer.eps}
        return [
            {"params": decay, "kind": "muon", "lr": optimizer.lr, "weight_decay": optimizer.muon_weight_decay},
            {"params": no_decay, "kind": "adamw", **adam, "weight_decay": optimizer.weight_decay},
        ]
    if optimizer.name == "muon-deepspeed":
        return [
            {"params": decay, "name": "matrices"},
            {"params": no_decay, "name": "adamw", "weight_decay": optimizer.weight_decay},
        ]
    return [
        {"params": decay, "weight_decay": optimizer.weight_decay},
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


def build_model_sharded(
    cfg: ParcaeConfig,
    ds_config: dict[str, Any],
    zero: ZeroSpec,
    seed: int,
    rank: int,
    initial: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> ParcaeLM:
    """The model, initialised as `model.build_model` would, or from ``initial()`` (a state dict in our
    naming; under ZeRO-3 only rank 0 calls it): partitioned at construction under ZeRO-3. Weights are set
    before DeepSpeed copies them into its fp32 master partitions, so the optimizer starts from them."""
    import deepspeed

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if zero.stage == 3:
        # dtype comes from the config: passing dtype= picks bf16 on CPU in DeepSpeed 0.19 (operator precedence)
        remote = "cpu" if zero.offload_params else None
        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=remote):
            model = ParcaeLM(cfg)
        if initial is not None:
            state = initial() if rank == 0 else {}
            for name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                    if rank == 0:
                        param.copy_(state[name])
        else:
            for module in model.modules():
                if not isinstance(module, INIT_TYPES):
                    continue
                with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                    if rank == 0:
                        model.init_module(module, generator)
        if zero.gather_unit == "block":
            from deepspeed.utils import set_z3_leaf_module

            for module in gather_units(model):
                set_z3_leaf_module(module, True)
        return model
    model = empty_model(cfg)
    if initial is not None:
        model.load_state_dict(initial(), strict=True)
    else:
        model.init_weights(generator)
    return model


def build_engine(
    cfg: ParcaeConfig,
    ds_config: dict[str, Any],
    *,
    optimizer: OptimizerSpec,
    zero: ZeroSpec,
    lr_multiplier: Callable[[int], float],
    total_steps: int,
    seed: int,
    rank: int,
    initial: Callable[[], dict[str, torch.Tensor]] | None = None,
    compile_units: bool = False,
    seq_len: int = 0,
) -> Any:
    """The DeepSpeed engine (``engine.module`` is the model) for a config built by `build_ds_config`;
    ``lr_multiplier(step)`` scales the optimizer's learning rates. ``optimizer.name: muon`` (the
    reference's variant) is our `MuonAdamW`, handed to DeepSpeed as a client optimizer and told ZeRO-3's
    partition layout; the others are DeepSpeed's own, from the config. ``compile_units``: torch.compile
    the model's repeated units (`ParcaeLM.compile_units`) and compile them for sequences of ``seq_len``
    before the first step (`compile_and_warm_up`)."""
    import deepspeed

    _deepspeed_muon_stand_in(needed=optimizer.name == "muon-deepspeed")
    model = build_model_sharded(cfg, ds_config, zero, seed, rank, initial)

    def scheduler(torch_optimizer):
        return torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lr_multiplier)

    groups = param_groups(model, optimizer)
    client = None
    if optimizer.name == "muon":
        client = MuonAdamW(
            groups,
            total_steps=total_steps,
            momentum_start=optimizer.muon_momentum_warmup_start,
            momentum_end=optimizer.muon_momentum,
            momentum_warmup_steps=optimizer.muon_momentum_warmup_steps,
            beta2=optimizer.muon_beta2,
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=None if client else groups,
        optimizer=client,
        config=ds_config,
        lr_scheduler=scheduler,
    )
    if client is not None and zero.stage == 3:
        client.bind_zero3(engine.optimizer)
    if compile_units:  # after DeepSpeed's hooks are on the modules: only the units' forward is compiled
        compile_and_warm_up(engine, zero, seq_len)
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
    if ds_config.get("torch_autocast", {}).get("enabled"):
        precision = "bf16-mixed (fp32 weights under autocast)"
    log.info(
        "DeepSpeed engine: ZeRO stage %d, %s, world size %d, device %s",
        zero.stage,
        precision,
        engine.world_size,
        engine.device,
    )
    return engine


def compile_and_warm_up(engine: Any, zero: ZeroSpec, seq_len: int) -> None:
    """Compile the model's units, then every variant of them training and evaluation meet, now: each unit's
    parameters gathered in turn (ZeRO-3), under the autocast the engine's forward runs in, so the run pays
    the compile time once, before step 1. With ``zero.gather_unit: module`` DeepSpeed hooks every module
    inside the loop body, which a call outside the engine's forward would upset: the variants then compile
    in the first steps."""
    import time

    import deepspeed
    from deepspeed.runtime.torch_autocast import autocast_if_enabled

    model = engine.module
    units = model.compile_units()
    if zero.stage == 3 and zero.gather_unit == "module":
        log.info("torch.compile: %d units; they compile in the first steps (zero.gather_unit: module)", units)
        return
    started = time.perf_counter()

    def gathered(module: torch.nn.Module):
        params = list(module.parameters())
        return deepspeed.zero.GatheredParameters(params) if zero.stage == 3 else contextlib.nullcontext()

    with autocast_if_enabled(engine):
        model.warm_up_compiled(seq_len, gathered)
    log.info(
        "torch.compile: %d units (blocks outside the loop, the loop body) compiled for every grad mode before "
        "the first step, in %.1f s",
        units,
        time.perf_counter() - started,
    )


def spectral_stats(model: ParcaeLM) -> dict[str, float]:
    """The injection's spectral radius (and mean A_bar); a collective under ZeRO-3: every rank calls it."""
    if not model.cfg.looped:
        return {}
    import deepspeed

    adapter = model.transformer.recurrence.adapter
    with deepspeed.zero.GatheredParameters([getattr(adapter, name) for name in adapter.SPECTRAL_PARAMS]):
        return adapter.spectral_stats()


def engine_metrics(engine: Any) -> dict[str, float]:
    """Learning rate, global gradient norm and the spectral radius (every rank calls it)."""
    metrics = {"lr": engine.get_lr()[0]}
    norm = engine.get_global_grad_norm()
    if norm is not None:
        metrics["grad_norm"] = float(norm.detach()) if torch.is_tensor(norm) else float(norm)
    metrics.update(spectral_stats(engine.module))
    return metrics
