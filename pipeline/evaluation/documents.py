"""The paper's evaluation rows: whole held-out documents, one per row, instead of rows cut from the packed
token stream.

Shards hold the documents of a split back to back, each ended by ``<eos>``; reading the rows in manifest
order and cutting at ``<eos>`` gives the documents again (the last one, cut by the dropped final row, is
left out). A document's row is ``<bos>`` followed by its tokens, truncated to the model's context: every
token of the document is predicted (``<bos>`` is context only, ``<eos>`` is neither predicted nor counted),
so its bytes are exactly its text's (special tokens excluded). Rows are padded to the longest in their
batch; padded targets are ignored by the loss.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

IGNORE = -100  # the loss's ignore_index


def documents_from_rows(
    rows: Iterable[np.ndarray], eos: int, limit: int, bos_aligned: bool = False
) -> list[np.ndarray]:
    """The first ``limit`` whole documents (without their ``<eos>``) of a packed row stream, in order.
    ``bos_aligned``: rows never continue a document, so an unterminated end of a row (a cropped
    document's head) is dropped, not joined to the next row."""
    documents: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    for row in rows:
        if bos_aligned:
            pending = []
        ends = np.flatnonzero(row == eos)
        start = 0
        for end in ends:
            pending.append(row[start:end])
            documents.append(np.concatenate(pending))
            pending, start = [], end + 1
            if len(documents) == limit:
                return documents
        pending.append(row[start:])
    return documents


def document_batches(
    documents: list[np.ndarray], batch_size: int, context: int, bos: int, pad: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches, one document per row: inputs ``<bos> d_0 .. d_{n-2}``, targets
    ``d_0 .. d_{n-1}`` (n at most ``context``; a document that already starts with ``<bos>``, as the
    shards of a tokenizer with one hold them, is not given a second), longest first to keep padding small."""
    rows = [d if len(d) and d[0] == bos else np.concatenate([[bos], d]).astype(d.dtype) for d in documents]
    rows = [r[: context + 1] for r in rows if len(r) > 1]
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
    batches = []
    for first in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[first : first + batch_size]]
        width = max(len(r) for r in chunk) - 1
        inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for i, row in enumerate(chunk):
            tokens = torch.from_numpy(row.astype(np.int64))
            inputs[i, : len(row) - 1] = tokens[:-1]
            targets[i, : len(row) - 1] = tokens[1:]
        batches.append((inputs, targets))
    return batches
