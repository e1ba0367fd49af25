"""The LM head and its cross-entropy fused over chunks of positions: the fp32 logits of one chunk exist at a time.

`linear_cross_entropy(x, weight, targets, chunk_rows)` is the summed cross-entropy of ``x @ weight.T``
against ``targets`` (-100 ignored). Under gradient it computes, chunk by chunk, the loss and at once the
gradients with respect to ``x`` and ``weight`` (the softmax minus the one-hot target, turned in place in
the chunk's logits buffer, times ``weight`` and ``x``), and keeps those two gradients for the backward,
which only scales them. Peak memory is one chunk's logits plus the two gradients (which a backward makes
anyway), instead of the logits, their log-softmax and their gradient for every position; nothing is
recomputed. Autocast applies to its matmuls as to ``F.linear``: under bf16 autocast the logits are
computed in bf16 and the loss in fp32, like ``F.linear(...).float()`` followed by ``F.cross_entropy``.
"""

from __future__ import annotations

import torch

IGNORE = -100


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """Summed cross-entropy of (rows, d) states through the (vocab, d) head against (rows,) targets."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.size(0), chunk_rows):
        part = slice(start, start + chunk_rows)
        total = total + _chunk(x[part], weight, targets[part], with_grad=False)[0]
    return total


def _chunk(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grad: bool):
    """The summed loss of a chunk and, ``with_grad``, the gradient of that sum w.r.t. its logits (fp32).
    One (rows, vocab) buffer: the logits, turned in place into their softmax and then into the gradient."""
    logits = torch.mm(x, weight.t()).float()  # autocast (if on) runs the matmul in its dtype
    valid = targets != IGNORE
    safe = targets.masked_fill(~valid, 0)
    target_logit = logits.gather(1, safe[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()  # in place: the logits are not needed again
    norm = exp.sum(dim=-1, keepdim=True)
    lse = (norm.log() + top).squeeze(1)
    loss = ((lse - target_logit) * valid).sum()
    if not with_grad:
        return loss, None
    grad = exp.div_(norm)  # softmax
    grad.scatter_add_(1, safe[:, None], -valid[:, None].to(grad.dtype))  # minus the one-hot target
    grad.masked_fill_(~valid[:, None], 0.0)  # ignored positions contribute nothing (in place, no temporary)
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        autocast = torch.is_autocast_enabled(x.device.type)
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.size(0), chunk_rows):
            part = slice(start, start + chunk_rows)
            loss, grad = _chunk(x[part], weight, targets[part], with_grad=True)
            total += loss
            # the logits' gradient in the matmuls' dtype, as autograd hands it to F.linear's backward
            grad = grad if autocast else grad.to(weight.dtype)
            if grad_x is not None:
                grad_x[part] = torch.mm(grad, weight)
            if grad_w is not None and grad.dtype == x.dtype == torch.float32:
                grad_w.addmm_(grad.t(), x[part])  # accumulated in place
            elif grad_w is not None:
                grad_w += torch.mm(grad.t(), x[part]).float()  # low-precision matmul, accumulated in fp32
            del grad  # before the next chunk's logits are allocated: one chunk's buffer at a time
        # Kept as attributes, not saved tensors, so the backward can drop its references before handing them
        # on: autograd's gradient accumulation then takes them as they are instead of copying them.
        ctx.grads, ctx.weight_dtype = (grad_x, grad_w), weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        if grad_x is not None:
            grad_x = grad_x.mul_(grad_out.to(grad_x.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None
