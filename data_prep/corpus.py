"""Reading a raw corpus: plain text, JSON Lines (plain, .gz, .zst), Parquet; local paths, globs, s3:// prefixes.

Documents come out in a deterministic order (sources in the order given, files sorted within each).
Nothing is dropped silently: unreadable files, bad JSON lines and empty documents are counted in a
`Problems` report with file and line; ``policy="stop"`` raises on the first one instead.

The embedded default corpus, ``builtin:stdlib-docstrings``, is the docstrings of the Python standard
library this interpreter ships (modules, classes and functions, in file and source order, tests
excluded): text that exists on any machine without a download. It is deterministic for a given
Python version; the manifest records which.
"""

from __future__ import annotations

import ast
import glob
import gzip
import json
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, NamedTuple

from data_prep.errors import PrepError
from data_prep.storage import S3Options, StorageError, is_s3, open_store, split_s3

BUILTIN = "builtin:stdlib-docstrings"
Policy = Literal["skip", "stop"]
TxtMode = Literal["file", "line", "paragraph"]
SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".ndjson", ".parquet")
COMPRESSIONS = ("", ".gz", ".zst")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


class CorpusError(PrepError):
    """A corpus problem under policy "stop", or inputs that resolve to nothing."""


@dataclass(frozen=True)
class Document:
    text: str
    where: str  # "file:line" or "file:row" or "file"


@dataclass
class Problems:
    """What could not become a document, by kind, with the first examples of each."""

    policy: Policy = "skip"
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, kind: str, where: str, detail: str) -> None:
        message = f"{where}: {detail}"
        if self.policy == "stop":
            raise CorpusError(f"{message} ({kind}; --on-error skip would count it and go on)")
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(message)

    def report(self) -> list[str]:
        lines = []
        for kind, count in sorted(self.counts.items()):
            lines.append(f"{count} {kind}")
            lines += [f"    {example}" for example in self.examples.get(kind, [])]
        return lines

    def merged(self, other: Problems) -> Problems:
        """Both reports in one (counts added, examples of each kind up to max_examples)."""
        out = Problems(self.policy, self.counts + other.counts, {}, self.max_examples)
        for source in (self.examples, other.examples):
            for kind, examples in source.items():
                shown = out.examples.setdefault(kind, [])
                shown += examples[: self.max_examples - len(shown)]
        return out

    def as_dict(self) -> dict[str, object]:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


@dataclass(frozen=True)
class CorpusSpec:
    sources: tuple[str, ...]
    text_field: str = "text"
    txt_mode: TxtMode = "file"


def _kind(name: str) -> tuple[str, str] | None:
    """(format, compression) from a file name, or None when it is not a corpus file."""
    lower = name.lower()
    for comp in COMPRESSIONS:
        for suffix in SUFFIXES:
            if lower.endswith(suffix + comp):
                return _FORMATS.get(suffix, "txt"), comp
    return None


def resolve_sources(spec: CorpusSpec, options: S3Options | None = None) -> list[str]:
    """Every corpus file, in order: sources as given, each expanded and sorted."""
    files: list[str] = []
    for source in spec.sources:
        if source == BUILTIN:
            files.append(source)
        elif is_s3(source):
            store = open_store(source, options)
            names = [n for n in store.list() if _kind(n)]
            if not names and store.exists(""):
                names = [""]
            files += [store.child_url(n) for n in names]
            if not names:
                raise CorpusError(f"{source}: no corpus files under this prefix (looked for {', '.join(SUFFIXES)})")
        else:
            path = Path(source)
            if path.is_dir():
                matches = sorted(str(p) for p in path.rglob("*") if p.is_file() and _kind(p.name))
            elif any(ch in source for ch in "*?["):
                matches = sorted(glob.glob(source, recursive=True))
            elif path.exists():
                matches = [source]
            else:
                raise CorpusError(f"--input {source}: no such file or directory")
            if not matches:
                raise CorpusError(f"--input {source}: matches no file (looked for {', '.join(SUFFIXES)})")
            files += matches
    return files


def iter_documents(
    spec: CorpusSpec,
    problems: Problems,
    options: S3Options | None = None,
    files: list[str] | None = None,
    raw_jsonl: bool = False,
    row_groups: tuple[int, int] | None = None,
) -> Iterator[Document | RawLines]:
    """Every document in order. With ``raw_jsonl``, JSON Lines come out unparsed, in `RawLines` blocks;
    ``row_groups`` (first, end): only those row groups of Parquet files (a work unit of `prep plan`)."""
    for name in files if files is not None else resolve_sources(spec, options):
        if name == BUILTIN:
            yield from _stdlib_docstrings(problems)
            continue
        kind = _kind(name)
        if kind is None:
            problems.add(
                "unreadable files",
                name,
                f"unknown file type (expected one of {', '.join(SUFFIXES)} optionally followed by .gz or .zst)",
            )
            continue
        try:
            raw = _open(name, options)
        except (OSError, StorageError) as exc:
            problems.add("unreadable files", name, str(exc))
            continue
        fmt, comp = kind
        try:
            with raw:
                if fmt == "parquet":
                    yield from _parquet(raw, name, spec.text_field, problems, row_groups)
                else:
                    stream = _decompress(raw, comp)
                    if fmt == "jsonl":
                        yield from _jsonl(stream, name, spec.text_field, problems, raw_jsonl)
                    else:
                        yield from _text(stream, name, spec.txt_mode, problems)
        except (OSError, EOFError, StorageError, ValueError) as exc:
            problems.add("unreadable files", name, f"read failed part-way: {exc}")


def _open(name: str, options: S3Options | None) -> IO[bytes]:
    if is_s3(name):
        bucket, key = split_s3(name)
        store = open_store(f"s3://{bucket}", options)
        if name.lower().endswith(".parquet"):
            return store.open_seekable(key)  # pyarrow seeks: ranged reads, never the whole file in memory
        return store.open(key)
    return open(name, "rb")


def _decompress(raw: IO[bytes], comp: str) -> IO[bytes]:
    if comp == ".gz":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if comp == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw)  # type: ignore[return-value]
    return raw


def _lines(stream: IO[bytes], block_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of any readable byte stream (S3 bodies iterate in chunks, not lines)."""
    pending = b""
    for block in iter(lambda: stream.read(block_size), b""):
        *complete, pending = (pending + block).split(b"\n")
        yield from complete
    if pending:
        yield pending


def _decode(line: bytes, where: str, problems: Problems) -> str | None:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add("undecodable lines", where, f"not UTF-8 ({exc.reason} at byte {exc.start})")
        return None


try:  # orjson parses JSON Lines several times faster; the standard library is the fallback
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads


class RawLines(NamedTuple):
    """A block of JSON Lines records not parsed yet (the shard workers parse them, off the main process)."""

    name: str
    first_number: int  # line number of lines[0]
    lines: list[bytes]
    size: int


def parse_jsonl(line: bytes, name: str, number: int, text_field: str) -> tuple[str | None, tuple[str, str, str] | None]:
    """(text, None) for a good record, else (None, (problem kind, "file:line", detail))."""
    try:
        record = _loads(line)
    except UnicodeDecodeError as exc:
        return None, ("undecodable lines", f"{name}:{number}", f"not UTF-8 ({exc.reason} at byte {exc.start})")
    except ValueError as exc:  # json.JSONDecodeError and orjson.JSONDecodeError both derive from it
        detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        return None, ("bad JSON lines", f"{name}:{number}", detail)
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        found = "no such field" if not isinstance(record, dict) or text_field not in record else "not a string"
        return None, ("records without text", f"{name}:{number}", f"field {text_field!r}: {found}")
    if not value.strip():
        return None, ("empty documents", f"{name}:{number}", f"field {text_field!r} is empty")
    return value, None


def parse_jsonl_block(block: RawLines, text_field: str) -> Iterator[tuple[str | None, tuple[str, str, str] | None]]:
    for offset, line in enumerate(block.lines):
        if line.strip():
            yield parse_jsonl(line, block.name, block.first_number + offset, text_field)


def _jsonl(
    stream: IO[bytes], name: str, text_field: str, problems: Problems, raw: bool, block_size: int = 1 << 20
) -> Iterator[Document | RawLines]:
    number, pending = 1, b""
    for block in iter(lambda: stream.read(block_size), b""):
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        yield from _jsonl_lines(RawLines(name, number, lines, len(block)), text_field, problems, raw)
        number += len(lines)
    if pending:
        yield from _jsonl_lines(RawLines(name, number, [pending], len(pending)), text_field, problems, raw)


def _jsonl_lines(block: RawLines, text_field: str, problems: Problems, raw: bool) -> Iterator[Document | RawLines]:
    if raw:
        yield block
        return
    for offset, line in enumerate(block.lines):
        if not line.strip():
            continue
        text, problem = parse_jsonl(line, block.name, block.first_number + offset, text_field)
        if problem:
            problems.add(*problem)
        else:
            assert text is not None
            yield Document(text, f"{block.name}:{block.first_number + offset}")


def _text(stream: IO[bytes], name: str, mode: TxtMode, problems: Problems) -> Iterator[Document]:
    if mode == "line":
        for number, line in enumerate(_lines(stream), start=1):
            text = _decode(line, f"{name}:{number}", problems)
            if text is not None and text.strip():
                yield Document(text.rstrip("\r\n"), f"{name}:{number}")
        return
    data = stream.read()
    text = _decode(data, name, problems)
    if text is None:
        return
    if mode == "file":
        if text.strip():
            yield Document(text, name)
        else:
            problems.add("empty documents", name, "the file holds no text")
        return
    line = 1
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            yield Document(paragraph.strip("\n"), f"{name}:{line}")
        line += paragraph.count("\n") + 2


def parquet_row_groups(name: str, options: S3Options | None = None) -> int:
    """How many row groups a Parquet file has (its footer only is read)."""
    import pyarrow.parquet as pq

    with _open(name, options) as raw:
        return pq.ParquetFile(raw).num_row_groups


def _parquet(
    raw: IO[bytes], name: str, text_field: str, problems: Problems, row_groups: tuple[int, int] | None = None
) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{name}: reading Parquet needs pyarrow (install the project's [parquet] extra)") from None
    try:
        parquet = pq.ParquetFile(raw)
    except Exception as exc:  # pyarrow raises its own hierarchy
        problems.add("unreadable files", name, f"not a Parquet file: {exc}")
        return
    if text_field not in parquet.schema_arrow.names:
        problems.add(
            "unreadable files", name, f"no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})"
        )
        return
    first, end = row_groups or (0, parquet.num_row_groups)
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(first))
    for group in range(first, min(end, parquet.num_row_groups)):
        column = parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for value in column:
            row += 1
            where = f"{name}:row {row}"
            if not isinstance(value, str) or not value.strip():
                problems.add("empty documents", where, f"column {text_field!r} is empty or null")
            else:
                yield Document(value, where)


def _stdlib_docstrings(problems: Problems) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    for path in files:
        rel = f"{BUILTIN}/{path.relative_to(root)}"
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError) as exc:
            problems.add("unreadable files", rel, f"not parseable: {exc}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and doc.strip():
                    yield Document(doc, f"{rel}:{getattr(node, 'lineno', 1)}")


def builtin_description() -> str:
    return f"{BUILTIN} (Python {sys.version.split()[0]} standard library docstrings)"
