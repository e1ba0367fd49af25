"""A ZeRO-3 checkpoint written by W ranks, rewritten for the W' ranks of the engine that resumes it.

DeepSpeed (0.19) loads a ZeRO-3 checkpoint only on the world size that wrote it, and its universal
checkpoint knows AdamW's moments only, not our Muon's per-matrix state. Its files are plain, though: rank r
of W keeps, for every parameter of every sub-group, elements [r p, (r + 1) p) of the flattened parameter
(p = ceil(numel / W), the last piece zero-padded), concatenated in the sub-group's order, for the fp32
master weights (``fp32_flat_groups``) and for every optimizer state of that shape (AdamW's ``exp_avg``,
``exp_avg_sq``); Muon's momentum and second moment are whole matrices, kept by the rank that owns the
matrix (its index in the sub-group modulo W, `MuonAdamW`). The parameter names and shapes of each
sub-group are in every rank's model-states file (``param_shapes``).

`reshard` writes, for one rank of the new engine, the two files DeepSpeed reads on that rank: its pieces
cut from the pieces of the old ranks that hold them (old files are memory-mapped, so a rank reads only
what it needs), and the matrices it now owns. Exact: values are copied, nothing is recomputed. Every other
field (steps, learning-rate schedule, the trainer's parts) is the old rank 0's.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any

import torch

from parcae_errors import ParcaeError

log = logging.getLogger(__name__)

MUON_STATES = ("momentum", "second_moment")  # per-matrix state of `MuonAdamW`, keyed by index in the sub-group


class ReshardError(ParcaeError):
    """A checkpoint that cannot be rewritten for another world size (names what and why)."""


def files(tag_dir: Path, rank: int) -> tuple[Path, Path]:
    """(model states, optimizer states) of data-parallel rank ``rank`` in a checkpoint directory."""
    return (
        tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
        tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
    )


def world_size_of(tag_dir: Path) -> int:
    """The number of data-parallel ranks that wrote a checkpoint (its optimizer-state files)."""
    return len(list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def _load(path: Path) -> dict[str, Any]:
    # our own checkpoint (DeepSpeed pickles its enums), memory-mapped: only the pieces used are read
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


class _Old:
    """The pieces of a checkpoint of W ranks, by parameter name."""

    def __init__(self, tag_dir: Path):
        self.world = world_size_of(tag_dir)
        self.models = [_load(files(tag_dir, r)[0]) for r in range(self.world)]
        first, *others = [_load(files(tag_dir, r)[1]) for r in range(self.world)]
        self.top = {k: v for k, v in first.items() if k != "optimizer_state_dict"}  # DeepSpeed's config, version
        self.optims = [whole["optimizer_state_dict"] for whole in (first, *others)]
        self.where: dict[str, tuple[int, int, int, int]] = {}  # name: (sub-group, index, offset, numel)
        for group, shapes in enumerate(self.models[0]["param_shapes"]):
            offset = 0
            for index, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self.where[name] = (group, index, offset, numel)
                offset += math.ceil(numel / self.world)

    def flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        optim = self.optims[rank]
        if key == "fp32":
            return optim["fp32_flat_groups"][group]
        return optim["optimizer_state_dict"]["state"][group][key]

    def elements(self, name: str, key: str, start: int, length: int) -> torch.Tensor:
        """Elements [start, start + length) of parameter ``name``'s flattened ``key`` (zeros past its end)."""
        group, _, offset, numel = self.where[name]
        part = math.ceil(numel / self.world)
        out = torch.zeros(length, dtype=torch.float32)
        end = min(start + length, numel)
        at = start
        while at < end:
            rank, inside = divmod(at, part)
            take = min(part - inside, end - at)
            source = self.flat(rank, group, key)
            out[at - start : at - start + take] = source[offset + inside : offset + inside + take].float()
            at += take
        return out

    def matrix(self, name: str, key: str) -> torch.Tensor | None:
        """Muon's ``key`` of a matrix, from the rank that owned it (None before its first update)."""
        group, index, _, _ = self.where[name]
        held = self.optims[index % self.world]["optimizer_state_dict"]["state"][group].get(key, {})
        return held[index].clone() if index in held else None


def reshard(old_dir: Path, new_dir: Path, engine: Any, rank: int) -> None:
    """Write rank ``rank``'s model-states and optimizer-states files of the checkpoint in ``old_dir`` for the
    world size and layout of ``engine`` (a DeepSpeed ZeRO-3 engine) into ``new_dir``."""
    old = _Old(old_dir)
    zero = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    world = engine.world_size
    missing = [names[id(p)] for group in zero.fp16_groups for p in group if names[id(p)] not in old.where]
    if missing or len(old.where) != sum(len(g) for g in zero.fp16_groups):
        raise ReshardError(f"{old_dir}: its parameters are not this model's ({', '.join(missing[:3]) or 'count'})")
    optim = old.optims[0]
    base = optim["optimizer_state_dict"]
    groups_of = {sub: g for g, group in enumerate(base["param_groups"]) for sub in group["params"]}
    flats, states, shapes, params_of = [], {}, [], [[] for _ in base["param_groups"]]
    for sub, params in enumerate(zero.fp16_groups):
        size = zero.fp32_partitioned_groups_flat[sub].numel()
        first = old.where[names[id(params[0])]][0]  # an old sub-group of the same parameter group
        template = base["state"].get(first, {})
        tensors = {k for k, v in template.items() if torch.is_tensor(v) and v.dim() == 1 and k not in MUON_STATES}
        pieces: dict[str, torch.Tensor] = {key: torch.zeros(size) for key in ("fp32", *sorted(tensors))}
        state: dict[str, Any] = {k: copy.deepcopy(v) for k, v in template.items() if k not in tensors}
        for key in MUON_STATES:
            if key in state:
                state[key] = {}
        offset = 0
        for index, param in enumerate(params):
            name, part = names[id(param)], param.partition_numel()
            for key, flat in pieces.items():
                flat[offset : offset + part] = old.elements(name, key, rank * part, part)
            for key in MUON_STATES:
                if key in state and index % world == rank:
                    value = old.matrix(name, key)
                    if value is not None:
                        state[key][index] = value
            offset += part
        dtypes = {k: template[k].dtype for k in tensors} | {"fp32": optim["fp32_flat_groups"][first].dtype}
        flats.append(pieces.pop("fp32").to(dtypes["fp32"]))
        state.update({k: v.to(dtypes[k]) for k, v in pieces.items()})
        states[sub] = state
        shapes.append({names[id(p)]: p.ds_shape for p in params})
        params_of[groups_of[first]].append(sub)
    param_groups = [{**g, "params": params_of[i]} for i, g in enumerate(base["param_groups"])]
    new_optim = {
        **{k: v for k, v in optim.items() if k not in ("optimizer_state_dict", "fp32_flat_groups", "partition_count")},
        "partition_count": world,
        "optimizer_state_dict": {"state": states, "param_groups": param_groups},
        "fp32_flat_groups": flats,
    }
    model = {**old.models[0], "param_shapes": shapes, "dp_world_size": world}
    new_dir.mkdir(parents=True, exist_ok=True)
    model_file, optim_file = files(new_dir, rank)
    for content, file in (({**old.top, "optimizer_state_dict": new_optim}, optim_file), (model, model_file)):
        part = file.with_name(file.name + ".part")  # a conversion cut off is made again, never loaded half
        torch.save(content, part)
        part.replace(file)
