"""Tokenize, pack and write WebDataset shards with a manifest; local directory or s3:// prefix; resumable.

Pipeline: the main process reads documents and hands chunks of them to worker processes, which
tokenize (appending ``<eos>`` to every document) and pick each document's split from a hash of its
text. The main process packs each split's documents into rows of ``seq_len + 1`` tokens
(``data_prep.packing``: ``concat`` runs documents across rows; ``bos-aligned`` starts every row at a
document with ``<bos>``, best-fit, cropping what does not fit; what is dropped is counted in the
manifest) and writes tar shards of about ``shard_bytes``. A sample is ``<key>.tokens.npy`` (the row,
uint16 when the vocab fits, else uint32) and ``<key>.bounds.npy`` (int32 positions in the row where a document starts).

Everything is deterministic: the same input, tokenizer and settings give byte-identical shards.

Layout of the output (local or S3)::

    OUT/train/manifest.json  OUT/train/shard-000000.tar ...
    OUT/val/manifest.json    OUT/val/shard-000000.tar ...
    OUT/progress.json        (settings, and every shard written so far with its checksum)

Resume: a run restarted with the same arguments regenerates the token stream (deterministic), keeps
every shard the progress file lists whose stored size matches and whose regenerated checksum is the
recorded one, and writes the rest. Changed settings are refused, naming what changed.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import os
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep import resume
from data_prep.corpus import (
    BUILTIN,
    CorpusError,
    CorpusSpec,
    Document,
    Problems,
    RawLines,
    builtin_description,
    iter_documents,
    parse_jsonl_block,
    resolve_sources,
)
from data_prep.errors import PrepError
from data_prep.packing import BestFitPacker, ConcatPacker, make_packer
from data_prep.storage import S3Options, Store, check_writable, is_s3, open_store, read_json
from data_prep.tokenizer import TextTokenizer, file_sha256

FORMAT = "parcae-shards/1"
SPLITS = ("train", "val")


class ShardError(PrepError):
    """Output that cannot be written or resumed as asked."""


@dataclass(frozen=True)
class ShardSettings:
    seq_len: int = 2048
    shard_bytes: int = 256 * 1024 * 1024
    val_fraction: float = 0.005
    text_field: str = "text"
    txt_mode: str = "file"
    chunk_chars: int = 1 << 20  # text per unit of work sent to a worker
    packing: str = "concat"  # or "bos-aligned" (data_prep.packing)
    pack_buffer: int = 1000  # bos-aligned: documents the best fit chooses from

    def fingerprint_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("chunk_chars")  # does not change the output
        if self.packing == "concat":  # as before packing was a setting: older interrupted runs still resume
            fields.pop("packing")
            fields.pop("pack_buffer")
        return fields

    def packing_record(self, bos_id: int | None) -> dict[str, Any]:
        if self.packing == "concat":
            return {"kind": "concat"}
        return {"kind": self.packing, "bos_id": bos_id, "buffer_documents": self.pack_buffer}


@dataclass
class SplitState:
    """One split's packer and shard writer."""

    name: str
    row_len: int
    dtype: np.dtype
    shard_bytes: int
    packer: ConcatPacker | BestFitPacker
    tar: io.BytesIO | None = None  # the open shard, built in memory
    shard_index: int = 0
    sample_index: int = 0
    shard_samples: int = 0
    documents: int = 0
    tokens_in: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Documents and tokens in, and what packing dropped: the manifest's totals beyond the shards'."""
        packed = self.packer.counts
        return {
            "documents": self.documents,
            "tokens_produced": self.tokens_in,
            "remainder_tokens_dropped": packed.remainder_tokens_dropped,
            "rows_at_document_start": packed.rows_at_document_start,
            "cropped_documents": packed.cropped_documents,
            "cropped_tokens": packed.cropped_tokens,
        }


_TOKENIZER: Any = None  # the worker's tokenizer (SentencePiece or a tokenizer.json)


def _worker_init(model_path: str) -> None:
    global _TOKENIZER
    _TOKENIZER = TextTokenizer(model_path)


def _encode_chunk(
    units: list[Document | RawLines], val_threshold: int, text_field: str, dtype: str, bos: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, str, str]]]:
    """Parse (JSON Lines), split and tokenize one chunk of documents, in a worker.

    Returns the tokens of every document with <eos> appended (and ``bos`` first, when given), concatenated;
    per-document lengths; per-document validation flags; and the problems met, in input order.
    """
    texts, problems = [], []
    for unit in units:
        if isinstance(unit, RawLines):
            for text, problem in parse_jsonl_block(unit, text_field):
                if problem:
                    problems.append(problem)
                else:
                    texts.append(text)
        else:
            texts.append(unit.text)
    # one thread per worker process (the workers are the parallelism); framed by the tokenizer's specials
    encoded = _TOKENIZER.documents(texts, bos=bos)
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
    is_val = np.fromiter((_text_hash(t) < val_threshold for t in texts), dtype=bool, count=len(texts))
    return tokens, lengths, is_val, problems


def _text_hash(text: str) -> int:
    """The document's split is a function of its text alone: a 64-bit BLAKE2b hash."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _chunks(units: Iterator[Document | RawLines], chunk_chars: int) -> Iterator[list[Document | RawLines]]:
    chunk: list[Document | RawLines] = []
    size = 0
    for unit in units:
        chunk.append(unit)
        size += unit.size if isinstance(unit, RawLines) else len(unit.text)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file with mode 644, owner 0:0 and mtime 0 (what
    tarfile.TarInfo.tobuf writes for it, built without tarfile's per-member overhead)."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name too long: {name!r}")
    header = bytearray(
        encoded.ljust(100, b"\0")
        + b"0000644\0"
        + b"0000000\0"
        + b"0000000\0"
        + b"%011o\0" % size
        + b"00000000000\0"
        + b" " * 8  # checksum field counts as spaces while the checksum is computed
        + b"0"
        + b"\0" * 100
        + b"ustar\x0000"
        + b"\0" * 32
        + b"\0" * 32
        + b"\0" * 16
        + b"\0" * 155  # devmajor, devminor (empty for regular files), prefix
    ).ljust(tarfile.BLOCKSIZE, b"\0")
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _tar_member(out: io.BytesIO, name: str, payload: bytes) -> None:
    """One ustar member (fixed mtime, owner and mode, so shards are byte-identical run to run)."""
    out.write(_ustar_header(name, len(payload)))
    out.write(payload)
    out.write(b"\0" * (-len(payload) % tarfile.BLOCKSIZE))


def _tar_end(out: io.BytesIO) -> None:
    """Two zero blocks end the archive; pad to a whole record as tar(1) and tarfile do."""
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    out.write(b"\0" * (-out.tell() % tarfile.RECORDSIZE))


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy(array: np.ndarray) -> bytes:
    """The .npy file of a C-contiguous array (the header, made by numpy, is cached per dtype and shape)."""
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(array.shape, array.dtype), allow_pickle=False)
        header = _NPY_HEADERS[key] = buffer.getvalue()[: buffer.tell() - array.nbytes]
    return header + np.ascontiguousarray(array).tobytes()


class ShardBuilder:
    """Writes both splits' shards to a store, keeping what a previous identical run already wrote."""

    def __init__(
        self,
        store: Store,
        settings: ShardSettings,
        dtype: np.dtype,
        previous: dict[str, Any] | None,
        progress_base: dict[str, Any],
        on_shard=None,
        name_prefix: str = "shard-",
        progress_name: str | None = "progress.json",
    ):
        self.store = store
        self.settings = settings
        self.name_prefix, self.progress_name = name_prefix, progress_name
        self.previous = {s["split"] + "/" + s["name"]: s for s in (previous or {}).get("shards", [])}
        self.progress = {**progress_base, "shards": []}
        self.kept = 0
        self.closed = 0  # shards completed by this builder
        self.on_shard = on_shard
        row_len = settings.seq_len + 1
        self.splits = {
            name: SplitState(
                name,
                row_len,
                dtype,
                settings.shard_bytes,
                make_packer(settings.packing, row_len, dtype, settings.pack_buffer),
            )
            for name in SPLITS
        }

    def add(self, split: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents (already framed with their specials) to a split and write every full row."""
        state = self.splits[split]
        state.documents += len(lengths)
        state.tokens_in += len(tokens)
        for row, starts in state.packer.add(tokens, lengths):
            self._add_row(state, row, starts)

    def _add_row(self, state: SplitState, row: np.ndarray, starts: np.ndarray) -> None:
        if state.tar is None:
            state.tar = io.BytesIO()
        key = f"{state.sample_index:010d}"
        _tar_member(state.tar, f"{key}.tokens.npy", _npy(row))
        _tar_member(state.tar, f"{key}.bounds.npy", _npy(starts))
        state.sample_index += 1
        state.shard_samples += 1
        if state.tar.tell() >= state.shard_bytes:
            self._close(state)

    def _close(self, state: SplitState) -> None:
        if state.tar is None:
            return
        _tar_end(state.tar)
        data = state.tar.getvalue()
        name = f"{self.name_prefix}{state.shard_index:06d}.tar"
        entry = {
            "split": state.name,
            "name": name,
            "samples": state.shard_samples,
            "tokens": state.shard_samples * state.row_len,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        path = f"{state.name}/{name}"
        earlier = self.previous.get(path)
        if earlier is not None and earlier["sha256"] != entry["sha256"]:
            raise ShardError(
                f"{self.store.child_url(path)}: a previous run wrote this shard with sha256 "
                f"{earlier['sha256'][:12]}..., this run makes {entry['sha256'][:12]}... from the same settings; the "
                "input changed. Write to a new output location, or delete the old one to start over."
            )
        if earlier is not None and self.store.exists(path) and self.store.size(path) == entry["bytes"]:
            self.kept += 1
        else:
            self.store.put_bytes(data, path)
        state.shards.append({k: v for k, v in entry.items() if k != "split"})
        self.progress["shards"].append(entry)
        if self.progress_name:
            self.store.put_bytes(json.dumps(self.progress, indent=1).encode(), self.progress_name)
        state.tar = None
        state.shard_index += 1
        state.shard_samples = 0
        self.closed += 1
        if self.on_shard:
            self.on_shard(entry)

    def finish(self) -> None:
        for state in self.splits.values():
            for row, starts in state.packer.finish():
                self._add_row(state, row, starts)
            self._close(state)


def build_shards(
    sources: list[str],
    tokenizer_path: str,
    out: str,
    settings: ShardSettings,
    workers: int = 2,
    on_error: str = "skip",
    options: S3Options | None = None,
    command: list[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the whole preparation; return a summary. Raises ShardError / CorpusError on user mistakes."""
    tokenizer = TextTokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    tokenizer_sha = file_sha256(Path(tokenizer_path))
    bos = tokenizer.row_start_id() if settings.packing == "bos-aligned" else None
    corpus = CorpusSpec(tuple(sources), settings.text_field, settings.txt_mode)  # type: ignore[arg-type]
    files = resolve_sources(corpus, options)
    store = open_store(out, options)
    check_writable(store)  # an output that cannot be written is found now, not after the first shard
    fingerprint = {
        "format": FORMAT,
        "sources": files,
        "builtin": builtin_description() if BUILTIN in files else None,
        "tokenizer_sha256": tokenizer_sha,
        "settings": settings.fingerprint_fields(),
    }
    previous = None
    if store.exists("progress.json"):
        previous = read_json(
            store,
            "progress.json",
            "it records the settings and the shards of the run that wrote this output: remove it to start over "
            "here (every shard is written again), or write to a new location",
        )
        if previous.get("fingerprint") != fingerprint:
            changed = diff_fields(previous.get("fingerprint", {}), fingerprint)
            raise ShardError(
                f"{store.child_url('progress.json')}: this output was started with other settings "
                f"({'; '.join(changed)}); refusing to mix shards. Use the same arguments to resume, or a new output "
                "location."
            )
    reading = Problems(policy=on_error)  # type: ignore[arg-type]  # found reading (found again on a resume)
    parsing = Problems(policy=on_error)  # type: ignore[arg-type]  # found by the workers (kept in the resume state)
    show = Progress(sys.stderr.isatty() if progress is None else progress)
    builder = ShardBuilder(store, settings, dtype, previous, {"fingerprint": fingerprint}, on_shard=show.shard)
    chunks_done, checkpoint = resume.resumable(store, fingerprint, builder, parsing)

    started = time.perf_counter()
    units = iter_documents(corpus, reading, options, files, raw_jsonl=True)
    encoded = pack_documents(
        units, builder, settings, tokenizer_path, dtype, bos, workers, parsing, show,
        skip_chunks=chunks_done, on_chunk=checkpoint,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    show.close()
    problems = reading.merged(parsing)
    if not any(state.documents for state in builder.splits.values()):
        report = "; ".join(problems.report()) or "the inputs hold no text"
        raise CorpusError(
            f"no documents in the inputs ({', '.join(files[:5])}{' ...' if len(files) > 5 else ''}): {report}. "
            "Nothing was written; check --input (and --text-field for JSON Lines)"
        )
    summary: dict[str, Any] = {
        "out": out,
        "seconds": seconds,
        "problems": problems.as_dict(),
        "problem_report": problems.report(),
        "kept_shards": builder.kept,
        "tokens_encoded": encoded,
        "resumed_after_chunks": chunks_done,
    }
    for state in builder.splits.values():
        manifest = {
            "format": FORMAT,
            "split": state.name,
            "tokenizer": tokenizer_record(tokenizer, tokenizer_path, tokenizer_sha),
            "seq_len": settings.seq_len,
            "row_len": state.row_len,
            "dtype": state.dtype.name,
            "shards": state.shards,
            "totals": {
                "shards": len(state.shards),
                "samples": sum(s["samples"] for s in state.shards),
                "tokens": sum(s["tokens"] for s in state.shards),
                "bytes": sum(s["bytes"] for s in state.shards),
                **state.counts(),
            },
            "packing": settings.packing_record(bos),
            "corpus": {"sources": files, "builtin": fingerprint["builtin"], "problems": problems.as_dict()},
            "settings": {**asdict(settings), "workers": workers, "on_error": on_error},
            "command": command or [],
        }
        store.put_bytes((json.dumps(manifest, indent=1) + "\n").encode(), f"{state.name}/manifest.json")
        summary[state.name] = manifest["totals"]
    store.delete(resume.RESUME)  # complete: a rerun starts from the top (and keeps every shard)
    return summary


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype a shard stores token ids in: uint16 when the vocabulary fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def pack_documents(
    units: Iterator[Document | RawLines],
    builder: ShardBuilder,
    settings: ShardSettings,
    tokenizer_path: str,
    dtype: np.dtype,
    bos: int | None,
    workers: int,
    problems: Problems,
    show: Progress | None = None,
    pool=None,
    skip_chunks: int = 0,
    on_chunk=None,
) -> int:
    """Tokenize (in ``workers`` processes), split by hash and pack the documents into the builder's shards;
    the first ``skip_chunks`` chunks of input are read but not tokenized (a resumed run); ``on_chunk(n)``
    after the n-th chunk is packed. Returns the tokens encoded."""
    threshold = int(settings.val_fraction * (1 << 64))
    chunks = _chunks(units, settings.chunk_chars)
    skipped = sum(1 for _ in itertools.islice(chunks, skip_chunks))
    if skipped < skip_chunks:
        raise ShardError(f"the input holds {skipped} chunks, fewer than the {skip_chunks} a previous run had done")
    work = _encoded(chunks, (tokenizer_path,), (threshold, settings.text_field, dtype.name, bos), workers, pool)
    encoded = 0
    for index, (tokens, lengths, is_val, chunk_problems) in enumerate(work, start=skip_chunks + 1):
        for problem in chunk_problems:
            problems.add(*problem)
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if mask.any():
                keep = np.repeat(mask, lengths)
                builder.add(split, tokens[keep], lengths[mask])
        encoded += len(tokens)
        if show is not None:
            show.update(len(lengths), len(tokens))
        if on_chunk is not None:
            on_chunk(index)
    builder.finish()
    return encoded


def tokenizer_record(tokenizer: TextTokenizer, path: str, sha256: str) -> dict[str, Any]:
    """What a manifest says of the tokenizer its shards were made with (its path absolute, so that a run or
    `parcae eval` finds it from any directory)."""
    return {
        "path": path if is_s3(str(path)) else os.path.abspath(path),
        "sha256": sha256,
        "vocab_size": tokenizer.vocab_size,
        "kind": tokenizer.kind,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
    }


def tokenizer_pool(tokenizer_path: str, workers: int):
    """Worker processes holding the tokenizer (spawned once; a task of many units reuses them)."""
    context = multiprocessing.get_context("spawn")
    return context.Pool(workers, initializer=_worker_init, initargs=(tokenizer_path,))


def _encoded(chunks, init_args: tuple, task_args: tuple, workers: int, pool=None):
    """Encoded chunks in input order; at most 2 x workers chunks in flight (bounded memory)."""
    if workers <= 0:
        _worker_init(*init_args)
        for chunk in chunks:
            yield _encode_chunk(chunk, *task_args)
        return
    if pool is None:
        with tokenizer_pool(init_args[0], workers) as own:
            yield from _in_pool(chunks, task_args, workers, own)
        return
    yield from _in_pool(chunks, task_args, workers, pool)


def _in_pool(chunks, task_args: tuple, workers: int, pool):
    in_flight: deque = deque()
    for chunk in chunks:
        in_flight.append(pool.apply_async(_encode_chunk, (chunk, *task_args)))
        if len(in_flight) >= 2 * workers:
            yield in_flight.popleft().get()
    while in_flight:
        yield in_flight.popleft().get()


def diff_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: was {_short(a)}, now {_short(b)}")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Progress:
    """tqdm on a terminal; a plain line every 10 seconds otherwise."""

    def __init__(self, tty: bool):
        self.documents = self.tokens = self.shards = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", dynamic_ncols=True)

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(documents)
            self.bar.set_postfix_str(f"{self.tokens / 1e6:.1f}M tokens, {self.shards} shards, {rate / 1e6:.2f}M tok/s")
        elif now - self.last >= 10:
            self.last = now
            print(
                f"prep: {self.documents} documents, {self.tokens} tokens, {self.shards} shards, "
                f"{rate / 1e6:.2f}M tokens/s",
                file=sys.stderr,
                flush=True,
            )

    def shard(self, entry: dict[str, Any]) -> None:
        self.shards += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
