"""Reading shard sets back: the manifest, samples decoded to text, and verification against the manifest."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from data_prep.errors import PrepError
from data_prep.storage import S3Options, StorageError, Store, open_store, sha256_stream
from parcae_errors import UsageError

MANIFEST = "manifest.json"


class ManifestError(PrepError):
    """A shard set or manifest that is missing or unreadable."""


def read_manifest(store: Store) -> dict[str, Any]:
    if not store.exists(MANIFEST):
        raise ManifestError(
            f"{store.child_url(MANIFEST)}: no manifest (a shard set is a directory or s3:// prefix holding "
            "manifest.json, e.g. OUT/train from `parcae prep shards`)"
        )
    try:
        manifest = json.loads(store.get_bytes(MANIFEST))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{store.child_url(MANIFEST)}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    where = store.child_url(MANIFEST)
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: not a shard manifest (a JSON object is expected)")
    missing = [k for k in ("format", "seq_len", "dtype", "shards", "tokenizer") if k not in manifest]
    if missing:
        raise ManifestError(f"{where}: not a shard manifest (missing {', '.join(missing)})")
    if not isinstance(manifest["seq_len"], int) or manifest["seq_len"] < 1:
        raise ManifestError(f"{where}: seq_len must be a positive integer, got {manifest['seq_len']!r}")
    if not isinstance(manifest["tokenizer"], dict):
        raise ManifestError(f"{where}: tokenizer must be an object (path, sha256, vocab_size)")
    if not isinstance(manifest["shards"], list):
        raise ManifestError(f"{where}: shards must be a list")
    for i, entry in enumerate(manifest["shards"]):
        fields = {"name": str, "samples": int, "sha256": str}
        bad = [k for k, kind in fields.items() if not isinstance(entry, dict) or not isinstance(entry.get(k), kind)]
        if bad:
            raise ManifestError(
                f"{where}: shards[{i}] lacks {', '.join(bad)} (every shard needs name, samples and sha256); "
                "rewrite the manifest with `parcae prep shards`"
            )
    return manifest


def iter_samples(stream: io.RawIOBase | Any, name: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, tokens, document starts) for each sample of one tar shard, streamed."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            parts: dict[str, dict[str, np.ndarray]] = {}
            for member in tar:
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member)
                if data is None:
                    continue
                parts.setdefault(key, {})[field] = np.load(io.BytesIO(data.read()), allow_pickle=False)
                sample = parts[key]
                if "tokens.npy" in sample and "bounds.npy" in sample:
                    del parts[key]
                    yield key, sample["tokens.npy"], sample["bounds.npy"]
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise ManifestError(f"{name}: not a readable shard ({exc})") from None


def verify(url: str, options: S3Options | None = None) -> list[str]:
    """Problems of a shard set against its manifest: missing, corrupt (size or sha256), extra shards."""
    store = open_store(url, options)
    manifest = read_manifest(store)
    problems = []
    listed = set(store.list())
    expected = {s["name"] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        name = shard["name"]
        if name not in listed:
            problems.append(f"missing: {store.child_url(name)}")
            continue
        try:
            with store.open(name) as stream:
                digest, size = sha256_stream(stream)
        except StorageError as exc:
            problems.append(f"unreadable: {exc}")
            continue
        if size != shard["bytes"]:
            problems.append(f"corrupt: {store.child_url(name)} has {size} bytes, the manifest says {shard['bytes']}")
        elif digest != shard["sha256"]:
            problems.append(
                f"corrupt: {store.child_url(name)} sha256 {digest[:16]}... differs from the manifest's "
                f"{shard['sha256'][:16]}..."
            )
    for name in sorted(listed - expected - {MANIFEST}):
        problems.append(f"extra: {store.child_url(name)} is not in the manifest")
    return problems


def packing_of(manifest: dict[str, Any]) -> str:
    """The manifest's packing (shard sets from before packing was recorded are concat)."""
    return manifest.get("packing", {}).get("kind", "concat")


def summary(url: str, options: S3Options | None = None) -> dict[str, Any]:
    """A shard set at a glance: packing, rows, and how many rows start at a document boundary (from the
    manifest; counted from the shards for a manifest that does not record it)."""
    store = open_store(url, options)
    manifest = read_manifest(store)
    totals = manifest.get("totals", {})
    rows = sum(s["samples"] for s in manifest["shards"])
    at_start = totals.get("rows_at_document_start")
    counted = at_start is None
    if counted:
        at_start = 0
        for entry in manifest["shards"]:
            with store.open(entry["name"]) as stream:
                at_start += sum(
                    bool(len(b) and b[0] == 0) for _, _, b in iter_samples(stream, store.child_url(entry["name"]))
                )
    return {
        "url": url,
        "packing": packing_of(manifest),
        "seq_len": manifest["seq_len"],
        "tokenizer": manifest["tokenizer"],
        "shards": len(manifest["shards"]),
        "rows": rows,
        "rows_at_document_start": at_start,
        "counted_from_shards": counted,
        "documents": totals.get("documents"),
        "cropped_documents": totals.get("cropped_documents", 0),
        "cropped_tokens": totals.get("cropped_tokens", 0),
        "tokens_produced": totals.get("tokens_produced"),
    }


def summary_line(s: dict[str, Any]) -> str:
    share = s["rows_at_document_start"] / s["rows"] if s["rows"] else 0.0
    tok = s["tokenizer"]
    line = (
        f"{s['url']}: packing {s['packing']}, {s['rows']} rows of {s['seq_len']} + 1 tokens in {s['shards']} shards; "
        f"{s['rows_at_document_start']} rows ({share:.1%}) start at a document boundary"
        f"{' (counted from the shards)' if s['counted_from_shards'] else ''}; "
        f"tokenizer {tok.get('kind', 'sentencepiece')} vocab {tok.get('vocab_size')}"
    )
    if s["packing"] == "bos-aligned" and s["tokens_produced"]:
        line += (
            f"; {s['cropped_tokens']} tokens cropped from {s['cropped_documents']} of {s['documents']} documents "
            f"({s['cropped_tokens'] / s['tokens_produced']:.1%} of the tokens)"
        )
    return line


def decode_samples(
    url: str, tokenizer_path: str | None, count: int, options: S3Options | None = None, shard: int = 0
) -> list[str]:
    from data_prep.tokenizer import TextTokenizer

    store = open_store(url, options)
    manifest = read_manifest(store)
    if not manifest["shards"] or count <= 0:
        return []
    sp = TextTokenizer(tokenizer_path or manifest["tokenizer"]["path"])
    if not 0 <= shard < len(manifest["shards"]):
        raise UsageError(f"--shard {shard}: {url} holds shards 0 to {len(manifest['shards']) - 1}")
    entry = manifest["shards"][shard]
    texts = []
    with store.open(entry["name"]) as stream:
        for key, tokens, starts in iter_samples(stream, store.child_url(entry["name"])):
            texts.append(
                f"--- {entry['name']} sample {key} (documents start at {starts.tolist()}) ---\n"
                f"{sp.decode(tokens.astype(np.int64).tolist())}"
            )
            if len(texts) >= count:
                break
    return texts
