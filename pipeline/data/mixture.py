"""Training rows from a mixture of shard sets, with exact resume.

Each source (a ``data.sources`` entry; ``data.train_url`` is a one-source mixture named "train") is
split into S streams as `ShardLoader` splits a shard set over S ranks: per epoch a seeded permutation of
its shards, stream s reading every S-th one, rows shuffled through a bounded buffer, every stream cut to
the smallest one's share. S and the stream run length R are the data layout: the world size and micro
batch size of the run that started the data, kept in every checkpoint.

The run's rows form one sequence: position p = step x G + slot (G the global batch). Which source and
row fill each slot is decided for the whole global batch at once, the same way on every rank, from the
weights, the seed and the layout alone (`MixSchedule`):

- source i gets its share G w_i of the step's rows, the fractional parts carried from step to step
  (largest remainder), so after n steps every source is within one row of n G w_i;
- the G slots are shuffled by a generator seeded with (seed, step); slot q is read from stream
  (q // R) mod S of its source, the streams' rows taken in order.

A rank of W takes positions (k W + r) b to (k W + r + 1) b - 1 for its k-th micro batch (b its micro batch
size). With W = S and b = R that is its own stream only, as a data-parallel loader reads; on another world
size or micro batch size (a resume after a requeue onto other nodes) each rank reads the streams its rows
are in and passes over the rows of the others, so every position holds the row the uninterrupted run has
there. The schedule's state (steps planned, carried fractions, rows taken from each stream, sources
stopped) and the position are small and the same on every rank: the loader's state in every checkpoint.

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
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from data_prep.storage import S3Options
from parcae_errors import ParcaeError
from pipeline.data.loader import DataError, ShardLoader, _prefetched
from pipeline.data.manifests import check_same_tokenizer
from pipeline.jobspec import DataSpec, SourceSpec

log = logging.getLogger(__name__)

FORMAT = "parcae-mixture/2"  # the position in global rows, the data layout
FORMAT_1 = "parcae-mixture/1"  # the position in micro batches of the writing run


class MixSchedule:
    """The source of every row slot of every step, and the stream and row that fills it (see the module's
    doc): the mixture's fixed parameters; the state that advances (`initial_state`, plain JSON) is passed
    to `plan`. ``streams`` and ``stream_rows`` are the data layout (the world size and micro batch size of
    the run that started the data): slot q of a step is read from stream (q // stream_rows) % streams,
    whatever the world size reading it now."""

    def __init__(
        self,
        names: list[str],
        weights: list[float],
        capacities: list[int | None],
        *,
        seed: int,
        streams: int,
        stream_rows: int,
        global_batch: int,
    ):
        self.names, self.capacities = names, capacities
        self.weights = [Fraction(str(w)) for w in weights]  # exact: the counts are the same on every machine
        self.seed, self.streams, self.stream_rows, self.global_batch = seed, streams, stream_rows, global_batch

    def initial_state(self) -> dict[str, Any]:
        """Steps planned, carried fractions, rows read from each stream of each source, sources stopped."""
        return {
            "step": 0,
            "credit": {n: "0" for n in self.names},
            "used": {n: [0] * self.streams for n in self.names},
            "stopped": [],
        }

    def stream_of(self, slot: int) -> int:
        return (slot // self.stream_rows) % self.streams

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
            taken = {i: [0] * self.streams for i in active}
            for position, i in enumerate(slots):
                taken[i][self.stream_of(position)] += 1
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

    def rows(self, before: dict[str, Any], slots: list[int]) -> list[tuple[int, int, int]]:
        """(source, stream, row of that stream) of every slot of the step that ``before`` starts."""
        seen = {name: list(used) for name, used in before["used"].items()}
        out = []
        for position, i in enumerate(slots):
            stream, counter = self.stream_of(position), seen[self.names[i]]
            out.append((i, stream, counter[stream]))
            counter[stream] += 1
        return out


@dataclass(frozen=True)
class MicroBatch:
    """A rank's micro batch and where its rows sit in the run's sequence of rows (position p = step x global
    batch + slot): the global micro batch (every rank's rows) is positions ``first`` to ``first + size - 1``;
    this rank's rows start at ``first + offset``. The depth sampler draws from these positions, so the draws
    do not depend on how many ranks share a global batch."""

    tokens: torch.Tensor  # (rows, seq_len + 1) int64
    first: int
    size: int
    offset: int

    @property
    def positions(self) -> range:
        start = self.first + self.offset
        return range(start, start + len(self.tokens))


def source_fingerprint(sources: list[SourceSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "url": s.url, "weight": s.weight, "max_epochs": s.max_epochs} for s in sources]


class MixtureLoader:
    """A rank's micro batches (`MicroBatch`) from ``data.sources`` (or ``data.train_url``); `state_dict` goes
    into every checkpoint. Built at start-up: every source's manifest is read and checked then.

    The position is a global row count p (rows of every rank handed out), so a checkpoint resumes on another
    world size or micro batch size at the same row: the data layout (the streams every source is split into,
    and the rows a stream gives a slot run of) stays the one of the run that started the data, and each rank
    reads its rows from whichever streams hold them (with the layout unchanged, a rank reads its own stream
    only; after a change, it reads the streams its rows are in and passes over the others' rows)."""

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
        self.data, self.options, self.seed, self.vocab_size = data, options, seed, vocab_size
        self.sources = data.train_sources()
        self.rank, self.world_size, self.micro, self.accumulation = rank, world_size, micro_batch_size, accumulation
        self.global_batch = accumulation * world_size * micro_batch_size
        self.seq_len, self.prefetch = data.seq_len, data.prefetch_batches
        self.on_mixture_change = data.on_mixture_change
        self.interrupt: threading.Event | None = None
        self._use_layout(world_size, micro_batch_size)
        check_same_tokenizer([(s.name, s.url, st.manifest) for s, st in zip(self.sources, self.streams, strict=True)])
        self.manifest = self.streams[0].manifest  # the run's tokenizer (prompts) is the sources' one
        self.rows = {s.name: sum(shard["samples"] for shard in st.shards) for s, st in self._pairs()}  # for epochs
        self.position: dict[str, Any] = {"schedule": self.schedule.initial_state(), "rows": 0}
        self._window_rows: dict[str, int] | None = None

    def _pairs(self) -> list[tuple[SourceSpec, ShardLoader]]:
        return list(zip(self.sources, self.streams, strict=True))

    def _use_layout(self, streams: int, stream_rows: int) -> None:
        """Split every source into ``streams`` streams (what ``streams`` ranks would each read), a run of
        ``stream_rows`` slots from each in turn."""
        self.layout = {"streams": streams, "stream_rows": stream_rows}
        self.streams: list[ShardLoader] = []
        for source in self.sources:
            try:
                self.streams.append(
                    ShardLoader(
                        source.url,
                        rank=self.rank % streams,
                        world_size=streams,
                        micro_batch_size=stream_rows,
                        seq_len=self.data.seq_len,
                        seed=self.seed,
                        shuffle_buffer=self.data.shuffle_buffer,
                        options=self.options,
                        on_bad_shard=self.data.on_bad_shard,
                        max_bad_shard_share=self.data.max_bad_shard_share,
                        vocab_size=self.vocab_size,
                        prefetch=0,
                    )
                )
            except ParcaeError as exc:
                raise DataError(f"data source {source.name!r}: {exc}") from None
        if self.interrupt is not None:
            self.interrupt_on(self.interrupt)
        capacities = [st.rows_in_epochs(s.max_epochs) if s.max_epochs else None for s, st in self._pairs()]
        self.schedule = MixSchedule(
            [s.name for s in self.sources],
            [s.weight for s in self.sources],
            capacities,
            seed=self.seed,
            streams=streams,
            stream_rows=stream_rows,
            global_batch=self.global_batch,
        )

    def interrupt_on(self, event: threading.Event) -> None:
        """A stop signal (``event``) ends every data wait and retry of every source."""
        self.interrupt = event
        for stream in self.streams:
            stream.interrupt = event

    # -- the stream
    def __iter__(self) -> Iterator[MicroBatch]:
        """Micro batches of (micro_batch_size, seq_len + 1) int64 rows, forever, from the current position.
        The position advances when a batch is handed to the caller, not when it is read ahead."""
        source = self._batches(copy.deepcopy(self.position))
        if self.prefetch > 0:
            source = _prefetched(source, self.prefetch, self.interrupt, "the data sources")
        for batch, position in source:
            self.position = position
            yield batch

    def _batches(self, position: dict[str, Any]) -> Iterator[tuple[MicroBatch, dict[str, Any]]]:
        schedule, G = self.schedule, self.global_batch
        state = position["schedule"]  # a copy: planning advances it in place
        step, before = state["step"], copy.deepcopy(state)  # the step being read, and its state at its start
        where, after = schedule.rows(before, schedule.plan(state)), copy.deepcopy(state)
        cursors: dict[tuple[int, int], list[Any]] = {}  # (source, stream): [its rows, index of the next one]
        span, first = self.world_size * self.micro, step * G + int(position["rows"])
        while True:
            batch = []
            for p in range(first + self.rank * self.micro, first + (self.rank + 1) * self.micro):
                if p >= (step + 1) * G:  # planned only when a row of it is needed (it may be past the data)
                    step, before = step + 1, after
                    where, after = schedule.rows(before, schedule.plan(state)), copy.deepcopy(state)
                batch.append(self._row(cursors, *where[p - step * G]))
            first += span  # every rank's rows of this micro batch are used: the position is past them
            handed = {"schedule": before, "rows": first - step * G}
            if first >= (step + 1) * G:  # at most one step on: a micro batch is at most a global batch
                handed = {"schedule": after, "rows": first - (step + 1) * G}
            tokens = torch.from_numpy(np.stack(batch).astype(np.int64))
            yield MicroBatch(tokens, first - span, span, self.rank * self.micro), copy.deepcopy(handed)

    def _row(self, cursors: dict[tuple[int, int], list[Any]], source: int, stream: int, index: int) -> np.ndarray:
        """Row ``index`` of a stream of a source; rows before it that this rank has not read are passed over
        (other ranks use them)."""
        cursor = cursors.get((source, stream))
        if cursor is None:
            cursor = cursors[(source, stream)] = [self.streams[source].rows_from(index, stream), index]
        rows, at = cursor
        assert index >= at, f"row {index} of stream {stream} was needed after row {at}"
        for _ in range(index - at):
            next(rows)
        cursor[1] = index + 1
        return next(rows)

    # -- what the run logs
    def rows_used(self) -> dict[str, int]:
        """Rows of each source planned up to the current step, over all ranks."""
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
            **self.layout,
            "global_batch": self.global_batch,
            "sources": source_fingerprint(self.sources),
            "world_size": self.world_size,
            "skipped_shards": self.skipped_shards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") not in (FORMAT, FORMAT_1):  # a checkpoint of the one-source loader
            self._load_single_source(state)
            return
        saved, now = state["sources"], source_fingerprint(self.sources)
        schedule = copy.deepcopy(state["schedule"])
        old_world = int(state.get("world_size", self.world_size))
        if state.get("format") == FORMAT_1:  # micro batches of the writing run; its micro batch size is ours
            layout = {"streams": old_world, "stream_rows": self.micro}
            rows, old_batch = int(state["micro"]) * old_world * self.micro, self.global_batch
        else:
            layout = {"streams": int(state["streams"]), "stream_rows": int(state["stream_rows"])}
            rows, old_batch = int(state["rows"]), int(state["global_batch"])
        if layout != self.layout:
            self._use_layout(layout["streams"], layout["stream_rows"])
        if old_batch != self.global_batch and rows:  # only a global batch kept resumes inside a step
            log.warning(
                "the global batch changed (%d -> %d rows) inside step %d: its last %d rows are not used",
                old_batch, self.global_batch, schedule["step"], old_batch - rows,
            )  # fmt: skip
            rows = 0
        if saved != now:
            changes = mixture_changes(saved, now)
            if self.on_mixture_change == "refuse":
                raise DataError(
                    f"data.sources changed since the checkpoint at step {schedule['step']}: {'; '.join(changes)}. "
                    "Restore the checkpoint's sources, or set data.on_mixture_change: apply to use the new mixture "
                    "from this step on (each kept source continues where it was)"
                )
            log.warning("data.sources changed (%s): the new mixture applies from here on", "; ".join(changes))
            schedule, rows = self._applied(saved, schedule), 0
        self.position = {"schedule": schedule, "rows": rows}
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
        schedule["used"][name] = [position] * self.layout["streams"]
        self.position = {"schedule": schedule, "rows": 0}
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
