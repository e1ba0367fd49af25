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


def documents_from_rows(rows: Iterable[np.ndarray], eos: int, limit: int) -> list[np.ndarray]:
    """The first ``limit`` whole documents (without their ``<eos>``) of a packed row stream, in order."""
    documents: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    for row in rows:
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
    ``d_0 .. d_{n-1}`` (n at most ``context``), longest documents first to keep padding small."""
    order = sorted(range(len(documents)), key=lambda i: (-min(len(documents[i]), context), i))
    batches = []
    for first in range(0, len(order), batch_size):
        chunk = [documents[i][:context] for i in order[first : first + batch_size] if len(documents[i])]
        if not chunk:
            continue
        width = max(len(d) for d in chunk)
        inputs = torch.full((len(chunk), width), pad, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, doc in enumerate(chunk):
            tokens = torch.from_numpy(doc.astype(np.int64))
            inputs[row, 0] = bos
            inputs[row, 1 : len(doc)] = tokens[:-1]
            targets[row, : len(doc)] = tokens
        batches.append((inputs, targets))
    return batches
