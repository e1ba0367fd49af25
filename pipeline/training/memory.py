"""The memory plan: peak device memory per rank of a training spec, before it is submitted.

Arithmetic only (the model is built on the meta device to count parameters per unit): what DeepSpeed
keeps for the whole run under the spec's ZeRO stage, precision and world size, and what one training
step adds on top, taken at the three moments a step can peak:

- end of forward: every saved activation, one chunk of the loss's logits and the head's gradients (the
  loss is fused with the head: `model.loss` takes them chunk by chunk in the forward);
- the head's backward: the same, the head's gradients handed on;
- the recurrence's backward: the recurrence gathered whole with its unreduced gradients, one loop
  recomputed (per-loop checkpointing), the saved loop states of the other loops.

Saved activations are counted in units of one hidden state, U = micro batch x seq_len x d_model values:
a transformer block outside the loop saves 20 U (21 with a value embedding), a loop under gradient
saves 1 U with per-loop checkpointing (its input state) and a block's worth per core block without.
These coefficients were measured with `torch.autograd.graph.saved_tensors_hooks` on the model itself
(d_model 64-512); the whole plan is checked against measured peaks of real `parcae train` ranks by
``bench/memory_plan.py`` (BENCHMARKS.md, "Memory plan against measurement").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from model import ParcaeConfig, ParcaeLM
from model.parcae import LOSS_CHUNK_ELEMENTS
from pipeline.jobspec import JobSpec
from pipeline.training.ds_config import build_ds_config, load_base_config, resolve_precision

BLOCK_SAVES = 20  # hidden states a block saves for its backward (measured; see the docstring)
VALUE_EMBEDDING_SAVES = 1  # the value embedding and its gated sum
GLUE_SAVES = 7  # embedding output, e, h_0, the readout C, final norm: outside the blocks
BLOCK_BACKWARD = 8  # a loop's backward: the gradients inside its blocks (the MLP's are 4 d wide)
STREAM_GRADS = 3  # gradients of the residual stream / loop state / e alive during a backward


@dataclass
class MemoryPlan:
    """Bytes per rank: ``static`` for the whole run, each phase's transient parts; the peak is the worst phase."""

    world_size: int
    precision: str
    stage: int
    device_type: str
    static: dict[str, int] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)  # offloaded to CPU memory
    notes: list[str] = field(default_factory=list)

    @property
    def static_bytes(self) -> int:
        return sum(self.static.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    @property
    def peak_bytes(self) -> int:
        return self.static_bytes + sum(self.phases[self.peak_phase].values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "precision": self.precision,
            "zero_stage": self.stage,
            "peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "static": self.static,
            "phases": self.phases,
            "host_bytes": self.host,
            "notes": self.notes,
        }


def plan_device_type(spec: JobSpec) -> str:
    """The device a spec plans for: its ``training.device``, with ``auto`` read as an accelerator."""
    return "cpu" if spec.training.device == "cpu" else "cuda"


def plan_memory(spec: JobSpec, device_type: str | None = None) -> MemoryPlan:
    """The peak memory per rank of training ``spec`` (its world size, ZeRO stage, precision, buckets)."""
    device_type = device_type or plan_device_type(spec)
    t, cfg = spec.training, spec.model.build()
    world = spec.world_size
    ds = build_ds_config(t, spec.optimizer, spec.zero, load_base_config(spec.zero.base_config), world, device_type)
    zero = ds["zero_optimization"]
    precision = resolve_precision(t.precision, device_type)
    stage = spec.zero.stage
    param_bytes = 2 if precision == "bf16" else 4
    act_bytes = 2 if precision == "bf16" else 4  # bf16-mixed keeps the residual stream and loop state fp32
    plan = MemoryPlan(world, precision, stage, device_type)
    numels = parameter_numels(cfg)
    total = sum(numels.values())
    part = sum(math.ceil(n / world) for n in numels.values())  # DeepSpeed pads each parameter's partition
    threshold = int(zero.get("stage3_param_persistence_threshold", 100_000)) if stage == 3 else 0
    persistent = sum(n for n in numels.values() if n <= threshold)

    # What the run keeps.
    if stage == 3:
        params_where = plan.host if spec.zero.offload_params and device_type != "cpu" else plan.static
        params_where["parameters (this rank's partition)"] = part * param_bytes
        if world > 1:  # one rank's partition is the whole parameter
            plan.static["parameters kept whole (below the persistence threshold)"] = persistent * param_bytes
    else:
        plan.static["parameters"] = total * param_bytes
    # offloading moves state into CPU memory: the same memory when the ranks run on CPU
    optimizer_where = plan.host if spec.zero.offload_optimizer and device_type != "cpu" else plan.static
    state_numel = total if stage == 0 else part
    # DeepSpeed 0.19 copies the partition into fp32 master weights even when the parameters are fp32 (it
    # compares a torch.device with a device name, never equal): measured on CPU, the same code on GPUs.
    optimizer_where["fp32 master weights"] = state_numel * 4
    if stage >= 2:
        plan.static["gradient partition (fp32)"] = part * 4
    else:
        plan.static["gradients"] = total * param_bytes + (part * 4 if stage == 1 else 0)
    optimizer_where["optimizer state"] = optimizer_state_bytes(spec.optimizer.name, numels, world, stage)
    if zero.get("contiguous_gradients", True) and stage >= 2:
        comm_bytes = 4 if ds.get("communication_data_type") == "fp32" or param_bytes == 4 else 2
        plan.static["reduce bucket (zero.reduce_bucket_size)"] = int(zero.get("reduce_bucket_size", 5e8)) * comm_bytes

    # What a step adds.
    b, s, d = t.micro_batch_size or 1, spec.data.seq_len, cfg.d_model
    unit = b * s * d * act_bytes
    prelude = range(cfg.n_prelude) if cfg.looped else range(cfg.n_layers)
    coda = range(cfg.n_prelude + cfg.n_core, cfg.num_unique_layers) if cfg.looped else range(0)
    outside = [*prelude, *coda]
    ve_layers = set(cfg.value_embedding_layers())

    def block_saves(layers) -> int:
        return sum(BLOCK_SAVES + (VALUE_EMBEDDING_SAVES if i in ve_layers else 0) for i in layers)

    saves_outside, core_block = block_saves(outside), block_saves(cfg.core_layers)
    loops = cfg.mean_backprop_depth if cfg.looped else 0  # loops with gradients: at most the backprop depth
    loop_saves = loops * (1 if cfg.activation_checkpointing else core_block + 1)
    saved = (saves_outside + GLUE_SAVES + loop_saves) * unit
    rows = b * s
    chunk = min(rows, max(1, LOSS_CHUNK_ELEMENTS // cfg.padded_vocab_size))
    # one chunk's fp32 logits (turned in place into their gradient), beside the matmul's bf16 output under bf16
    logits = chunk * cfg.padded_vocab_size * (4 if precision == "fp32" else 6)
    # the loss's gradients w.r.t. the final states and the tied head, taken in the forward (fp32 for the head)
    head_grads = rows * d * act_bytes + cfg.padded_vocab_size * d * 4
    gathered, unit_grads = gathered_bytes(cfg, numels, zero, threshold, stage, param_bytes)
    if world == 1:  # one rank's partition is the whole parameter: nothing is gathered into new buffers
        gathered = {phase: 0 for phase in gathered}
    plan.phases["end of forward"] = {
        "gathered parameters": gathered["forward"],
        "saved activations": saved,
        "logits and loss": logits + head_grads,
    }
    plan.phases["head backward"] = {
        "gathered parameters": gathered["forward"],
        "saved activations": saved,
        "logits and loss": head_grads + (cfg.padded_vocab_size * d * 2 if precision == "bf16" else 0),
        "activation gradients": STREAM_GRADS * unit,
    }
    if cfg.looped:
        recurrence_numel = sum(n for k, n in numels.items() if ".recurrence." in k)  # its weight gradients
        recompute = (core_block + 1) * unit if cfg.activation_checkpointing else 0
        plan.phases["recurrence backward"] = {
            "gathered parameters": gathered["recurrence"],
            "unreduced gradients (the recurrence)": unit_grads,
            "saved activations": (block_saves(prelude) + GLUE_SAVES + loop_saves) * unit,
            "one loop recomputed": recompute,
            "one loop's backward": BLOCK_BACKWARD * unit + recurrence_numel * 4,
            "activation gradients": STREAM_GRADS * unit,
        }
    if stage == 3 and persistent:
        plan.notes.append(f"{persistent:,} parameter values at or below the persistence threshold stay whole")
    if loops:
        plan.notes.append(
            f"{loops} loop(s) with gradients at most (model.mean_backprop_depth); no-grad loops keep nothing"
        )
    return plan


def parameter_numels(cfg: ParcaeConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    return {name: p.numel() for name, p in model.named_parameters()}


def optimizer_state_bytes(optimizer: str, numels: dict[str, int], world: int, stage: int) -> int:
    """AdamW: two fp32 moments per value; Muon: a momentum (and a small second moment) for the blocks'
    matrices, AdamW's two for the rest. Partitioned over ranks from stage 1."""
    from pipeline.training.engine import NO_DECAY_SUFFIXES

    share = (lambda n: n) if stage == 0 else (lambda n: math.ceil(n / world))
    if optimizer == "adamw":
        return sum(2 * 4 * share(n) for n in numels.values())
    total = 0
    for name, n in numels.items():
        matrix = not (name.endswith(NO_DECAY_SUFFIXES) or "wte" in name or "value_embeds" in name or "norm" in name)
        total += (4 if matrix else 8) * share(n)
    return total


def gathered_bytes(
    cfg: ParcaeConfig, numels: dict[str, int], zero: dict[str, Any], threshold: int, stage: int, param_bytes: int
) -> tuple[dict[str, int], int]:
    """ZeRO-3's gathered parameters at the end of forward and in the recurrence's backward, and the
    recurrence's unreduced gradients (its loops accumulate into whole gradients before one reduce).

    DeepSpeed keeps a gathered unit instead of releasing it when it is used again within
    ``stage3_max_reuse_distance`` values fetched: a unit's next use after its forward is its backward,
    with every later unit fetched twice in between; the tied embedding is used again by the head. What
    stays is capped by ``stage3_max_live_parameters``; the next units are prefetched up to
    ``stage3_prefetch_bucket_size``."""
    recurrence_all = sum(n for k, n in numels.items() if ".recurrence." in k)
    if stage != 3:
        return {"forward": 0, "recurrence": 0}, recurrence_all * param_bytes if stage >= 2 else 0
    big = {k: n for k, n in numels.items() if n > threshold}
    units: dict[str, int] = {}  # gather units, with the root's parameters put where they are used
    for k, n in big.items():
        name = _unit_of(cfg, k)
        units[name] = units.get(name, 0) + n
    order = [u for u in units if ".prelude." in u] + [u for u in units if "recurrence" in u]
    order += [u for u in units if ".coda." in u or ".h." in u]
    reuse = int(zero.get("stage3_max_reuse_distance", 10**9))
    live_cap = int(zero.get("stage3_max_live_parameters", 10**9))
    prefetch = int(zero.get("stage3_prefetch_bucket_size", 5e7))
    kept = [u for i, u in enumerate(order) if 2 * sum(units[v] for v in order[i + 1 :]) <= reuse]
    embedding = sum(n for u, n in units.items() if ".wte." in u)
    rest = sum(units.values()) - embedding
    held = sum(units[u] for u in kept)
    forward = min(live_cap, held + embedding + min(prefetch, rest - held))
    recurrence = units.get("transformer.recurrence", 0)
    held = recurrence + sum(units[u] for u in kept if ".prelude." in u)
    backward = min(live_cap, held + embedding + min(prefetch, rest - held))
    return {"forward": forward * param_bytes, "recurrence": backward * param_bytes}, recurrence_all * param_bytes


def _unit_of(cfg: ParcaeConfig, name: str) -> str:
    """The gather unit a parameter is fetched with (or next to): a block, the recurrence, or the tied
    embedding; a value embedding goes with its layer's block, the readout C with the recurrence."""
    parts = name.split(".")
    if parts[0] == "value_embeds":
        layer = int(parts[1])
        if not cfg.looped:
            return f"transformer.h.{layer}"
        if layer < cfg.n_prelude:
            return f"transformer.prelude.{layer}"
        if layer >= cfg.n_prelude + cfg.n_core:
            return f"transformer.coda.{layer - cfg.n_prelude - cfg.n_core}"
        return "transformer.recurrence"
    if parts[1] in ("prelude", "coda", "h"):
        return ".".join(parts[:3])
    if parts[1] in ("recurrence", "C"):
        return "transformer.recurrence"
    return name


def parse_size(text: str, what: str) -> int:
    """'80GB', '80GiB', '24g', '1.5TiB', or bytes (`parcae prep`'s sizes: GB = 10^9, GiB = 2^30)."""
    import argparse

    from data_prep.cli import parse_size as prep_size
    from parcae_errors import UsageError

    try:
        return prep_size(text)
    except argparse.ArgumentTypeError:
        raise UsageError(f"{what}: a size like 80GB, 80GiB or 80000000000 (bytes), got {text!r}") from None


def knobs(plan: MemoryPlan, spec: JobSpec, device_bytes: int) -> list[str]:
    """What to turn when the plan does not fit ``device_bytes``: each change the spec accepts, planned
    again, the largest saving first; a change that makes it fit says so."""
    if plan.peak_bytes <= device_bytes:
        return []
    t, zero = spec.training, spec.zero
    micro, accum = t.micro_batch_size or 1, t.gradient_accumulation_steps or 1
    candidates: list[tuple[str, dict[str, Any]]] = []
    if micro > 1:  # the largest micro batch (halving) that fits, else 1
        smaller = micro // 2
        while smaller > 1 and _micro(spec, smaller, plan.device_type) > device_bytes:
            smaller //= 2
        factor = micro // smaller
        candidates.append(
            (
                f"training.micro_batch_size: {smaller} with gradient_accumulation_steps: {accum * factor}",
                {"training.micro_batch_size": smaller, "training.gradient_accumulation_steps": accum * factor},
            )
        )
    if spec.model.arch == "parcae" and not spec.model.activation_checkpointing:
        candidates.append(("model.activation_checkpointing: true", {"model.activation_checkpointing": True}))
    if zero.stage < 3:
        candidates.append(("zero.stage: 3", {"zero.stage": 3}))
    if not zero.offload_optimizer:
        candidates.append(("zero.offload_optimizer: true", {"zero.offload_optimizer": True}))
    if zero.stage == 3 and not zero.offload_params:
        offload = {"zero.offload_params": True, "zero.offload_optimizer": True, "zero.base_config": "zero3_offload"}
        candidates.append(("zero.offload_params and offload_optimizer: true, zero.base_config: zero3_offload", offload))
    bucket = plan.static.get("reduce bucket (zero.reduce_bucket_size)", 0)
    if bucket:
        size = int(load_base_config(zero.base_config)["zero_optimization"].get("reduce_bucket_size", 5e8))
        size = zero.reduce_bucket_size or size
        candidates.append((f"zero.reduce_bucket_size: {size // 4}", {"zero.reduce_bucket_size": size // 4}))
    advice = []
    for text, changes in candidates:
        changed = _changed(spec, changes)
        if changed is None:
            continue
        peak = plan_memory(changed, plan.device_type).peak_bytes
        if peak < plan.peak_bytes:
            verdict = "fits" if peak <= device_bytes else "still over"
            advice.append((plan.peak_bytes - peak, f"{text}: {peak / 2**30:.3g} GiB per rank, {verdict}"))
    advice.sort(key=lambda a: -a[0])
    return [text for _, text in advice]


def _micro(spec: JobSpec, micro: int, device_type: str) -> int:
    """The planned peak at another micro batch (the global batch kept: more accumulation)."""
    accum = (spec.training.gradient_accumulation_steps or 1) * (spec.training.micro_batch_size or 1) // micro
    changed = _changed(spec, {"training.micro_batch_size": micro, "training.gradient_accumulation_steps": accum})
    return plan_memory(changed, device_type).peak_bytes if changed else 2**62


def _changed(spec: JobSpec, changes: dict[str, Any]) -> JobSpec | None:
    """The spec with dotted ``changes``, or None when the spec does not accept them together."""
    from pydantic import ValidationError

    data = spec.model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    if "training.micro_batch_size" in changes:
        data["training"]["global_batch_size"] = spec.training.global_batch_size
    try:
        return JobSpec.model_validate(data)
    except (ValidationError, ValueError):
        return None


def device_memory_here(device_type: str, procs_per_node: int) -> tuple[int, str] | None:
    """The memory of this machine's device of ``device_type`` per rank, and where it came from; None when
    this machine has none (planning a GPU run on a laptop)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != device_type:
        return None
    if device_type == "cpu":  # the ranks of a node share its memory
        return int(acc.total_memory()) // procs_per_node, f"this machine's memory / {procs_per_node} rank(s)"
    return int(acc.total_memory(0)), f"{device_type}:0 of this machine"


def report(plan: MemoryPlan, device_bytes: int | None, spec: JobSpec, source: str = "") -> tuple[list[str], bool]:
    """The plan as text lines, and whether it fits ``device_bytes`` (True when no size is known)."""

    def gib(n: int) -> str:
        return f"{n / 2**30:9.3f} GiB"

    width = max(len(k) for part in (plan.static, *plan.phases.values(), plan.host) for k in part) + 2
    lines = [
        f"memory plan per rank: {plan.world_size} rank(s), ZeRO stage {plan.stage}, {plan.precision}, micro batch "
        f"{spec.training.micro_batch_size} x {spec.data.seq_len} tokens"
    ]
    lines.append("  kept for the whole run")
    lines += [f"    {k:<{width}}{gib(v)}" for k, v in plan.static.items()]
    phase = plan.peak_phase
    lines.append(f"  added by a step, at its peak ({phase})")
    lines += [f"    {k:<{width}}{gib(v)}" for k, v in plan.phases[phase].items() if v]
    others = ", ".join(f"{p} {(plan.static_bytes + sum(v.values())) / 2**30:.3g}" for p, v in plan.phases.items())
    lines.append(f"  {'peak':<{width + 2}}{gib(plan.peak_bytes)}   (GiB at each moment: {others})")
    if plan.host:
        lines.append(f"  {'in CPU memory (offloaded)':<{width + 2}}{gib(sum(plan.host.values()))}")
    lines += [f"  note: {n}" for n in plan.notes]
    if device_bytes is None:
        lines.append("  device memory: unknown here; give --device-memory SIZE (for example 80GB) to check the fit")
        return lines, True
    spare = device_bytes - plan.peak_bytes
    where = f" ({source})" if source else ""
    if spare >= 0:
        lines.append(f"  fits {device_bytes / 2**30:.3g} GiB of device memory{where}: {spare / 2**30:.3g} GiB to spare")
        return lines, True
    over = f"over by {-spare / 2**30:.3g} GiB"
    lines.append(f"  does NOT fit {device_bytes / 2**30:.3g} GiB of device memory{where}: {over}")
    lines += [f"    - {k}" for k in knobs(plan, spec, device_bytes)]
    return lines, False
