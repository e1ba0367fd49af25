"""Inference for the looped model and the GPT baseline: KV-cached forward, adaptive depth, generation, and
teacher-forced scoring through the cache (imports torch and the cache only; `ParcaeLM` calls these).

- ``forward_cached``: new positions go through every layer against a `KVCache` (each core layer once per
  loop, h_0 = 0) and are added to it. Every row loops ``loops`` times, the training forward's loop.
- Adaptive depth (Huginn's exit rule): with ``adaptive=kl`` a decoding step (one new position per row)
  stops looping a row once the next-token distributions of two successive loops are within ``kl``
  (KL(p_{t-1} || p_t), the coda and head run after every loop to get them), and at ``loops`` at the
  latest; the rows still looping are the only ones computed. A row that stopped at loop s has its keys
  and values of loop s copied into the slots of the loops it skipped, so later tokens read every earlier
  token at the deepest loop it reached. The prompt (a step of several positions) always runs ``loops``.
  ``kl = 0`` never stops early (KL is clamped at 0 and the test is strict): fixed depth, same tokens.
- ``stream`` / ``generate``: prefill once, then one token at a time; the uncached path (a full forward
  over the last max_seq_len tokens per new token) stays for comparison and for generations longer than
  the context.
- ``score_cached``: the next-token loss of given text read one token at a time through the cache (after a
  prefilled prefix), as generation would see it: the cost in quality of a bounded cache or adaptive depth.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.cache import KVCache

ParcaeLM = nn.Module  # a model.parcae.ParcaeLM (which calls these functions, so it is not imported here)


@torch.no_grad()
def forward_cached(
    model: ParcaeLM,
    idx: torch.Tensor,
    cache: KVCache,
    loops: int | None = None,
    adaptive: float | None = None,
    loops_used: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The next-token logits (batch, padded vocab) after ``idx`` (batch, t), which is added to ``cache``.
    ``loops_used``, if a list, receives the (batch,) loop counts this step ran."""
    b, t = idx.shape
    rope = model.rope(t, idx.device, start=cache.n)
    tr = model.transformer
    x = tr.wte(idx)
    if not model.cfg.looped:
        if adaptive is not None:
            raise ValueError("adaptive depth needs a looped model (this is arch=gpt)")
        for block in tr.h:
            x = block(x, rope, model._value_embedding(block, idx), cache.layer(("h", 0, block.layer)))
        cache.advance(t)
        return model._head(x[:, -1:], None)[:, -1]
    loops = model.cfg.mean_recurrence if loops is None else loops
    if loops < 1:
        raise ValueError(f"loops must be >= 1, got {loops}")
    if adaptive is not None and adaptive < 0:
        raise ValueError(f"adaptive: a KL threshold >= 0, got {adaptive}")
    for block in tr.prelude:
        x = block(x, rope, model._value_embedding(block, idx), cache.layer(("prelude", 0, block.layer)))
    e = tr.ln_prelude(x)
    h = torch.zeros_like(e)
    if adaptive is None or t > 1:
        for loop in range(loops):
            h = _core(model, h, e, idx, rope, cache, loop, None)
        logits = _coda(model, h, idx, rope, cache, None)
        used = torch.full((b,), loops, dtype=torch.long)
    else:
        logits, used = _adaptive(model, h, e, idx, rope, cache, loops, adaptive)
    if loops_used is not None:
        loops_used.append(used)
    cache.advance(t)
    return logits


def _core(model: ParcaeLM, h, e, idx, rope, cache: KVCache, loop: int, rows: torch.Tensor | None) -> torch.Tensor:
    """One loop of the rows ``rows`` (all when None); h, e, idx hold those rows only."""
    recurrence = model.transformer.recurrence
    u = recurrence.adapter(h, e)
    for block in recurrence.core_block:
        key = str(block.layer)
        ve = recurrence.value_embeds[key](idx) if key in recurrence.value_embeds else None
        u = block(u, rope, ve, cache.core(loop, block.layer).rows(rows))
    return u


def _coda(model: ParcaeLM, h, idx, rope, cache: KVCache, rows: torch.Tensor | None) -> torch.Tensor:
    """The last position's logits (rows, padded vocab) from the final states ``h`` of ``rows``."""
    x = model.transformer.C(h)
    for block in model.transformer.coda:
        x = block(x, rope, model._value_embedding(block, idx), cache.layer(("coda", 0, block.layer)).rows(rows))
    return model._head(x[:, -1:], None)[:, -1]


def _adaptive(model: ParcaeLM, h, e, idx, rope, cache: KVCache, loops: int, threshold: float):
    b = idx.shape[0]
    active = torch.arange(b, device=idx.device)
    used = torch.full((b,), loops, dtype=torch.long)
    logits: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    for loop in range(loops):
        h_active = _core(model, h[active], e[active], idx[active], rope, cache, loop, active)
        h = h.index_copy(0, active, h_active)
        # the coda's keys and values of a row are rewritten each loop: the last write is its exit loop's
        step_logits = _coda(model, h_active, idx[active], rope, cache, active)
        if logits is None:
            logits = step_logits.new_empty(b, step_logits.shape[-1])
        logits[active] = step_logits
        if loop == loops - 1:
            break
        logp = step_logits.float().log_softmax(-1)
        if previous is not None:
            kl = (previous.exp() * (previous - logp)).sum(-1).clamp_min(0)
            stop = kl < threshold
            if stop.any():
                stopped = active[stop]
                used[stopped.cpu()] = loop + 1
                _fill_skipped_loops(model, cache, stopped, loop, loops)
                active, logp = active[~stop], logp[~stop]
                if not len(active):
                    break
        previous = logp
    assert logits is not None
    return logits, used


def _fill_skipped_loops(model: ParcaeLM, cache: KVCache, rows: torch.Tensor, last: int, loops: int) -> None:
    """Rows that stopped after loop ``last``: later tokens read them at that loop in the loops they skip."""
    for block in model.transformer.recurrence.core_block:
        source = cache.core(last, block.layer)
        for loop in range(last + 1, loops):
            target = cache.core(loop, block.layer)
            if target is not source:
                target.copy_position(source, rows)


@torch.no_grad()
def stream(
    model: ParcaeLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    loops: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    lengths: list[int] | None = None,
    vocab: int | None = None,
    core_slots: int | None = None,
    adaptive: float | None = None,
    loops_used: list[torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """`ParcaeLM.generate`, one step at a time: yields each step's new tokens, (batch, 1)."""
    cfg = model.cfg
    vocab = min(vocab or cfg.vocab_size, cfg.vocab_size)
    b, t = idx.shape
    if lengths is not None and (len(lengths) != b or not all(1 <= n <= t for n in lengths)):
        raise ValueError(f"lengths: one length in 1..{t} per row of idx, got {lengths}")
    fits = t + max_new_tokens <= cfg.max_seq_len
    if (core_slots is not None or adaptive is not None) and not (use_cache and fits):
        raise ValueError(
            "core_slots and adaptive need the cache (use_cache=True, prompt + new tokens within max_seq_len)"
        )
    if use_cache and fits:
        real = torch.ones(b, t + max_new_tokens, dtype=torch.bool, device=idx.device)
        for row, n in enumerate(lengths or []):
            real[row, : t - n] = False
        cache = KVCache(real, core_slots)
        logits = forward_cached(model, idx, cache, loops)  # the prompt: every loop
        for step in range(max_new_tokens):
            next_id = pick(logits[:, :vocab], temperature, top_k, generator)
            yield next_id
            if step + 1 < max_new_tokens:
                logits = forward_cached(model, next_id, cache, loops, adaptive, loops_used)
        return
    if lengths is not None and len(set(lengths)) > 1:
        raise ValueError("rows of different lengths need the cache (use_cache=True, within max_seq_len)")
    loops = cfg.mean_recurrence if loops is None else loops
    for _ in range(max_new_tokens):
        window = idx[:, -cfg.max_seq_len :]
        h0 = torch.zeros(*window.shape, cfg.d_model, device=idx.device) if cfg.looped else None
        logits = model(window, loops=loops if cfg.looped else None, h0=h0)[:, -1]
        next_id = pick(logits[:, :vocab], temperature, top_k, generator)
        idx = torch.cat((idx, next_id), dim=1)
        yield next_id


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """The next token of each row (``logits`` cut to the ids that may be generated)."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def score_cached(
    model: ParcaeLM,
    ids: torch.Tensor,
    prefix: int,
    loops: int | None = None,
    core_slots: int | None = None,
    adaptive: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``ids`` (batch, n) as generation would: prefill ``ids[:, :prefix]``, then one token at a time
    through the cache. Returns the next-token losses of positions prefix..n-1 (batch, n - prefix), and the
    loops each of those predictions ran (batch, n - prefix; the first one's is the prefill's)."""
    b, n = ids.shape
    if not 1 <= prefix < n:
        raise ValueError(f"prefix: 1..{n - 1}, got {prefix}")
    loops = model.cfg.mean_recurrence if loops is None else loops
    cache = KVCache(torch.ones(b, n, dtype=torch.bool, device=ids.device), core_slots)
    used: list[torch.Tensor] = []
    logits = forward_cached(model, ids[:, :prefix], cache, loops, None, used)
    losses = []
    for pos in range(prefix, n):
        losses.append(F.cross_entropy(logits[:, : model.cfg.vocab_size].float(), ids[:, pos], reduction="none"))
        if pos + 1 < n:
            logits = forward_cached(model, ids[:, pos : pos + 1], cache, loops, adaptive, used)
    return torch.stack(losses, 1), torch.stack(used, 1) if used else torch.zeros(b, n - prefix, dtype=torch.long)
