"""Resuming `parcae prep shards` at its last shard boundary, without tokenizing again what is in shards.

After every chunk of input (``ShardSettings.chunk_chars`` of text, 1 MB) in which a shard was closed, the
builder's whole state is written to ``OUT/resume.npz`` in one object (atomic on a file system and on S3):
how many chunks are done, every split's packer (pending tokens, or the best-fit buffer of documents),
the rows of the shard being filled, the shards written, and the problems the tokenizer workers found. A
rerun with the same settings skips that many chunks of input (read and cut into chunks again, never
tokenized), restores the state and goes on; the shards the crashed run wrote after it are made again
and kept when they are byte-identical (``progress.json``). So a crash costs the documents of at most one
shard and one chunk. The file is removed when the output is complete. A work unit of `prep run`
(`data_prep.units`) keeps its own, ``OUT/units/u<unit>.resume.npz``, so a task killed inside a long unit
resumes that unit at its last shard boundary too.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from data_prep.corpus import Problems
from data_prep.storage import StorageError, Store

log = logging.getLogger(__name__)

RESUME = "resume.npz"


def save(
    store: Store,
    fingerprint: dict[str, Any],
    chunks_done: int,
    builder: Any,
    problems: Problems,
    name: str = RESUME,
) -> None:
    meta: dict[str, Any] = {
        "fingerprint": fingerprint,
        "chunks_done": chunks_done,
        "problems": {"counts": dict(problems.counts), "examples": problems.examples},
        "progress_shards": builder.progress["shards"],
        "splits": {},
    }
    arrays: dict[str, np.ndarray] = {}
    for split, state in builder.splits.items():
        packer_meta, packer_arrays = state.packer.state()
        meta["splits"][split] = {
            "packer": packer_meta,
            "shard_index": state.shard_index,
            "sample_index": state.sample_index,
            "shard_samples": state.shard_samples,
            "documents": state.documents,
            "tokens_in": state.tokens_in,
            "shards": state.shards,
        }
        tar = state.tar.getvalue() if state.tar is not None else b""
        arrays[f"{split}.tar"] = np.frombuffer(tar, np.uint8)
        arrays.update({f"{split}.{key}": value for key, value in packer_arrays.items()})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    store.put_bytes(buffer.getvalue(), name)


def load(
    store: Store, fingerprint: dict[str, Any], name: str = RESUME
) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """The saved state, if there is one made with these settings (anything else: start from the top)."""
    if not store.exists(name):
        return None
    try:
        with np.load(io.BytesIO(store.get_bytes(name)), allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
        meta = json.loads(arrays.pop("meta").tobytes())
    except (StorageError, ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile):  # truncated: from the top
        log.warning("%s: unreadable (truncated?); preparing from the top", store.child_url(name))
        return None
    return (meta, arrays) if meta.get("fingerprint") == fingerprint else None


def restore(builder: Any, meta: dict[str, Any], arrays: dict[str, np.ndarray], problems: Problems) -> int:
    """Put the builder (and the workers' problems) back as they were; returns the chunks already done."""
    builder.progress["shards"] = list(meta["progress_shards"])
    for split, saved in meta["splits"].items():
        state = builder.splits[split]
        prefix = f"{split}."
        state.packer.restore(saved["packer"], {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)})
        for key in ("shard_index", "sample_index", "shard_samples", "documents", "tokens_in"):
            setattr(state, key, int(saved[key]))
        state.shards = list(saved["shards"])
        tar = arrays[f"{split}.tar"].tobytes()
        state.tar = None
        if tar:
            state.tar = io.BytesIO()
            state.tar.write(tar)
    problems.counts.update(meta["problems"]["counts"])
    problems.examples.update(meta["problems"]["examples"])
    return int(meta["chunks_done"])


def resumable(
    store: Store, fingerprint: dict[str, Any], builder: Any, problems: Problems, name: str = RESUME
) -> tuple[int, Callable[[int], None]]:
    """Restore the builder from ``name`` if a state with this fingerprint is there; returns the chunks
    already done and the ``on_chunk`` callback that saves the state after every chunk that closed a shard."""
    saved = load(store, fingerprint, name)
    chunks_done = restore(builder, *saved, problems) if saved else 0
    closed = [builder.closed]

    def checkpoint(chunks: int) -> None:
        if builder.closed > closed[0]:
            closed[0] = builder.closed
            save(store, fingerprint, chunks, builder, problems, name)

    return chunks_done, checkpoint
