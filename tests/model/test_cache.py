"""KV-cached generation: the same greedy tokens as re-running the sequence, next-token logits equal to fp32
round-off at every step, at 1, 3 and 8 loops and for the GPT baseline; a batch of prompts of different
lengths (left-padded) gives each row what it gives alone; the cache holds (prelude + coda + T x core)
layers x 2 x d per position."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import ParcaeConfig, build_model
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
