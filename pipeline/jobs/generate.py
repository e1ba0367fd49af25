"""`parcae generate SOURCE --prompt TEXT`: text from any model `parcae eval` reads, with its tokenizer.

Every prompt starts with the token CORE prompts start with (the way the run's shards start documents:
`pipeline.evaluation.downstream.document_start`) and is prefilled in one forward; each new token then runs
through the layers alone against the KV cache (a core layer once per loop), h_0 = 0. One prompt streams its
completion as it is generated; several (``--prompt`` repeated, or ``--prompt-file`` with one per line) are
generated as one left-padded batch. A completion ends at the tokenizer's end-of-document token or after
``--max-new-tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parcae_errors import ParcaeError, UsageError
from pipeline.evaluation.text import completion
from pipeline.jobs.downstream import model_tokenizer, prompt_start_of
from pipeline.jobs.evaluate import Source
from pipeline.jobspec import s3_options


def read_prompts(prompts: list[str] | None, prompt_file: str | None) -> list[str]:
    texts = list(prompts or [])
    if prompt_file:
        try:
            lines = Path(prompt_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ParcaeError(f"--prompt-file {prompt_file}: cannot read it as UTF-8 text ({exc})") from None
        texts += [line for line in lines if line.strip()]
    if not texts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompt-file FILE (one prompt per line)")
    return texts


def run_generate(
    source: Source,
    *,
    source_arg: str,
    prompts: list[str],
    loops: int | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    tokenizer: str | None,
    endpoint_url: str | None,
    on_text: Callable[[str], None] | None = None,
    use_cache: bool = True,
    core_slots: int | None = None,
    adaptive: float | None = None,
) -> Generated:
    """Generate from every prompt (one left-padded batch); the completions and the speed. With one prompt,
    ``on_text`` gets the prompt and then the text each new token adds, as it comes."""
    model = source.model.eval()
    cfg = model.cfg
    check_settings(cfg, loops, max_new_tokens, temperature, top_k, use_cache, core_slots, adaptive)
    options = s3_options(endpoint_url, source.spec)
    location, text = model_tokenizer(tokenizer, source, source_arg, options, cfg.vocab_size)
    prompt_start = prompt_start_of(source, options, text)
    ids = prompt_ids(text, prompts, prompt_start.id, max_new_tokens, cfg.max_seq_len)
    lengths = [len(row) for row in ids]
    batch = torch.full((len(ids), max(lengths)), prompt_start.id, dtype=torch.long)
    for r, row in enumerate(ids):
        batch[r, batch.shape[1] - len(row) :] = torch.tensor(row)
    loops_used: list[torch.Tensor] = []  # per decoding step, (batch,): the loops each row ran
    used = loops if loops is not None else (cfg.mean_recurrence if cfg.looped else None)
    stream = model.stream(
        batch,
        max_new_tokens,
        loops=used,
        temperature=temperature,
        top_k=top_k,
        generator=torch.Generator().manual_seed(seed),
        use_cache=use_cache,
        lengths=lengths if len(set(lengths)) > 1 else None,
        vocab=text.vocab_size,
        core_slots=core_slots,
        adaptive=adaptive,
        loops_used=loops_used,
    )
    live = on_text if len(ids) == 1 else None
    started = time.perf_counter()
    new, done = decode(stream, text, ids, prompts[0], live)
    seconds = time.perf_counter() - started
    ran = torch.stack(loops_used, 1) if loops_used else None  # (batch, steps after the first)
    results = []
    for r, prompt in enumerate(prompts):
        steps = max(len(new[r]) - 1, 0)  # the first new token comes from the prefill, at --loops
        depth = float(ran[r, :steps].float().mean()) if ran is not None and steps else used
        results.append(
            {
                "prompt": prompt,
                "completion": completion(text, ids[r], new[r]),
                "tokens": new[r],
                "prompt_tokens": lengths[r],
                "loops": used,
                "mean_loops": depth,
                "adaptive": adaptive,
                "cache_slots": core_slots,
                "ended": "eos" if done[r] else "max_new_tokens",
            }
        )
    generated = sum(len(n) for n in new)
    stats = {
        "seconds": seconds,
        "tokens_per_s": generated / max(seconds, 1e-9),
        "cache": use_cache,
        "prompt_start": prompt_start.to_dict(),
    }
    line = speed_line(results, stats, generated, used, adaptive, core_slots, location)
    return Generated(results, stats, line, streamed=live is not None)


def check_settings(
    cfg: Any,
    loops: int | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    use_cache: bool,
    core_slots: int | None,
    adaptive: float | None,
) -> None:
    """Refuse, naming the flag, what generation cannot do with this model."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens: at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise UsageError(f"--temperature: 0 (greedy) or more, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k: at least 1, got {top_k}")
    if loops is not None and (loops < 1 or not cfg.looped):
        raise UsageError(
            f"--loops {loops}: " + ("at least 1" if cfg.looped else "the GPT baseline has no loops; leave it out")
        )
    for flag, value, least in (("--adaptive", adaptive, 0), ("--cache-slots", core_slots, 1)):
        if value is None:
            continue
        if not cfg.looped:
            raise UsageError(f"{flag}: the GPT baseline has no loops; leave it out")
        if value < least:
            raise UsageError(f"{flag}: at least {least}, got {value}")
        if not use_cache:
            raise UsageError(f"{flag} works on the KV cache: leave out --no-cache")


def prompt_ids(text: Any, prompts: list[str], start: int, max_new_tokens: int, context: int) -> list[list[int]]:
    """Every prompt's token ids after the start token. One prompt too long for the context keeps its end; a
    batch must fit as it is."""
    ids = [[start, *row] for row in text.encode(prompts)]
    longest = max(len(row) for row in ids)
    if longest + max_new_tokens > context:
        if len(ids) > 1:
            raise UsageError(
                f"a prompt of {longest - 1} tokens + {max_new_tokens} new tokens exceeds the model's context "
                f"({context}); a batch of prompts must fit: shorten them or lower --max-new-tokens"
            )
        ids[0] = ids[0][-(context - 1) :] if len(ids[0]) >= context else ids[0]
    return ids


def decode(
    stream: Any, text: Any, ids: list[list[int]], first_prompt: str, on_text: Callable[[str], None] | None
) -> tuple[list[list[int]], list[bool]]:
    """The new tokens of every row until its end of text (or the stream's end), and whether it ended so;
    ``on_text`` (one prompt) gets the prompt, then the text each token adds."""
    if on_text is not None:
        on_text(first_prompt)
    new: list[list[int]] = [[] for _ in ids]
    done, shown = [False] * len(ids), ""
    for step in stream:
        for r, token in enumerate(step[:, 0].tolist()):
            if not done[r]:
                done[r] = token == text.eos_id
                if not done[r]:
                    new[r].append(token)
        if on_text is not None:
            decoded = completion(text, ids[0], new[0])
            on_text(decoded[len(shown) :])
            shown = decoded
        if all(done):
            break
    return new, done


def speed_line(
    results: list[dict[str, Any]],
    stats: dict[str, Any],
    generated: int,
    used: int | None,
    adaptive: float | None,
    core_slots: int | None,
    location: str,
) -> str:
    loops_text = f"{used} loops, " if used is not None else ""
    if adaptive is not None:
        mean = sum(r["mean_loops"] for r in results) / len(results)
        loops_text = f"adaptive (KL < {adaptive:g}, at most {used} loops): {mean:.2f} loops per token, "
    if core_slots is not None:
        loops_text += f"{core_slots} cache slot(s) per core layer, "
    return (
        f"[{generated} tokens in {stats['seconds']:.2f} s, {stats['tokens_per_s']:.1f} tokens/s; {loops_text}"
        f"{'KV cache' if stats['cache'] else 'no cache'}; tokenizer {location}]"
    )


@dataclass
class Generated:
    """What `run_generate` made: a result per prompt, the speed and settings, and them in one line."""

    results: list[dict[str, Any]]
    stats: dict[str, Any]
    line: str
    streamed: bool  # the single prompt's text went to on_text as it came
