"""KV-cached generation: the same greedy tokens as re-running the sequence, next-token logits equal to fp32
round-off at every step, at 1, 3 and 8 loops and for the GPT baseline; a batch of prompts of different
lengths (left-padded) gives each row what it gives alone; the cache holds (prelude + coda + T x core)
layers x 2 x d per position. Bounded caches (k slots per core layer) run, prefill exactly and report their
drift through teacher-forced scoring; adaptive depth stays within 2..max loops, is fixed depth at threshold 0,
and a row that stopped at loop s gives the fixed-depth-s logits with its loop-s keys in the skipped slots."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from model import ParcaeConfig, build_model, generation
from model.cache import KVCache
from tests.model.test_parcae import TINY, randomize

CFG = dataclasses.replace(TINY, max_seq_len=48)


@pytest.fixture(scope="module")
def model():
    return randomize(build_model(CFG, seed=0), seed=3).eval()


def prompt(batch=3, length=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loops", [1, 3, 8])
def test_cached_generation_is_the_uncached_one(model, loops):
    x = prompt()
    tokens = model.generate(x, 14, loops=loops, use_cache=False)
    assert torch.equal(model.generate(x, 14, loops=loops), tokens)
    cache = KVCache(torch.ones(3, tokens.shape[1], dtype=torch.bool))
    logits = model.forward_cached(tokens[:, :10], cache, loops)  # the prompt, prefilled in one forward
    for end in range(10, tokens.shape[1]):
        zeros = torch.zeros(3, end, CFG.d_model)
        with torch.no_grad():
            full = model(tokens[:, :end], loops=loops, h0=zeros)[:, -1]
        torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
        if end < tokens.shape[1] - 1:
            logits = model.forward_cached(tokens[:, end : end + 1], cache, loops)
    # the cache: every prelude and coda layer once, every core layer once per loop, keys and values of d each
    layers = CFG.n_prelude + CFG.n_coda + loops * CFG.n_core
    assert len(cache.layers) == layers
    assert cache.nbytes() == layers * 2 * CFG.d_model * 3 * tokens.shape[1] * 4  # fp32, capacity positions


def test_prompts_of_different_lengths_are_left_padded(model):
    x = prompt(3, 12, seed=1)
    lengths = [12, 7, 2]
    padded = x.clone()
    for row, n in enumerate(lengths):
        padded[row, : 12 - n] = 0
    out = model.generate(padded, 9, loops=3, lengths=lengths)
    for row, n in enumerate(lengths):
        alone = model.generate(x[row : row + 1, 12 - n :], 9, loops=3, use_cache=False)
        assert torch.equal(out[row, 12:], alone[0, n:]), row
    sampled = model.generate(padded, 9, loops=3, lengths=lengths, temperature=0.8, top_k=20)
    assert sampled.shape == out.shape
    with pytest.raises(ValueError, match="lengths: one length in 1..12 per row"):
        model.generate(padded, 2, lengths=[12, 0, 3])
    with pytest.raises(ValueError, match="rows of different lengths need the cache"):
        model.generate(padded, 2, lengths=lengths, use_cache=False)


def test_the_gpt_baseline_and_generations_longer_than_the_context(model):
    gpt = randomize(build_model(ParcaeConfig(arch="gpt", vocab_size=200, d_model=64, n_head=2, n_layers=3)), 4)
    x = prompt()
    assert torch.equal(gpt.eval().generate(x, 10), gpt.generate(x, 10, use_cache=False))
    # beyond max_seq_len the window slides: the cached call runs the uncached way and agrees with it
    long = model.generate(x, CFG.max_seq_len, loops=2)
    assert torch.equal(long, model.generate(x, CFG.max_seq_len, loops=2, use_cache=False))
    assert long.shape[1] == 10 + CFG.max_seq_len


def test_bounded_caches_keep_k_slots_per_core_layer_and_report_their_drift(model):
    x = prompt()
    exact = model.generate(x, 12, loops=4)
    assert torch.equal(model.generate(x, 12, loops=4, core_slots=4), exact)  # one slot per loop: exact
    for slots in (1, 2):
        bounded = model.generate(x, 12, loops=4, core_slots=slots)
        assert torch.equal(bounded[:, 10], exact[:, 10])  # the prompt is prefilled exactly
        cache = KVCache(torch.ones(3, 22, dtype=torch.bool), core_slots=slots)
        model.forward_cached(exact[:, :10], cache, 4)
        assert len(cache.layers) == CFG.n_prelude + CFG.n_coda + slots * CFG.n_core
        assert cache.nbytes() == len(cache.layers) * 2 * CFG.d_model * 3 * 22 * 4
    # teacher-forced through the exact cache = the full forward's next-token losses
    text = prompt(2, 30, seed=5)
    losses, used = generation.score_cached(model, text, prefix=8, loops=4)
    with torch.no_grad():
        logits = model(text[:, :-1], loops=4, h0=torch.zeros(2, 29, CFG.d_model))[:, 7:, : CFG.vocab_size]
    full = torch.nn.functional.cross_entropy(logits.transpose(1, 2), text[:, 8:], reduction="none")
    torch.testing.assert_close(losses, full, atol=1e-5, rtol=1e-5)
    assert used.shape == losses.shape and bool((used == 4).all())
    drift = generation.score_cached(model, text, prefix=8, loops=4, core_slots=1)[0]
    assert drift.shape == losses.shape and bool(drift.isfinite().all())
    assert torch.allclose(drift[:, 0], losses[:, 0])  # the first prediction is the prefill's
    assert not torch.allclose(drift, losses)  # later ones read earlier tokens at their last loop only
    with pytest.raises(ValueError, match="core_slots: None"):
        KVCache(torch.ones(1, 4, dtype=torch.bool), core_slots=0)
    with pytest.raises(ValueError, match="need the cache"):
        model.generate(x, 2, core_slots=1, use_cache=False)


def test_adaptive_depth_stops_rows_early_and_never_exceeds_its_maximum(model):
    x = prompt()
    fixed = model.generate(x, 10, loops=6)
    used: list[torch.Tensor] = []
    # threshold 0 never stops early: fixed depth, the same tokens
    assert torch.equal(model.generate(x, 10, loops=6, adaptive=0.0), fixed)
    text = prompt(3, 24, seed=7)
    _, used0 = generation.score_cached(model, text, prefix=6, loops=6, adaptive=0.0)
    assert bool((used0 == 6).all())
    # an infinite threshold stops every decoding step at the first comparison (after 2 loops)
    _, used_inf = generation.score_cached(model, text, prefix=6, loops=6, adaptive=float("inf"))
    assert bool((used_inf[:, 0] == 6).all()) and bool((used_inf[:, 1:] == 2).all())
    # a middle threshold: rows stop at different loops, all within 2..6
    threshold = 1e-3
    _, used_mid = generation.score_cached(model, text, prefix=6, loops=6, adaptive=threshold)
    assert int(used_mid.min()) >= 2 and int(used_mid.max()) <= 6
    assert len(set(used_mid[:, 1:].flatten().tolist())) > 1, used_mid

    # one decoding step: a row that stopped at loop s gives the fixed-depth-s logits, and its keys and values
    # of loop s fill the slots of the loops it skipped
    for step in range(1, used_mid.shape[1]):
        if int(used_mid[:, step].min()) < 6:
            break
    n = 6 + step - 1  # positions cached before this step
    cache = KVCache(torch.ones(3, 24, dtype=torch.bool))
    model.forward_cached(text[:, :6], cache, 6)
    for pos in range(6, n):
        model.forward_cached(text[:, pos : pos + 1], cache, 6, threshold)
    before = copy.deepcopy(cache)
    used = []
    logits = model.forward_cached(text[:, n : n + 1], cache, 6, threshold, used)
    for row, s in enumerate(used[0].tolist()):
        alone = copy.deepcopy(before)
        fixed_s = model.forward_cached(text[:, n : n + 1], alone, s)
        torch.testing.assert_close(logits[row], fixed_s[row], atol=1e-5, rtol=1e-5)
        for block in model.transformer.recurrence.core_block:
            for loop in range(s, 6):
                assert torch.equal(
                    cache.core(loop, block.layer).k[row, :, n], cache.core(s - 1, block.layer).k[row, :, n]
                )
    assert min(used[0].tolist()) < 6
    with pytest.raises(ValueError, match="adaptive: a KL threshold >= 0"):
        model.generate(x, 2, adaptive=-1.0)
