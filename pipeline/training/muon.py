"""The Parcae reference's Muon variant, as pure functions of (gradient, parameter, state, hyperparameters).

For one 2-D matrix W with gradient G, momentum M and per-neuron second moment v, at step t:

    mu_t = linear from 0.85 to 0.95 over the first 300 steps          (momentum warm-up)
    M   <- lerp(M, G, 1 - mu_t);  D = lerp(G, M, mu_t)                 (Nesterov-style)
    O    = Polar Express(D): in bf16, X = D / (1.02 ||D||_F + 1e-6), then five iterations
           X <- a X + (b A + c A^2) X, A = X X^T (the transposed form for tall matrices)
    v   <- lerp(v, mean(O^2 along the reduction dim), 1 - beta2)      (beta2 = 0.95; the reduction dim is
           the last when rows >= cols, else the second last: v is one value per row, or per column)
    U    = O / sqrt(v), rescaled so that ||U||_F = ||O||_F             (NorMuon-style normalisation)
    lr_t = lr x max(1, rows / cols)^0.5;  wd_t = wd x (1 - t / T)      (decoupled decay, linear to 0)
    W   <- W - lr_t U - lr_t wd_t W [U W >= 0]                         (cautious weight decay)

`pipeline.training.muon_engine` runs this under ZeRO-3; a plain PyTorch loop can call `muon_step`.
"""

from __future__ import annotations

import math

import torch

# (a, b, c) of each Polar Express iteration (Amsel et al. 2025; five iterations, safety factor 2e-2, cushion 2)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
SECOND_MOMENT_FLOOR = 1e-10


def momentum_at(step: int, start: float, end: float, warmup_steps: int) -> float:
    """The momentum at optimizer step ``step`` (0-based): ``start`` rising linearly to ``end``."""
    if warmup_steps <= 0:
        return end
    return start + (end - start) * min(step / warmup_steps, 1.0)


def weight_decay_at(step: int, total_steps: int, weight_decay: float) -> float:
    """The Muon weight decay at step ``step`` (0-based), linear from ``weight_decay`` to 0 over the run."""
    return weight_decay * max(0.0, 1.0 - step / max(total_steps, 1))


def aspect_scale(rows: int, cols: int) -> float:
    return math.sqrt(max(1.0, rows / cols))


def reduction_dim(shape: torch.Size | tuple[int, ...]) -> int:
    """The dimension v averages over: the last when rows >= cols (v per row), else the second last."""
    return -1 if shape[-2] >= shape[-1] else -2


def second_moment_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    return (shape[-2], 1) if reduction_dim(shape) == -1 else (1, shape[-1])


def polar_express(direction: torch.Tensor) -> torch.Tensor:
    """An approximately orthogonal matrix with the singular vectors of ``direction`` (bf16 result)."""
    x = direction.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def muon_direction(
    grad: torch.Tensor, momentum: torch.Tensor, second_moment: torch.Tensor, mu: float, beta2: float = 0.95
) -> torch.Tensor:
    """The normalised update U for one matrix; updates ``momentum`` and ``second_moment`` in place.
    ``grad`` is not modified. U is returned in fp32."""
    momentum.lerp_(grad, 1 - mu)
    direction = grad.lerp(momentum, mu)
    orthogonal = polar_express(direction).float()
    mean_square = orthogonal.square().mean(dim=reduction_dim(orthogonal.shape), keepdim=True)
    second_moment.lerp_(mean_square.to(second_moment.dtype), 1 - beta2)
    normalised = orthogonal * second_moment.float().clamp_min(SECOND_MOMENT_FLOOR).rsqrt()
    return normalised * (orthogonal.norm() / normalised.norm().clamp_min(SECOND_MOMENT_FLOOR))


def cautious_update(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W <- W - lr U - lr wd W [U W >= 0], in place (``lr`` already scaled for the matrix's aspect)."""
    mask = (update * param) >= 0
    param.sub_(lr * update + lr * weight_decay * param * mask)


def muon_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    step: int,
    total_steps: int,
    lr: float,
    weight_decay: float,
    momentum_start: float = 0.85,
    momentum_end: float = 0.95,
    momentum_warmup_steps: int = 300,
    beta2: float = 0.95,
) -> None:
    """One whole Muon step of one matrix, in place (``lr`` is the scheduled rate before the aspect scale)."""
    mu = momentum_at(step, momentum_start, momentum_end, momentum_warmup_steps)
    update = muon_direction(grad, momentum, second_moment, mu, beta2).to(param.dtype)
    scaled = lr * aspect_scale(param.shape[-2], param.shape[-1])
    cautious_update(param, update, scaled, weight_decay_at(step, total_steps, weight_decay))
