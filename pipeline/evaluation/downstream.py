"""Downstream scoring: CORE and Core-Extended (the DCLM in-context-learning suite, scored as nanochat and
the Parcae reference score it) at test-time loop counts, data-parallel over ranks.

For each item the prompts are rendered (few-shot examples from the task's other items, drawn with
``random.Random(seed + i)``), tokenized with the token documents started with in training in front
(`document_start`), cut to the model's context from the left, and each gets a continuation span [start, end):

- ``multiple_choice``: one prompt per choice, the shared context then the choice; the span starts where
  the choices' tokens first differ. The pick is the choice with the lowest mean loss over its span.
- ``schema``: one prompt per context option, then the shared continuation; the span is the common
  suffix. The pick is the option with the lowest mean loss over the continuation.
- ``language_modeling``: one prompt, the context then the continuation; correct only when the greedy
  argmax reproduces every continuation token.

Scoring is batched: every distinct (tokens, span) of every item is one row; rows are sorted by length,
packed into padded batches of at most ``batch_tokens`` tokens (right padding: the model is causal, so
padding changes no scored position), and batch ``b`` runs on rank ``b % world_size``. A batch is the
same whatever the number of ranks, so the scores are identical on 1 or N ranks. Every rank runs the
same number of forwards (ZeRO-3 gathers parameters collectively): a rank short of batches runs a
one-token forward. The loop count is fixed per pass and h_0 = 0, so scores are reproducible.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.evaluation.bundle import Bundle, Task

SHUFFLE_SEED = 1337  # the task's items are shuffled once with it before any max_per_task cut (as nanochat)
DEFAULT_SEED = 1234  # the few-shot draw for item i is random.Random(seed + i) (as nanochat)
DEFAULT_BATCH_TOKENS = 8192

Key = tuple[tuple[int, ...], int, int]  # (tokens, start, end)


@dataclass
class Prompted:
    """One item's scored rows: the options' token sequences and their continuation spans."""

    task: str
    index: int
    gold: int | None  # None for language_modeling
    keys: list[Key]
    cropped: bool = False


@dataclass
class Suite:
    """The tasks to score, their (shuffled, cut) items, and which tasks each aggregate averages."""

    tasks: list[Task]
    items: dict[str, list[dict[str, Any]]]
    aggregates: dict[str, list[str]]  # "core" / "core_extended" -> task labels
    max_per_task: int | None

    @classmethod
    def load(cls, bundle: Bundle, suites: Sequence[str], max_per_task: int | None) -> Suite:
        tasks: dict[str, Task] = {}
        aggregates: dict[str, list[str]] = {}
        for name in suites:
            listed = bundle.suite(name)
            aggregates[name.replace("-", "_")] = [t.label for t in listed]
            for task in listed:
                tasks.setdefault(task.label, task)
        items = {label: prepare_items(bundle.items(task), max_per_task) for label, task in tasks.items()}
        return cls(list(tasks.values()), items, aggregates, max_per_task)


def prepare_items(items: list[dict[str, Any]], max_per_task: int | None) -> list[dict[str, Any]]:
    """The items shuffled once with a fixed seed, then cut to ``max_per_task``."""
    items = list(items)
    random.Random(SHUFFLE_SEED).shuffle(items)
    return items[:max_per_task] if max_per_task else items


def forward_at(forward: Callable[..., torch.Tensor], d_model: int):
    """For a model or engine: T -> (ids -> logits at T loops, h_0 = 0, reproducible); T None: the
    baseline's forward."""

    def at(loops: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
        if loops is None:
            return lambda ids: forward(ids)
        return lambda ids: forward(ids, loops=loops, h0=torch.zeros(*ids.shape, d_model, device=ids.device))

    return at


# --------------------------------------------------------------------------------------------------------
# Prompts and spans
def fewshot(items: list[dict[str, Any]], index: int, shots: int, seed: int) -> list[dict[str, Any]]:
    """``shots`` other items of the task, drawn for item ``index`` with ``random.Random(seed + index)``."""
    shots = min(shots, len(items) - 1)
    if shots <= 0:
        return []
    others = [j for j in range(len(items)) if j != index]
    return [items[j] for j in random.Random(seed + index).sample(others, shots)]


def render(task: Task, item: dict[str, Any], examples: list[dict[str, Any]]) -> list[str]:
    """The prompt texts of an item: one per choice (multiple_choice) or context option (schema); for
    language_modeling the prompt without its continuation, then with it."""
    d = task.delimiter
    if task.task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in examples)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in examples)
        return [f"{head}{context}{d}{item['continuation']}" for context in item["context_options"]]
    head = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in examples)
    stem = f"{head}{item['context'].strip()}{d}"
    return [stem.strip(), f"{stem}{item['continuation']}"]


def common_length(sequences: list[list[int]], from_end: bool = False) -> int:
    """The length of the prefix (or suffix) all sequences share."""
    shortest = min(len(s) for s in sequences)
    for n in range(shortest):
        position = -1 - n if from_end else n
        if any(s[position] != sequences[0][position] for s in sequences):
            return n
    return shortest


def spans(task_type: str, sequences: list[list[int]]) -> list[tuple[list[int], int, int]]:
    """(tokens, start, end) of each scored row: the tokens [start, end) are the continuation. Each span
    holds at least one token (when a choice is a prefix of another, every choice's span starts at its last token)."""
    if task_type == "language_modeling":
        without, with_ = sequences
        start = len(without) if with_[: len(without)] == without else common_length([without, with_])
        return [(with_, min(start, len(with_) - 1), len(with_))]
    if task_type == "multiple_choice":
        start = min(common_length(sequences), min(len(s) for s in sequences) - 1)
        return [(s, start, len(s)) for s in sequences]
    suffix = common_length(sequences, from_end=True)
    return [(s, max(1, len(s) - max(suffix, 1)), len(s)) for s in sequences]


def crop(tokens: list[int], start: int, end: int, max_len: int) -> tuple[list[int], int, int, bool]:
    """A row longer than the context keeps its last ``max_len`` tokens (the span shifts with them; a span
    that no longer fits loses its first tokens, position 0 having no prediction)."""
    if len(tokens) <= max_len:
        return tokens, start, end, False
    cut = len(tokens) - max_len
    return tokens[cut:], max(1, start - cut), end - cut, True


def prompt_items(
    suite: Suite, encode: Callable[[list[str]], list[list[int]]], prefix: int, max_len: int, seed: int
) -> list[Prompted]:
    """Every item of every task, rendered with the few-shot draw of ``seed`` and tokenized."""
    prompted = []
    for task in suite.tasks:
        items = suite.items[task.label]
        for i, item in enumerate(items):
            texts = render(task, item, fewshot(items, i, task.num_fewshot, seed))
            sequences = [[prefix, *ids] for ids in encode(texts)]
            keys, cropped = [], False
            for tokens, start, end in spans(task.task_type, sequences):
                tokens, start, end, was_cut = crop(tokens, start, end, max_len)
                keys.append((tuple(tokens), start, end))
                cropped |= was_cut
            gold = None if task.task_type == "language_modeling" else int(item["gold"])
            prompted.append(Prompted(task.label, i, gold, keys, cropped))
    return prompted


# --------------------------------------------------------------------------------------------------------
# Batched, data-parallel scoring
def plan_batches(keys: Sequence[Key], batch_tokens: int) -> list[list[Key]]:
    """Distinct rows sorted by length (then content), packed so rows x longest <= ``batch_tokens``."""
    unique = sorted(set(keys), key=lambda k: (len(k[0]), k))
    batches: list[list[Key]] = []
    for key in unique:
        if batches and (len(batches[-1]) + 1) * len(key[0]) <= batch_tokens:
            batches[-1].append(key)
        else:
            batches.append([key])
    return batches


@torch.no_grad()
def score_batch(forward: Callable[[torch.Tensor], torch.Tensor], batch: list[Key], pad: int, device) -> list:
    """(mean continuation loss, greedy argmax reproduces the continuation) of each row."""
    width = max(len(k[0]) for k in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    for r, (tokens, _, _) in enumerate(batch):
        ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    ids = ids.to(device)
    logits = forward(ids).float()[:, :-1]
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    losses = losses.view(targets.shape).cpu()
    hits = (logits.argmax(-1) == targets).cpu()
    out = []
    for r, (_, start, end) in enumerate(batch):
        out.append((float(losses[r, start - 1 : end - 1].double().mean()), bool(hits[r, start - 1 : end - 1].all())))
    return out


def score_keys(
    forward: Callable[[torch.Tensor], torch.Tensor],
    keys: Sequence[Key],
    *,
    pad: int,
    device,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    rank: int = 0,
    world_size: int = 1,
) -> dict[Key, tuple[float, bool]]:
    """Every distinct row's (mean loss, all-correct), computed on the ranks and gathered on every rank."""
    batches = plan_batches(keys, batch_tokens)
    mine = range(rank, len(batches), world_size)
    rounds = math.ceil(len(batches) / world_size) if batches else 0
    local: dict[Key, tuple[float, bool]] = {}
    for r in range(rounds):
        b = rank + r * world_size
        if b < len(batches):
            local.update(zip(batches[b], score_batch(forward, batches[b], pad, device), strict=True))
        else:  # the same number of forwards on every rank
            forward(torch.full((1, 1), pad, dtype=torch.long, device=device))
    assert len(local) == sum(len(batches[b]) for b in mine)
    if world_size == 1:
        return local
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, local)
    merged: dict[Key, tuple[float, bool]] = {}
    for part in gathered:
        merged.update(part)
    return merged


# --------------------------------------------------------------------------------------------------------
# Results
@dataclass
class ItemResult:
    task: str
    index: int
    correct: bool
    pred: int | None
    gold: int | None
    losses: list[float] = field(default_factory=list)


def item_results(prompted: list[Prompted], scores: dict[Key, tuple[float, bool]]) -> list[ItemResult]:
    results = []
    for p in prompted:
        losses = [scores[k][0] for k in p.keys]
        if p.gold is None:
            results.append(ItemResult(p.task, p.index, scores[p.keys[0]][1], None, None, losses))
        else:
            pred = losses.index(min(losses))
            results.append(ItemResult(p.task, p.index, pred == p.gold, pred, p.gold, losses))
    return results


def task_scores(suite: Suite, results: list[ItemResult]) -> dict[str, dict[str, float]]:
    """Per task: accuracy, and centered accuracy (acc - b) / (1 - b) with b its random baseline."""
    by_task: dict[str, list[bool]] = {t.label: [] for t in suite.tasks}
    for r in results:
        by_task[r.task].append(r.correct)
    scores = {}
    for task in suite.tasks:
        hits = by_task[task.label]
        accuracy = sum(hits) / len(hits)
        b = task.random_baseline
        scores[task.label] = {"accuracy": accuracy, "centered": (accuracy - b) / (1.0 - b), "items": len(hits)}
    return scores


def aggregate(suite: Suite, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """CORE (and Core-Extended): the mean centered accuracy over each aggregate's tasks."""
    return {
        name: statistics.fmean(scores[label]["centered"] for label in labels)
        for name, labels in suite.aggregates.items()
    }


def evaluate_downstream(
    forward_at: Callable[[int | None], Callable[[torch.Tensor], torch.Tensor]],
    suite: Suite,
    *,
    encode: Callable[[list[str]], list[list[int]]],
    prefix: int,
    pad: int,
    max_len: int,
    loop_counts: Sequence[int] | None,
    seeds: Sequence[int] = (DEFAULT_SEED,),
    device=None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    rank: int = 0,
    world_size: int = 1,
    keep_items: bool = False,
) -> dict[str, Any]:
    """Scores at every loop count (None: the non-looped baseline) and few-shot seed.

    ``forward_at(T)`` is the forward (ids -> logits) at T loops. Returns ``{"results": [per loop count:
    {loops, tasks: {label: {accuracy, centered, [..._std]}}, core, [core_std], ...}], "cropped": n}``;
    with ``keep_items`` each result also lists its per-item picks (seed by seed)."""
    per_seed = {seed: prompt_items(suite, encode, prefix, max_len, seed) for seed in seeds}
    keys = [k for prompted in per_seed.values() for p in prompted for k in p.keys]
    results = []
    for loops in loop_counts or [None]:
        scores = score_keys(
            forward_at(loops),
            keys,
            pad=pad,
            device=device,
            batch_tokens=batch_tokens,
            rank=rank,
            world_size=world_size,
        )
        runs = []
        for seed, prompted in per_seed.items():
            items = item_results(prompted, scores)
            runs.append((seed, items, task_scores(suite, items)))
        results.append(merge_seeds(suite, loops, runs, keep_items))
    cropped = sum(p.cropped for p in next(iter(per_seed.values())))
    return {"results": results, "cropped_items": cropped, "rows": len(set(keys))}


def merge_seeds(suite: Suite, loops: int | None, runs: list, keep_items: bool) -> dict[str, Any]:
    """One loop count's scores, averaged over the few-shot seeds with their spread."""
    tasks: dict[str, dict[str, float]] = {}
    for task in suite.tasks:
        accuracy = [scores[task.label]["accuracy"] for _, _, scores in runs]
        centered = [scores[task.label]["centered"] for _, _, scores in runs]
        tasks[task.label] = {
            "accuracy": statistics.fmean(accuracy),
            "centered": statistics.fmean(centered),
            "items": runs[0][2][task.label]["items"],
        }
        if len(runs) > 1:
            tasks[task.label].update(accuracy_std=statistics.stdev(accuracy), centered_std=statistics.stdev(centered))
    result: dict[str, Any] = {"loops": loops, "tasks": tasks}
    per_run = [aggregate(suite, scores) for _, _, scores in runs]
    for name in suite.aggregates:
        values = [a[name] for a in per_run]
        result[name] = statistics.fmean(values)
        if len(runs) > 1:
            result[f"{name}_std"] = statistics.stdev(values)
            result[f"{name}_per_seed"] = values
    if keep_items:
        result["items"] = {
            seed: [
                {
                    "task": r.task,
                    "index": r.index,
                    "correct": r.correct,
                    "pred": r.pred,
                    "gold": r.gold,
                    "losses": r.losses,
                }
                for r in items
            ]
            for seed, items, _ in runs
        }
    return result
