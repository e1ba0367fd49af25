"""The FLOP formulas against the FLOPs a training step executes, counted by PyTorch's own FlopCounterMode.

`hardware_flops_per_token` is MFU's numerator and `recompute_flops_per_token` what per-loop checkpointing
adds (HFU's numerator is their sum): both must be what the matmuls and attention of a step compute.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, mm_flop, sdpa_backward_flop_count, sdpa_flop_count

from model import ParcaeConfig, build_model, hardware_flops_per_token, recompute_flops_per_token

aten = torch.ops.aten
TINY = ParcaeConfig(vocab_size=512, d_model=64, n_head=2, n_prelude=1, n_core=2, n_coda=1, max_seq_len=32)


def _cpu_attention(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, **kwargs) -> int:
    # PyTorch counts 5 products here: the gradients' 4 and the score matrix the kernel recomputes (as flash
    # attention's backward does on GPUs too). MFU counts a backward as twice the forward (PaLM, nanochat):
    # the recomputed scores are the kernel's own recomputation, left out like checkpointing's.
    counted = sdpa_backward_flop_count(grad_out, query, key, value)
    forward = sdpa_flop_count(query, key, value)
    assert counted == 2.5 * forward
    return 2 * forward


def _addmm_in_place(accumulator, a, b, *args, **kwargs) -> int:
    return mm_flop(a, b)


# What the counter does not know on CPU: the flash attention kernel CPUs run, and the in-place addmm_ the
# fused loss accumulates the head's gradient with.
CPU_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
    aten.addmm_: _addmm_in_place,
}


def executed_per_token(cfg: ParcaeConfig, loops: tuple[int, int] | None, batch: int = 3, seq: int = 32) -> float:
    model = build_model(cfg, seed=0)
    idx = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    counts = None if loops is None else tuple(torch.full((batch,), n) for n in loops)
    with FlopCounterMode(display=False, custom_mapping=CPU_OPS) as counter:
        model(idx[:, :-1], idx[:, 1:], loops=counts).backward()
    return counter.get_total_flops() / (batch * seq)


@pytest.mark.parametrize("injection", ["diagonal", "add", "concat"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_looped_model_executes_the_flops_the_formulas_count(injection, checkpointing):
    cfg = dataclasses.replace(TINY, injection=injection, activation_checkpointing=checkpointing)
    no_grad, grad = 2, 3
    executed = executed_per_token(cfg, (no_grad, grad))
    model = hardware_flops_per_token(cfg, 32, mean_recurrence=no_grad + grad, mean_backprop_depth=grad)
    recompute = recompute_flops_per_token(cfg, 32, mean_recurrence=no_grad + grad, mean_backprop_depth=grad)
    # the formulas also count the elementwise parameters (norm gains, the injection's A and dt) as 2 FLOPs
    # a use, which no matmul computes: 0.3% of this tiny model's count, far less at real widths
    assert executed == pytest.approx(model + recompute, rel=0.005)
    assert (recompute > 0) == checkpointing


def test_checkpointing_adds_one_forward_of_each_backpropagated_loop():
    on, off = (dataclasses.replace(TINY, activation_checkpointing=c) for c in (True, False))
    for no_grad, grad in ((0, 1), (2, 3), (4, 0)):
        added = executed_per_token(on, (no_grad, grad)) - executed_per_token(off, (no_grad, grad))
        assert added == pytest.approx(recompute_flops_per_token(on, 32, no_grad + grad, grad), rel=0.005, abs=1)


def test_the_gpt_baseline_executes_its_count_and_recomputes_nothing():
    cfg = dataclasses.replace(TINY, arch="gpt", n_layers=4)
    assert recompute_flops_per_token(cfg, 32) == 0.0
    assert executed_per_token(cfg, None) == pytest.approx(hardware_flops_per_token(cfg, 32), rel=0.005)
