"""The head fused with its cross-entropy over chunks (`model.loss`) against ``F.linear`` + ``F.cross_entropy``:
the same summed loss and gradients in fp32, under bf16 autocast and with bf16 weights, ignored targets
included (a whole chunk of them too)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.loss import linear_cross_entropy


def case(dtype=torch.float32, rows=40, d=24, vocab=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, d, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[:9] = -100  # a whole first chunk of 8 ignored, and one more
    return x, w, targets


def reference(x, w, targets):
    return F.cross_entropy(F.linear(x, w).float(), targets, ignore_index=-100, reduction="sum")


def gradients(loss_fn, x, w, targets):
    x.grad = w.grad = None
    loss = loss_fn(x, w, targets)
    (loss / 31).backward()  # a scale in the backward, as the mean over valid targets gives
    return loss.detach(), x.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_rows", [8, 7, 40, 1000])
def test_fp32_matches_the_unfused_loss(chunk_rows):
    x, w, targets = case()
    got = gradients(lambda *a: linear_cross_entropy(*a, chunk_rows), x, w, targets)
    want = gradients(reference, x, w, targets)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, targets, chunk_rows), want[0], atol=1e-5, rtol=1e-5)


def test_under_bf16_autocast_and_with_bf16_weights_it_matches_to_bf16_rounding():
    x, w, targets = case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gradients(lambda *a: linear_cross_entropy(*a, 8), x, w, targets)
        want = gradients(reference, x, w, targets)
    assert got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
    xb, wb, targets = case(torch.bfloat16)
    got = gradients(lambda *a: linear_cross_entropy(*a, 8), xb, wb, targets)
    want = gradients(reference, xb, wb, targets)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
