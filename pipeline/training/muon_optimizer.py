"""`MuonAdamW`: the reference's Muon variant (`pipeline.training.muon`) for the blocks' matrices and AdamW
for everything else, as one torch optimizer that DeepSpeed ZeRO-3 drives like any other.

DeepSpeed gives the optimizer flat fp32 partitions (one per ZeRO sub-group, each the concatenation of
its parameters' partitions), clips the raw gradients first (as the reference does), and calls `step`
once per sub-group. AdamW is elementwise and runs on the partitions as they are. A Muon update needs
whole matrices, so this is the one place that knows ZeRO-3's layout (`bind_zero3`): for each matrix of a
sub-group, the ranks `gather` their gradient partitions to the matrix's owner (matrices are dealt out
round-robin, the same every step), the owner runs the update with the matrix's momentum and second
moment, which only it keeps, and `scatter`s the update back; every rank then applies the cautious step
to its own partition. Optimizer state (per-matrix momentum and second moment on their owners, AdamW's
moments, the step count) lives in ``self.state`` of the flat partitions, so DeepSpeed saves and restores
it with every checkpoint, and a resumed run continues with identical updates.

Without ZeRO-3 (a plain module, or stage 0) the parameters are whole and each is updated directly.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.training.muon import (
    aspect_scale,
    cautious_update,
    momentum_at,
    muon_direction,
    second_moment_shape,
    weight_decay_at,
)


def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """Decoupled AdamW with bias correction, in place; ``state["step"]`` counts this parameter's steps."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
    state["step"] = state.get("step", 0) + 1
    beta1, beta2 = betas
    param.mul_(1 - lr * weight_decay)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].lerp_(grad.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
    denom = (state["exp_avg_sq"] / bias2).sqrt() + eps
    param.add_(state["exp_avg"] / denom, alpha=-lr / bias1)


class MuonAdamW(torch.optim.Optimizer):
    """Param groups: ``{"params", "kind": "muon", "lr", "weight_decay"}`` (2-D matrices) and ``{"params",
    "kind": "adamw", "lr", "betas", "eps", "weight_decay"}``. ``total_steps`` drives the Muon weight
    decay's linear decay; the momentum warms up from ``momentum_start`` to ``momentum_end``."""

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        *,
        total_steps: int,
        momentum_start: float = 0.85,
        momentum_end: float = 0.95,
        momentum_warmup_steps: int = 300,
        beta2: float = 0.95,
    ):
        defaults = {"total_steps": total_steps, "momentum_start": momentum_start, "momentum_end": momentum_end}
        defaults.update(momentum_warmup_steps=momentum_warmup_steps, beta2=beta2)
        super().__init__(param_groups, defaults)
        self.layouts: dict[int, list[tuple[torch.Size, int, int, int]]] = {}

    def bind_zero3(self, zero_optimizer: Any) -> None:
        """Learn where each matrix sits in ZeRO-3's flat partitions: (shape, offset, partition size, numel)."""
        for params, flat in zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat, strict=True):
            entries, offset = [], 0
            for param in params:
                part = param.partition_numel()
                entries.append((param.ds_shape, offset, part, param.ds_numel))
                offset += part
            assert offset <= flat.numel(), "ZeRO-3's flat partition is not its parameters' partitions in order"
            self.layouts[id(flat)] = entries

    def _schedule(self, group: dict[str, Any], step: int) -> tuple[float, float]:
        mu = momentum_at(step, group["momentum_start"], group["momentum_end"], group["momentum_warmup_steps"])
        return mu, weight_decay_at(step, group["total_steps"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None
        for group in self.param_groups:
            for tensor in group["params"]:
                if tensor.grad is None:
                    continue
                state = self.state[tensor]
                if group["kind"] == "adamw":
                    adamw_update(
                        tensor,
                        tensor.grad,
                        state,
                        lr=group["lr"],
                        betas=group["betas"],
                        eps=group["eps"],
                        weight_decay=group["weight_decay"],
                    )
                elif id(tensor) in self.layouts:
                    self._muon_partitions(tensor, group, state)
                else:
                    self._muon_matrix(tensor, group, state)

    def _muon_matrix(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        step = state.get("step", 0)
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(param, dtype=torch.float32)
            state["second_moment"] = torch.zeros(second_moment_shape(param.shape), dtype=torch.float32)
        mu, wd = self._schedule(group, step)
        update = muon_direction(param.grad.float(), state["momentum"], state["second_moment"], mu, group["beta2"])
        cautious_update(param, update.to(param.dtype), group["lr"] * aspect_scale(*param.shape[-2:]), wd)
        state["step"] = step + 1

    def _muon_partitions(self, flat: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        step = state.get("step", 0)
        mu, wd = self._schedule(group, step)
        momentum, second = state.setdefault("momentum", {}), state.setdefault("second_moment", {})
        for index, (shape, offset, part, numel) in enumerate(self.layouts[id(flat)]):
            owner = index % world
            grad_part = flat.grad.narrow(0, offset, part).contiguous()
            parts = [torch.empty_like(grad_part) for _ in range(world)] if rank == owner else None
            dist.gather(grad_part, parts, dst=owner)
            pieces = None
            if rank == owner:
                assert parts is not None
                grad = torch.cat(parts)[:numel].view(shape).float()
                if index not in momentum:
                    momentum[index] = torch.zeros(shape, dtype=torch.float32, device=grad.device)
                    second[index] = torch.zeros(second_moment_shape(shape), dtype=torch.float32, device=grad.device)
                update = muon_direction(grad, momentum[index], second[index], mu, group["beta2"])
                padded = torch.zeros(part * world, dtype=flat.dtype, device=flat.device)
                padded[:numel] = update.flatten().to(flat.dtype)
                pieces = list(padded.split(part))
            mine = torch.empty_like(grad_part)
            dist.scatter(mine, pieces, src=owner)
            cautious_update(flat.narrow(0, offset, part), mine, group["lr"] * aspect_scale(shape[-2], shape[-1]), wd)
        state["step"] = step + 1
