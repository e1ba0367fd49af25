"""Training rows from a mixture of shard sets, with exact resume.

Each source (a ``data.sources`` entry; ``data.train_url`` is a one-source mixture named "train") is
read as `ShardLoader` reads a shard set: per epoch a seeded permutation of its shards, rank r reading
every W-th one, rows shuffled through a bounded buffer, every rank using the smallest rank's share.

Which source fills each row of a step is decided for the whole global batch of G rows at once, the
same way on every rank, from the weights and the seed alone (`MixSchedule`):

- source i gets its share G w_i of the step's rows, the fractional parts carried from step to step
  (largest remainder), so after n steps every source is within one row of n G w_i;
- the G slots are shuffled by a generator seeded with (seed, step); micro batch m of rank r takes slots
  (m W + r) b to (m W + r + 1) b - 1 (b the micro batch size).

So the sources of a step's rows do not depend on the world size at a given global batch; each rank
reads its own rows of each source. The schedule's state (steps planned, the carried fractions, the
rows each rank took from each source, the sources stopped) is small and the same on every rank: it is
the loader's state in every checkpoint, and every source's position on every rank follows from it.

``max_epochs``: a source stops at the first step for which some rank would need more of its rows than
that many passes hold; the other sources share its slots from then on, so no row is used more than
``max_epochs`` times. When every source has stopped the run cannot go on (`DataError`, naming them;
`parcae validate` / the preflight say so before the start when the spec's steps need more rows).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import threading
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from data_prep.inspect import packing_of
from data_prep.storage import S3Options
from parcae_errors import ParcaeError
from pipeline.data.loader import DataError, ShardLoader, _prefetched
from pipeline.data.manifests import check_same_tokenizer
from pipeline.jobspec import DataSpec, SourceSpec

log = logging.getLogger(__name__)

FORMAT = "parcae-mixture/1"


class MixSchedule:
    """The source of every row slot of every step (see the module's doc): the mixture's fixed parameters;
    the state that advances (`initial_state`, plain JSON) is passed to `plan`."""

    def __init__(
        self,
        names: list[str],
        weights: list[float],
        capacities: list[int | None],
        *,
        seed: int,
        world_size: int,
        micro_batch_size: int,
        accumulation: int,
    ):
        self.names, self.capacities = names, capacities
        self.weights = [Fraction(str(w)) for w in weights]  # exact: the counts are the same on every machine
        self.seed, self.world_size, self.micro, self.accumulation = seed, world_size, micro_batch_size, accumulation

    def initial_state(self) -> dict[str, Any]:
        """Steps planned, carried fractions, rows each rank took from each source, sources stopped."""
        return {
            "step": 0,
            "credit": {n: "0" for n in self.names},
            "used": {n: [0] * self.world_size for n in self.names},
            "stopped": [],
        }

    @property
    def global_batch(self) -> int:
        return self.accumulation * self.world_size * self.micro

    def plan(self, state: dict[str, Any]) -> list[int]:
        """The next step's G slots (source indices, in slot order); advances ``state`` in place."""
        G = self.global_batch
        while True:
            active = [i for i, n in enumerate(self.names) if n not in state["stopped"]]
            if not active:
                raise DataError(
                    f"every source of the mixture has reached its max_epochs by step {state['step'] + 1} "
                    f"({', '.join(self.names)}); raise data.sources[].max_epochs, add a source without a limit, or "
                    "train fewer steps"
                )
            total = sum(self.weights[i] for i in active)
            target = {i: Fraction(state["credit"][self.names[i]]) + G * self.weights[i] / total for i in active}
            counts = {i: math.floor(target[i]) for i in active}
            for i in sorted(active, key=lambda i: (counts[i] - target[i], i))[: G - sum(counts.values())]:
                counts[i] += 1
            slots = [i for i in active for _ in range(counts[i])]
            random.Random(f"{self.seed}:mix:{state['step']}").shuffle(slots)
            taken = {i: [0] * self.world_size for i in active}
            for position, i in enumerate(slots):
                taken[i][(position // self.micro) % self.world_size] += 1
            over = [
                i
                for i in active
                if self.capacities[i] is not None
                and any(u + t > self.capacities[i] for u, t in zip(state["used"][self.names[i]], taken[i], strict=True))
            ]
            if not over:
                break
            for i in over:
                log.warning(
                    "data source %r reached its max_epochs at step %d: the other sources share its rows from now on",
                    self.names[i],
                    state["step"] + 1,
                )
                state["stopped"].append(self.names[i])
            state["credit"] = {n: "0" for n in self.names}  # the carried fractions belong to the old shares
        for i in active:
            name = self.names[i]
            state["credit"][name] = str(target[i] - counts[i])
            state["used"][name] = [u + t for u, t in zip(state["used"][name], taken[i], strict=True)]
        state["step"] += 1
        return slots

    def rank_slots(self, slots: list[int], micro: int, rank: int) -> list[int]:
        first = (micro * self.world_size + rank) * self.micro
        return slots[first : first + self.micro]


def source_fingerprint(sources: list[SourceSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "url": s.url, "weight": s.weight, "max_epochs": s.max_epochs} for s in sources]


class MixtureLoader:
    """A rank's micro batches from ``data.sources`` (or ``data.train_url``); `state_dict` goes into every
    checkpoint. Built at start-up: every source's manifest is read and checked then."""

    def __init__(
        self,
        data: DataSpec,
        options: S3Options,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        accumulation: int,
        seed: int,
        vocab_size: int | None = None,
    ):
        self.sources = data.train_sources()
        self.rank, self.world_size, self.micro, self.accumulation = rank, world_size, micro_batch_size, accumulation
        self.seq_len, self.prefetch = data.seq_len, data.prefetch_batches
        self.on_mixture_change = data.on_mixture_change
        self.streams: list[ShardLoader] = []
        for source in self.sources:
            try:
                self.streams.append(
                    ShardLoader(
                        source.url,
                        rank=rank,
                        world_size=world_size,
                        micro_batch_size=micro_batch_size,
                        seq_len=data.seq_len,
                        seed=seed,
                        shuffle_buffer=data.shuffle_buffer,
                        options=options,
                        on_bad_shard=data.on_bad_shard,
                        max_bad_shard_share=data.max_bad_shard_share,
                        vocab_size=vocab_size,
                        prefetch=0,
                    )
                )
            except ParcaeError as exc:
                raise DataError(f"data source {source.name!r}: {exc}") from None
        check_same_tokenizer([(s.name, s.url, st.manifest) for s, st in zip(self.sources, self.streams, strict=True)])
        self.manifest = self.streams[0].manifest  # the run's tokenizer (prompts) is the sources' one
        pairs = list(zip(self.sources, self.streams, strict=True))
        self.rows = {s.name: sum(shard["samples"] for shard in st.shards) for s, st in pairs}  # for epochs
        capacities = [st.rows_in_epochs(s.max_epochs) if s.max_epochs else None for s, st in pairs]
        self.schedule = MixSchedule(
            [s.name for s in self.sources],
            [s.weight for s in self.sources],
            capacities,
            seed=seed,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            accumulation=accumulation,
        )
        self.position: dict[str, Any] = {"schedule": self.schedule.initial_state(), "micro": 0}
        self.interrupt: threading.Event | None = None
        self._window_rows: dict[str, int] | None = None

    def interrupt_on(self, event: threading.Event) -> None:
        """A stop signal (``event``) ends every data wait and retry of every source."""
        self.interrupt = event
        for stream in self.streams:
            stream.interrupt = event

    # -- the stream
    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches of (micro_batch_size, seq_len + 1) int64 rows, forever, from the current position.
        The position advances when a batch is handed to the caller, not when it is read ahead."""
        source = self._batches(copy.deepcopy(self.position))
        if self.prefetch > 0:
            source = _prefetched(source, self.prefetch, self.interrupt, "the data sources")
        for batch, position in source:
            self.position = position
            yield batch

    def _batches(self, position: dict[str, Any]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        schedule, state = self.schedule, position["schedule"]  # a copy: planning advances it in place
        rows = {
            s.name: st.rows_from(state["used"][s.name][self.rank])
            for s, st in zip(self.sources, self.streams, strict=True)
        }
        skip = position["micro"]
        before = copy.deepcopy(state)  # the state at the start of the step (handed out, never changed)
        while True:
            slots = schedule.plan(state)
            after = copy.deepcopy(state)
            for m in range(self.accumulation):
                batch = [next(rows[schedule.names[i]]) for i in schedule.rank_slots(slots, m, self.rank)]
                if m < skip:  # resumed inside a step: these rows were used before the checkpoint
                    continue
                last = m == self.accumulation - 1
                handed = {"schedule": after, "micro": 0} if last else {"schedule": before, "micro": m + 1}
                yield torch.from_numpy(np.stack(batch).astype(np.int64)), handed
            skip, before = 0, after

    # -- what the run logs
    def rows_used(self) -> dict[str, int]:
        """Rows of each source used so far, over all ranks (up to the last batch handed out)."""
        return {name: sum(used) for name, used in self.position["schedule"]["used"].items()}

    def metrics(self) -> dict[str, float]:
        """Per source: ``data/<name>/tokens`` seen, ``epochs`` (passes over its rows) and ``share`` of the
        rows since the last call (all ranks; the same on every rank)."""
        used = self.rows_used()
        window = {n: used[n] - (self._window_rows or {}).get(n, 0) for n in used}
        total = sum(window.values())
        self._window_rows = used
        out: dict[str, float] = {}
        for name, rows in self.rows.items():
            out[f"data/{name}/tokens"] = used[name] * self.seq_len
            out[f"data/{name}/epochs"] = used[name] / rows if rows else 0.0
            out[f"data/{name}/share"] = window[name] / total if total else 0.0
        return out

    @property
    def skipped_shards(self) -> list[str]:
        return [url for stream in self.streams for url in stream.skipped_shards]

    # -- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **copy.deepcopy(self.position),
            "sources": source_fingerprint(self.sources),
            "world_size": self.world_size,
            "skipped_shards": self.skipped_shards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != FORMAT:  # a checkpoint of the one-source loader: (epoch, batches)
            self._load_single_source(state)
            return
        saved, now = state["sources"], source_fingerprint(self.sources)
        schedule = copy.deepcopy(state["schedule"])
        micro = int(state["micro"])
        if saved != now:
            changes = mixture_changes(saved, now)
            if self.on_mixture_change == "refuse":
                raise DataError(
                    f"data.sources changed since the checkpoint at step {schedule['step']}: {'; '.join(changes)}. "
                    "Restore the checkpoint's sources, or set data.on_mixture_change: apply to use the new mixture "
                    "from this step on (each kept source continues where it was)"
                )
            log.warning("data.sources changed (%s): the new mixture applies from here on", "; ".join(changes))
            schedule, micro = self._applied(saved, schedule), 0
        if int(state.get("world_size", self.world_size)) != self.world_size:
            schedule = self._restarted_epochs(schedule, int(state["world_size"]))
            micro = 0
        self.position = {"schedule": schedule, "micro": micro}
        self._window_rows = self.rows_used()

    def _applied(self, saved: list[dict[str, Any]], schedule: dict[str, Any]) -> dict[str, Any]:
        """The new mixture from this step on: kept sources (same name and URL) keep their positions; new
        ones start at their beginning; the carried fractions and the stopped flags start afresh."""
        kept = {s["name"] for s in saved} & {s.name for s in self.sources}
        same_url = {s["name"]: s["url"] for s in saved}
        fresh = self.schedule.initial_state()
        fresh["step"] = schedule["step"]
        for source in self.sources:
            if source.name in kept and same_url[source.name] == source.url:
                fresh["used"][source.name] = list(schedule["used"][source.name])
        return fresh

    def _restarted_epochs(self, schedule: dict[str, Any], old_world: int) -> dict[str, Any]:
        """Another world size reads other shards on every rank: each source starts its next epoch."""
        for source, stream in zip(self.sources, self.streams, strict=True):
            passes = math.ceil(sum(schedule["used"][source.name]) / (self.rows[source.name] or 1))
            schedule["used"][source.name] = [stream.rows_in_epochs(passes)] * self.world_size
        log.warning(
            "the checkpoint was written by %d ranks, this run has %d: every source continues at the start of its "
            "next epoch (the rows differ from an uninterrupted run)",
            old_world,
            self.world_size,
        )
        return schedule

    def _load_single_source(self, state: dict[str, Any]) -> None:
        if len(self.sources) != 1:
            raise DataError(
                "the checkpoint is from a one-source run (data.train_url) and this spec has a mixture (data.sources); "
                "resume with data.train_url, or start the mixture from these weights with checkpoint.init_from"
            )
        stream, name = self.streams[0], self.sources[0].name
        epoch, batches = int(state["epoch"]), int(state["batches"])
        position = stream.rows_in_epochs(epoch) + batches * self.micro
        schedule = self.schedule.initial_state()
        schedule["used"][name] = [position] * self.world_size
        self.position = {"schedule": schedule, "micro": 0}
        self._window_rows = self.rows_used()
        log.info("checkpoint of the one-source loader: continuing at epoch %d, row %d", epoch, batches * self.micro)


def train_loader(
    data: DataSpec,
    options: S3Options,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    seed: int,
    accumulation: int = 1,
    vocab_size: int | None = None,
) -> MixtureLoader:
    """The training stream of one rank: its rows of every source (``data.sources``, or ``data.train_url``
    as one source), mixed by weight, read ahead in a thread (`pipeline.data.mixture`)."""
    return MixtureLoader(
        data,
        options,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        accumulation=accumulation,
        seed=seed,
        vocab_size=vocab_size,
    )


def mixture_changes(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> list[str]:
    """What differs between two mixtures, source by source."""
    before, after = {s["name"]: s for s in saved}, {s["name"]: s for s in now}
    out = [f"source {n!r} added" for n in after if n not in before]
    out += [f"source {n!r} removed" for n in before if n not in after]
    for name in after:
        if name in before:
            for key in ("url", "weight", "max_epochs"):
                if before[name].get(key) != after[name].get(key):
                    out.append(f"{name}.{key} {before[name].get(key)} -> {after[name].get(key)}")
    return out or ["the order of the sources"]


def describe(sources: list[SourceSpec], manifests: list[dict[str, Any]]) -> list[str]:
    """One line per source: weight, share, limit, packing and rows (for `parcae validate`)."""
    total = sum(s.weight for s in sources)
    lines = []
    for s, manifest in zip(sources, manifests, strict=True):
        rows = sum(shard["samples"] for shard in manifest["shards"])
        limit = f"max_epochs {s.max_epochs}" if s.max_epochs else "repeats"
        lines.append(
            f"{s.name}: {s.url} weight {s.weight:g} ({s.weight / total:.1%} of the rows), {limit}; "
            f"{rows} rows, packing {packing_of(manifest)}"
        )
    return lines
