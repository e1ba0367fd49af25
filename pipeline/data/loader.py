"""Streaming one shard set from its manifest (local directory or s3:// prefix).

Each epoch, the shard order is a permutation drawn from (seed, epoch); stream s of S (a rank of the run
that started the data) reads the shards at positions s, s + S, ... of it, reading each one through boto3
(or the file system) into memory, never to disk, and using its rows only once its size and sha256 match
the manifest; samples are shuffled through a bounded buffer seeded by (seed, epoch, stream). The stream
of an epoch is a pure function of the manifest, the seed, the stream and S.

Training reads rows (`rows_from`): every stream uses the smallest stream's share of rows per epoch,
computed from the manifest alone (no communication), and a position is a row count, from which the
mixture (`pipeline.data.mixture`) resumes exactly. The evaluation sets (`rows_loader`) are read as
batches from the first epoch (``__iter__``, every rank the same number).
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data_prep.inspect import iter_samples, read_manifest
from data_prep.storage import S3Options, StorageError, open_store
from parcae_errors import REQUEUE_EXIT_CODE, ParcaeError
from pipeline.data.manifests import DataError

log = logging.getLogger(__name__)


def rows_loader(
    url: str,
    options: S3Options,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seq_len: int,
    vocab_size: int | None = None,
) -> ShardLoader:
    """A (small) evaluation set: every rank reads all of it and keeps every world_size-th row, unshuffled."""
    loader = ShardLoader(
        url,
        rank=rank,
        world_size=world_size,
        micro_batch_size=batch_size,
        seq_len=seq_len,
        seed=0,
        shuffle_buffer=0,
        options=options,
        shuffle=False,
        prefetch=0,
        split_by="samples",
        vocab_size=vocab_size,
    )
    if loader.batches_per_epoch(0) == 0:
        raise DataError(f"{url}: too few validation rows for one batch of {batch_size} per rank on {world_size} ranks")
    return loader


class ShardLoader:
    def __init__(
        self,
        url: str,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seq_len: int,
        seed: int,
        shuffle_buffer: int,
        options: S3Options | None = None,
        on_bad_shard: str = "error",
        max_bad_shard_share: float = 0.05,
        vocab_size: int | None = None,
        prefetch: int = 1,
        shuffle: bool = True,
        split_by: str = "shards",
    ):
        options = options or S3Options.from_env()
        self.store = open_store(url, options)
        self.url = url
        self.manifest = read_manifest(self.store)
        if self.manifest["seq_len"] != seq_len:
            raise DataError(
                f"{url}: shards hold rows of seq_len {self.manifest['seq_len']} (+1), but data.seq_len is {seq_len}; "
                "prepare shards with --seq-len matching the spec, or set data.seq_len to the shards'"
            )
        self.shards = self.manifest["shards"]
        self.split_by = split_by  # "samples": every rank reads every shard and keeps every world_size-th row
        if split_by == "shards" and len(self.shards) < world_size:
            raise DataError(f"{url}: {len(self.shards)} shard(s) cannot feed {world_size} ranks; write smaller shards")
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.seed, self.shuffle_buffer, self.shuffle = seed, shuffle_buffer, shuffle
        self.on_bad_shard, self.prefetch, self.max_retries = on_bad_shard, prefetch, options.max_retries
        self.max_bad_shard_share, self.vocab_size = max_bad_shard_share, vocab_size
        self.interrupt: threading.Event | None = None  # set by a stop signal: every data wait and retry ends
        self.skipped_shards: list[str] = []
        self._epoch_rows: list[int] = []
        self._epoch_lock = threading.Lock()

    # -- the stream of one epoch: a pure function of (manifest, seed, epoch, rank, world, batch size)
    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        return order

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        return self.shard_order(epoch)[rank :: self.world_size]

    def batches_per_epoch(self, epoch: int) -> int:
        """The smallest share over ranks (same on every rank)."""
        if self.split_by == "samples":
            total = sum(s["samples"] for s in self.shards)
            return (total // self.world_size) // self.micro_batch_size
        shares = [
            sum(self.shards[i]["samples"] for i in self.rank_shards(epoch, r)) // self.micro_batch_size
            for r in range(self.world_size)
        ]
        return min(shares)

    # -- rows, for a mixture: the same epochs, counted in rows (every rank uses the smallest share)
    def rows_per_epoch(self, epoch: int) -> int:
        """Rows every rank uses in this epoch: the smallest rank's share (same on every rank). Cached; the
        read-ahead thread and the trainer's thread both ask."""
        with self._epoch_lock:
            while len(self._epoch_rows) <= epoch:
                e = len(self._epoch_rows)
                share = [sum(self.shards[i]["samples"] for i in self.rank_shards(e, r)) for r in range(self.world_size)]
                self._epoch_rows.append(min(share))
            return self._epoch_rows[epoch]

    def rows_in_epochs(self, epochs: int) -> int:
        """Rows per rank in the first ``epochs`` epochs (a source's capacity under max_epochs)."""
        return sum(self.rows_per_epoch(e) for e in range(epochs))

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, row in that epoch) of this rank's ``position``-th row overall."""
        epoch = 0
        while position >= self.rows_per_epoch(epoch):
            if self.rows_per_epoch(epoch) == 0:
                raise DataError(f"{self.url}: a rank's share of the shards holds no row")
            position -= self.rows_per_epoch(epoch)
            epoch += 1
        return epoch, position

    def rows_from(self, position: int, stream: int | None = None) -> Iterator[np.ndarray]:
        """The rows of ``stream`` (default: this rank's; a mixture reads the stream of another rank of the run
        that wrote its checkpoint) from its ``position``-th on, epoch after epoch, forever: each epoch's
        stream (``_samples``) cut to the rows every rank has."""
        epoch, skip = self.locate(position)
        while True:
            limit, read = self.rows_per_epoch(epoch), 0
            for index, tokens in enumerate(self._samples(epoch, stream)):
                if index >= limit:
                    break
                read += 1
                if index >= skip:
                    yield tokens
            self._check_epoch(read)
            epoch, skip = epoch + 1, 0

    def _check_epoch(self, rows: int) -> None:
        """A whole epoch of this rank's shards gave no row (every one skipped): stop, naming them, rather than
        read the same bad shards again forever."""
        if rows == 0:
            raise DataError(
                f"{self.url}: every shard this rank reads was skipped as bad (data.on_bad_shard: skip), so no row "
                f"is left: {_first(self.skipped_shards)}; check them with `parcae prep inspect {self.url} --verify`"
            )

    def _samples(self, epoch: int, stream: int | None = None) -> Iterator[np.ndarray]:
        stream = self.rank if stream is None else stream
        rng = random.Random(f"{self.seed}:samples:{epoch}:{stream}")
        buffer: list[np.ndarray] = []
        if self.split_by == "samples":
            position = 0
            for index in self.shard_order(epoch):
                for tokens in self._read_shard(self.shards[index]):
                    if position % self.world_size == stream:
                        yield tokens
                    position += 1
            return
        for index in self.rank_shards(epoch, stream):
            for tokens in self._read_shard(self.shards[index]):
                if not self.shuffle or self.shuffle_buffer <= 1:
                    yield tokens
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(tokens)
                    continue
                pick = rng.randrange(len(buffer))
                yield buffer[pick]
                buffer[pick] = tokens
        rng.shuffle(buffer)
        yield from buffer

    def _read_shard(self, entry: dict[str, Any]) -> Iterator[np.ndarray]:
        """One shard's rows, after its size and sha256 match the manifest: the shard is read into memory
        (one at a time per rank; hundreds of MB at most), so a corrupt shard contributes no row at all."""
        name = entry["name"]
        url = self.store.child_url(name)
        for attempt in range(self.max_retries + 1):
            self.check_interrupt(url)
            try:
                data = self.store.get_bytes(name)
                break
            except (StorageError, OSError) as exc:  # transient: back off and read it again
                if attempt == self.max_retries:
                    self._bad_shard(url, f"unreadable after {attempt + 1} attempts: {exc}")
                    return
                self._wait(min(2**attempt * 0.5, 8.0))
        if len(data) != entry.get("bytes", len(data)) or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            self._bad_shard(url, f"corrupt: {len(data)} bytes whose sha256 differs from the manifest's")
            return
        try:
            rows = [tokens for _key, tokens, _bounds in iter_samples(io.BytesIO(data), url)]
        except ParcaeError as exc:
            self._bad_shard(url, str(exc))
            return
        except Exception as exc:  # a tar or npy that does not parse although its checksum matched
            self._bad_shard(url, f"corrupt: {exc}")
            return
        if self.vocab_size is not None and rows:
            highest = max(int(row.max()) for row in rows)  # one pass over what is in memory anyway
            if highest >= self.vocab_size:
                self._bad_shard(
                    url,
                    f"token id {highest} is not below the model's vocab_size {self.vocab_size} (on a GPU an "
                    "embedding lookup would fail with a device-side assert): the shard was made with another "
                    "tokenizer than its manifest records",
                )
                return
        yield from rows

    def _wait(self, seconds: float) -> None:
        """A back-off that a stop signal ends within 50 ms. It polls the event rather than `Event.wait`, which
        holds the event's lock for a few bytecodes: in the main thread (`data.prefetch_batches: 0`) a stop
        signal's handler, setting the event there, would wait on that lock forever."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check_interrupt(self.url)
            time.sleep(min(left, 0.05))
        self.check_interrupt(self.url)

    def check_interrupt(self, where: str) -> None:
        if self.interrupt is not None and self.interrupt.is_set():
            raise DataWaitInterrupted(where)

    def _bad_shard(self, url: str, why: str) -> None:
        if self.on_bad_shard != "skip":
            raise DataError(f"{url}: {why} (data.on_bad_shard: skip would skip and count it)")
        if url in self.skipped_shards:  # read again in a later epoch: said once, when first skipped
            log.debug("skipping shard %s again: %s", url, why)
            return
        self.skipped_shards.append(url)
        log.warning("skipping shard %s: %s", url, why)
        allowed = max(1.0, self.max_bad_shard_share * len(self.shards))  # one bad shard is always skippable
        if len(self.skipped_shards) > allowed:
            raise DataError(
                f"{self.url}: {len(self.skipped_shards)} of its {len(self.shards)} shards are bad, more than "
                f"data.max_bad_shard_share ({self.max_bad_shard_share:g}) allows: {_first(self.skipped_shards)}; "
                f"check them with `parcae prep inspect {self.url} --verify`, or re-prepare them"
            )

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[tuple[int, torch.Tensor]]:
        limit = self.batches_per_epoch(epoch)
        rows: list[np.ndarray] = []
        produced = read = 0
        for tokens in self._samples(epoch):
            read += 1
            rows.append(tokens)
            if len(rows) == self.micro_batch_size:
                if produced >= skip:
                    yield produced, torch.from_numpy(np.stack(rows).astype(np.int64))
                produced += 1
                rows = []
                if produced >= limit:
                    return
        self._check_epoch(read)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Batches of (micro_batch_size, seq_len + 1) int64 token rows, forever, from the first epoch (the
        evaluation sets; training reads rows through a mixture, whose state resumes exactly)."""
        source = self._batches(0, 0)
        if self.prefetch > 0:
            source = _prefetched(source, self.prefetch, self.interrupt, self.url)
        for _epoch, _index, batch in source:
            yield batch

    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        while True:
            if self.batches_per_epoch(epoch) == 0:
                raise DataError(
                    f"{self.url}: a rank's share of the shards holds fewer than one batch of "
                    f"{self.micro_batch_size} rows"
                )
            for index, batch in self._epoch_batches(epoch, skip):
                yield epoch, index, batch
            epoch, skip = epoch + 1, 0


def _first(urls: list[str], n: int = 3) -> str:
    return ", ".join(urls[:n]) + (f" and {len(urls) - n} more" if len(urls) > n else "")


class DataWaitInterrupted(DataError):
    """A stop signal came while the run waited for data: it ends now (exit 75, like a preemption), and the
    rerun resumes from the newest checkpoint."""

    exit_code = REQUEUE_EXIT_CODE

    def __init__(self, where: str):
        super().__init__(
            f"stopped by a signal while waiting for data from {where}; the rerun resumes from the newest checkpoint"
        )


def _prefetched(
    source: Iterator[Any], depth: int, interrupt: threading.Event | None = None, where: str = "the data"
) -> Iterator[Any]:
    """Read ahead in a thread (I/O and decoding overlap compute); order is unchanged. Closing the
    returned generator (or dropping it) stops the thread and waits for it, so no reader outlives its run.
    ``interrupt``, once set, ends a wait for the next item (`DataWaitInterrupted`)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=fill, daemon=True, name="shard-prefetch")
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                if interrupt is not None and interrupt.is_set():
                    raise DataWaitInterrupted(where) from None
                continue
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # at most one shard read in flight; after a stop signal the reader (a daemon, perhaps inside a request
        # to a dead endpoint, whose retries back off for minutes) is not waited for, whether or not this wait is
        # the one the signal ended (the step may have failed on a peer that left for the signal; the rank must
        # still say why before its launcher's grace period ends)
        signalled = interrupt is not None and interrupt.is_set()
        thread.join(timeout=1 if signalled else 30)
