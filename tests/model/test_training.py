"""A tiny model learns: 100 steps on a fixed text lower the loss well below the unigram entropy, for Parcae
and both RDM baselines, with per-sequence loop sampling and checkpointing on. (Measured 2026-12-06: the mean
of the last 20 losses is 0.10-0.12 of the entropy at step 100, 0.05 at step 300; the bound is 0.5.)"""

from __future__ import annotations

import codecs
import contextlib
import io
import math

import pytest
import torch

from model import ParcaeConfig, build_model, loop_generator, sample_loop_counts

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen of Python
    import this  # a fixed English text in the standard library (rot13-encoded)

TEXT = codecs.decode(this.s, "rot13")


def unigram_entropy(data: torch.Tensor) -> float:
    p = torch.bincount(data).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


@pytest.mark.slow
@pytest.mark.parametrize("injection", ["diagonal", "add", "concat"])
def test_tiny_model_learns_the_text(injection):
    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT])
    cfg = ParcaeConfig(
        vocab_size=len(chars),
        d_model=64,
        n_head=2,
        n_prelude=1,
        n_core=1,
        n_coda=1,
        max_seq_len=64,
        injection=injection,
        mean_recurrence=3,
        mean_backprop_depth=2,
    )
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    seq, batch, losses = 48, 16, []
    for step in range(100):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        rows = torch.stack([data[s : s + seq + 1] for s in starts])
        loops = sample_loop_counts(batch, cfg.mean_recurrence, cfg.mean_backprop_depth, loop_generator(0, 0, step, 0))
        loss = model(rows[:, :-1], rows[:, 1:], loops=loops)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    entropy = unigram_entropy(data)
    final = sum(losses[-20:]) / 20
    assert all(math.isfinite(x) for x in losses)
    assert final < 0.5 * entropy, f"{injection}: final loss {final:.3f} vs unigram entropy {entropy:.3f}"
