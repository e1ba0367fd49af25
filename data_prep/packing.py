"""Packing a split's documents into rows of ``seq_len + 1`` tokens.

``concat``: documents are laid end to end and the stream is cut every row; most rows start inside a
document, no token is lost but the final partial row.

``bos-aligned`` (the Parcae reference's and nanochat's packing): every document starts with ``<bos>``;
every row starts at a document start. Rows are filled best-fit from a buffer of the next ``buffer``
documents: the longest buffered document that fits the space left goes in next; when none fits, the
shortest one is cropped to fill the row exactly and its tail is dropped (counted). Documents longer
than a row are cropped the same way when they are the shortest left. Deterministic: ties go to the
document that came first.

Both return rows with the row positions where documents start (the shards' ``bounds``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PACKINGS = ("concat", "bos-aligned")
Row = tuple[np.ndarray, np.ndarray]  # (tokens of one row, int32 positions where documents start)


@dataclass
class PackCounts:
    rows: int = 0
    rows_at_document_start: int = 0
    cropped_documents: int = 0
    cropped_tokens: int = 0
    remainder_tokens_dropped: int = 0  # the final partial row


class ConcatPacker:
    def __init__(self, row_len: int, dtype: np.dtype):
        self.row_len, self.dtype = row_len, dtype
        self.pending = np.zeros(0, dtype)
        self.pending_starts = np.zeros(0, np.int64)
        self.counts = PackCounts()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[Row]:
        L = self.row_len
        base = len(self.pending)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) + base
        stream = np.concatenate((self.pending, tokens)) if base else tokens
        all_starts = np.concatenate((self.pending_starts, starts.astype(np.int64)))
        n_rows = len(stream) // L
        cuts = np.searchsorted(all_starts, np.arange(n_rows + 1) * L)  # document starts of each row
        for r in range(n_rows):
            row_starts = (all_starts[cuts[r] : cuts[r + 1]] - r * L).astype(np.int32)
            self._count(row_starts)
            yield stream[r * L : (r + 1) * L].astype(self.dtype, copy=False), row_starts
        self.pending = stream[n_rows * L :].copy()
        self.pending_starts = all_starts[all_starts >= n_rows * L] - n_rows * L

    def _count(self, starts: np.ndarray) -> None:
        self.counts.rows += 1
        self.counts.rows_at_document_start += bool(len(starts) and starts[0] == 0)

    def finish(self) -> Iterator[Row]:
        self.counts.remainder_tokens_dropped = len(self.pending)
        return iter(())

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """What resumes this packer: (plain fields, arrays)."""
        return {"counts": asdict(self.counts)}, {"pending": self.pending, "starts": self.pending_starts}

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.counts = PackCounts(**meta["counts"])
        self.pending = arrays["pending"].astype(self.dtype)
        self.pending_starts = arrays["starts"].astype(np.int64)


class BestFitPacker:
    def __init__(self, row_len: int, dtype: np.dtype, buffer: int):
        self.row_len, self.dtype, self.buffer = row_len, dtype, buffer
        self.keys: list[tuple[int, int]] = []  # (length, arrival), sorted
        self.docs: dict[int, np.ndarray] = {}
        self.arrivals = 0
        self.buffered = 0  # tokens in the buffer
        self.counts = PackCounts()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[Row]:
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        for i in range(len(lengths)):
            doc = tokens[offsets[i] : offsets[i + 1]]
            if not len(doc):
                continue
            bisect.insort(self.keys, (len(doc), self.arrivals))
            self.docs[self.arrivals] = doc
            self.arrivals += 1
            self.buffered += len(doc)
            while len(self.keys) >= self.buffer and self.buffered >= self.row_len:
                yield self._row()

    def finish(self) -> Iterator[Row]:
        """Drain the buffer; a last row that cannot be filled is dropped (counted)."""
        while self.buffered >= self.row_len:
            yield self._row()
        self.counts.remainder_tokens_dropped = self.buffered
        self.keys.clear()
        self.docs.clear()
        self.buffered = 0

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrivals = [a for _, a in self.keys]
        docs = [self.docs[a] for a in arrivals]
        arrays = {
            "docs": np.concatenate(docs) if docs else np.zeros(0, self.dtype),
            "lengths": np.asarray([len(d) for d in docs], np.int64),
            "arrivals": np.asarray(arrivals, np.int64),
        }
        return {"counts": asdict(self.counts), "arrivals": self.arrivals}, arrays

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.counts = PackCounts(**meta["counts"])
        self.arrivals = int(meta["arrivals"])
        offsets = np.concatenate(([0], np.cumsum(arrays["lengths"])))
        docs = arrays["docs"].astype(self.dtype)
        self.docs = {int(a): docs[offsets[i] : offsets[i + 1]] for i, a in enumerate(arrays["arrivals"])}
        self.keys = sorted((len(d), a) for a, d in self.docs.items())
        self.buffered = int(arrays["lengths"].sum())

    def _take(self, index: int) -> np.ndarray:
        length, arrival = self.keys.pop(index)
        self.buffered -= length
        return self.docs.pop(arrival)

    def _row(self) -> Row:
        row = np.empty(self.row_len, self.dtype)
        starts: list[int] = []
        filled = 0
        while filled < self.row_len:
            space = self.row_len - filled
            fit = bisect.bisect_right(self.keys, (space, float("inf"))) - 1
            if fit >= 0:  # the longest that fits; of equal lengths, the earliest
                fit = bisect.bisect_left(self.keys, (self.keys[fit][0], -1))
                doc = self._take(fit)
            else:  # none fits: crop the shortest to fill the row
                doc = self._take(0)
                self.counts.cropped_documents += 1
                self.counts.cropped_tokens += len(doc) - space
                doc = doc[:space]
            starts.append(filled)
            row[filled : filled + len(doc)] = doc
            filled += len(doc)
        self.counts.rows += 1
        self.counts.rows_at_document_start += 1
        return row, np.asarray(starts, np.int32)


def make_packer(packing: str, row_len: int, dtype: np.dtype, buffer: int) -> ConcatPacker | BestFitPacker:
    if packing == "concat":
        return ConcatPacker(row_len, dtype)
    if packing == "bos-aligned":
        return BestFitPacker(row_len, dtype, buffer)
    raise ValueError(f"packing {packing!r}: expected one of {', '.join(PACKINGS)}")
