"""What the shard sets of a run must agree on, read from their manifests alone: checked by preflight in
the launcher (which imports no torch, so `parcae train` starts its ranks sooner) and by the mixture in
every rank; and how `parcae validate` describes the sources (no torch there either)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from data_prep.inspect import packing_of
from parcae_errors import ParcaeError

if TYPE_CHECKING:
    from pipeline.jobspec import SourceSpec

log = logging.getLogger(__name__)


class DataError(ParcaeError):
    """A shard set that cannot feed training: named by URL and what is wrong."""


def check_same_tokenizer(sets: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Every source of a mixture must be tokenized alike (same tokenizer file, or at least same kind and
    vocabulary); raises `DataError` naming the source that differs from the first."""
    first_name, first_url, first = sets[0]
    for name, url, manifest in sets[1:]:
        a, b = first["tokenizer"], manifest["tokenizer"]
        differs = (a.get("sha256") and b.get("sha256") and a["sha256"] != b["sha256"]) or any(
            a.get(k) != b.get(k) for k in ("vocab_size", "kind")
        )
        if differs:
            raise DataError(
                f"data source {name!r} ({url}) was tokenized with another tokenizer (vocab {b.get('vocab_size')}, "
                f"sha256 {str(b.get('sha256'))[:12]}...) than source {first_name!r} ({first_url}: vocab "
                f"{a.get('vocab_size')}, sha256 {str(a.get('sha256'))[:12]}...); every source must share one tokenizer"
            )
    packings = {name: packing_of(manifest) for name, _, manifest in sets}
    if len(set(packings.values())) > 1:
        log.warning(
            "the mixture's sources are packed differently (%s): documents start with <bos> in some and after <eos> "
            "in others; prompts (CORE, samples) start the way source %r does",
            ", ".join(f"{n} {p}" for n, p in packings.items()),
            first_name,
        )


def describe_sources(sources: list[SourceSpec], manifests: list[dict[str, Any]]) -> list[str]:
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
