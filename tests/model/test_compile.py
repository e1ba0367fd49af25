"""`ParcaeLM.compile_units`: the compiled model gives the eager one's loss and gradients to fp32 round-off,
its parameter names do not change (state dicts, checkpoints and exports read as before), and per-row loop
counts (a batch of however many rows still loop) add no graph after the warm-up: every compile happens
before the first step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import build_model, load_pretrained, save_reference
from tests.model.test_parcae import TINY, grads, ids, randomize

# In one worker with the compiled ZeRO-3 parity case, and before it (tests/conftest.py keeps the order): this
# test's warm-up compiles every variant of the same units (the same widths, shapes dynamic), and that case's
# plain side and both its ranks then load them from inductor's cache (measured alone: the parity case's
# processes 130 CPU-s instead of 225, this test's own 51 unchanged; docs/testing.md).
pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.xdist_group("compile")]


def test_compiled_units_match_eager_and_stop_compiling(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    # a unit that reached the recompile limit would quietly run eager from then on: here it fails instead
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)

    cfg = dataclasses.replace(TINY, activation_checkpointing=True)
    eager = randomize(build_model(cfg, seed=0))
    compiled = randomize(build_model(cfg, seed=0))
    names = list(compiled.state_dict())
    assert compiled.compile_units() == cfg.n_prelude + cfg.n_coda + 1
    assert list(compiled.state_dict()) == names and not any("_orig_mod" in n for n in names)
    before = counters["stats"]["unique_graphs"]
    compiled.warm_up_compiled(seq_len=ids(seed=0).shape[1])
    warm = counters["stats"]["unique_graphs"] - before
    # blocks with and without grad (one code object for all blocks: a variant per value-embedding presence too);
    # the loop body without grad (e requiring grad or not) and with grad (h requiring grad or not)
    assert warm == 2 * (cfg.n_prelude + cfg.n_coda) + 4, warm
    assert all(p.grad is None for p in compiled.parameters())  # the warm-up leaves no gradient behind
    graphs = []
    for step in range(24):
        g = torch.Generator().manual_seed(step)
        loops = (torch.randint(0, 4, (4,), generator=g), torch.randint(1, 4, (4,), generator=g))
        x = ids(seed=step)
        h0 = torch.zeros(*x.shape, cfg.d_model)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(x, x.roll(-1, 1), loops=loops, h0=h0)
            loss.backward()
            results.append((loss.detach(), grads(model)))
        torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
        for name, grad in results[0][1].items():
            torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-3, msg=name)
        if step % 8 == 7:  # evaluation: no grad, the model in eval mode
            compiled.eval()
            with torch.no_grad():
                compiled(x, x.roll(-1, 1), loops=6, h0=h0)
            compiled.train()
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [warm] * len(graphs), graphs  # nothing compiled after the warm-up
    with torch.no_grad():  # generation (KV cache, a position at a time) runs the blocks eager
        compiled.eval()
        compiled.generate(ids(seed=5)[:1, :5], 6, loops=2)
        compiled.train()
    assert counters["stats"]["unique_graphs"] - before == warm
    path = save_reference(compiled, tmp_path / "compiled.safetensors")  # exports read back as eager models
    back = load_pretrained(path)
    with torch.no_grad():
        x = ids(seed=99)
        h0 = torch.zeros(*x.shape, cfg.d_model)
        torch.testing.assert_close(back(x, loops=3, h0=h0), compiled(x, loops=3, h0=h0), atol=1e-5, rtol=1e-5)
