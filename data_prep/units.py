"""Preparing a corpus in work units, on many machines: a plan, units run anywhere, one merge.

``parcae prep plan`` resolves the inputs into a list of work units (one per input file, or a Parquet
file's row groups a few at a time with ``--row-groups-per-unit``) and writes
``OUT/plan.json`` with the tokenizer's checksum and the settings. ``parcae prep run OUT [--task i
--tasks n]`` prepares the units i, i + n, ... that are not done (a Slurm array task runs one such
share; ``parcae prep submit`` submits them). A unit tokenizes and packs its own documents, in input
order, into its own shards, ``OUT/{train,val}/u<unit>-<shard>.tar``, then records them in
``OUT/units/u<unit>.json`` (names, sizes, sha256, row and token counts, documents, problems). The
record is written last: a unit is either recorded, with every shard it lists already written, or not
done, and a rerun makes it again, writing the same bytes under the same names, from its last shard
boundary (``units/u<unit>.resume.npz``, as `parcae prep shards` resumes).
``parcae prep merge OUT`` refuses a set with any unit not done (naming them), checks every shard
against its unit's record, and writes the ``train`` and ``val`` manifests that training reads.

The guarantee: a unit's shards are a function of its input file, the tokenizer and the settings
alone, so the same plan gives byte-identical shards whatever the number of tasks, their order, the
machines or the workers per task. Rows never span two units (each unit drops its final partial row;
counted). The split of a document (train or val) is a hash of its text, as in one-machine prep.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from data_prep import resume
from data_prep.corpus import (
    BUILTIN,
    CorpusSpec,
    Problems,
    builtin_description,
    iter_documents,
    parquet_row_groups,
    resolve_sources,
)
from data_prep.inspect import MANIFEST
from data_prep.shards import (
    FORMAT,
    SPLITS,
    Progress,
    ShardBuilder,
    ShardError,
    ShardSettings,
    diff_fields,
    pack_documents,
    token_dtype,
    tokenizer_pool,
    tokenizer_record,
)
from data_prep.storage import S3Options, StorageError, Store, check_writable, open_store, read_json, sha256_stream
from data_prep.tokenizer import TextTokenizer, file_sha256

PLAN = "plan.json"
PLAN_FORMAT = "parcae-prep-plan/1"
STALE_SECONDS = 300  # a running unit whose heartbeat is older than this is reported as stalled


def unit_name(index: int) -> str:
    return f"u{index:05d}"


def make_plan(
    sources: list[str],
    tokenizer_path: str,
    out: str,
    settings: ShardSettings,
    on_error: str = "skip",
    options: S3Options | None = None,
    command: list[str] | None = None,
    row_groups_per_unit: int = 0,
) -> dict[str, Any]:
    """Resolve the inputs into units (a file each; a Parquet file's row groups ``row_groups_per_unit`` at a
    time when that is set) and write OUT/plan.json (an existing identical plan is kept; a
    different one is refused, naming what differs)."""
    tokenizer = TextTokenizer(tokenizer_path)
    if settings.packing == "bos-aligned":
        tokenizer.row_start_id()  # a tokenizer without <bos> is refused now, not in every task
    corpus = CorpusSpec(tuple(sources), settings.text_field, settings.txt_mode)  # type: ignore[arg-type]
    files = resolve_sources(corpus, options)
    store = open_store(out, options)
    check_writable(store)
    plan = {
        "format": PLAN_FORMAT,
        "shard_format": FORMAT,
        "units": _units(files, row_groups_per_unit, options),
        "builtin": builtin_description() if BUILTIN in files else None,
        "tokenizer": {"path": os.path.abspath(tokenizer_path), "sha256": file_sha256(Path(tokenizer_path))},
        "settings": {**settings.fingerprint_fields(), "on_error": on_error, "chunk_chars": settings.chunk_chars},
        "command": command or [],
    }
    if store.exists(PLAN):
        old = read_json(store, PLAN, "remove it to plan here again")
        same = {k: v for k, v in old.items() if k != "command"} == {k: v for k, v in plan.items() if k != "command"}
        if not same:
            raise ShardError(
                f"{store.child_url(PLAN)}: a different plan is already here ({'; '.join(diff_fields(old, plan)[:5])}); "
                "use a new output location, or the same arguments to keep this one"
            )
        return old
    store.put_bytes((json.dumps(plan, indent=1) + "\n").encode(), PLAN)
    return plan


def _units(files: list[str], row_groups_per_unit: int, options: S3Options | None) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = []
    for name in files:
        if row_groups_per_unit and name.lower().endswith(".parquet"):
            count = parquet_row_groups(name, options)
            units += [
                {"input": name, "row_groups": [first, min(first + row_groups_per_unit, count)]}
                for first in range(0, count, row_groups_per_unit)
            ]
        else:
            units.append({"input": name})
    return units


def describe_unit(unit: dict[str, Any]) -> str:
    groups = unit.get("row_groups")
    return f"{unit['input']}, row groups {groups[0]}-{groups[1] - 1}" if groups else unit["input"]


def plan_fingerprint(plan: dict[str, Any]) -> str:
    """The sha256 of what decides the shards: units, tokenizer and settings (not the command or the output)."""
    decisive = {k: v for k, v in plan.items() if k != "command"}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


def read_plan(out: str, options: S3Options | None = None) -> tuple[Store, dict[str, Any]]:
    store = open_store(out, options)
    if not store.exists(PLAN):
        raise ShardError(f"{store.child_url(PLAN)}: no plan here (make one with `parcae prep plan ... --out {out}`)")
    plan = read_json(store, PLAN, f"make the plan again with `parcae prep plan ... --out {out}`")
    if plan.get("format") != PLAN_FORMAT:
        raise ShardError(f"{store.child_url(PLAN)}: not a prep plan (format {plan.get('format')!r})")
    return store, plan


def _settings(plan: dict[str, Any]) -> ShardSettings:
    fields = {k: v for k, v in plan["settings"].items() if k != "on_error"}
    return ShardSettings(**fields)


def task_units(plan: dict[str, Any], task: int, tasks: int) -> list[int]:
    """The units of task ``task`` of ``tasks``: every ``tasks``-th, from ``task`` (balanced by count)."""
    return list(range(task, len(plan["units"]), tasks))


def run_units(
    out: str,
    task: int = 0,
    tasks: int = 1,
    workers: int = 2,
    options: S3Options | None = None,
    tokenizer_path: str | None = None,
    log=None,
) -> dict[str, Any]:
    """Prepare this task's units that are not done; returns counts (units done now, already done)."""
    if not 0 <= task < tasks:
        raise ShardError(f"--task {task}: expected 0 <= task < --tasks ({tasks})")
    store, plan = read_plan(out, options)
    path = tokenizer_path or plan["tokenizer"]["path"]
    if not Path(path).is_file() or file_sha256(Path(path)) != plan["tokenizer"]["sha256"]:
        raise ShardError(
            f"tokenizer {path}: missing here or not the plan's (sha256 {plan['tokenizer']['sha256'][:12]}...); "
            "pass --tokenizer with the plan's tokenizer file as this machine sees it"
        )
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    done_now, tokens, encoded = 0, 0, 0
    mine = task_units(plan, task, tasks)
    say(f"prep task {task}/{tasks}: {len(mine)} of {len(plan['units'])} units")
    todo = [i for i in mine if not store.exists(f"units/{unit_name(i)}.json")]
    skipped = len(mine) - len(todo)
    pool = tokenizer_pool(path, workers) if workers > 0 and todo else None
    try:
        for index in todo:
            started = time.perf_counter()
            record = prepare_unit(store, plan, index, path, workers, options, pool)
            done_now += 1
            produced = sum(record["splits"][s]["tokens_produced"] for s in SPLITS)
            tokens += produced
            encoded += record["tokens_encoded"]
            seconds = time.perf_counter() - started
            say(
                f"prep task {task}: unit {unit_name(index)} ({describe_unit(plan['units'][index])}) done: {produced} "
                f"tokens in {seconds:.1f} s ({produced / max(seconds, 1e-9) / 1e6:.2f}M tokens/s); "
                f"{done_now + skipped} of {len(mine)} units of this task done"
            )
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {"done_now": done_now, "already_done": skipped, "tokens": tokens, "tokens_encoded": encoded}


def prepare_unit(
    store: Store,
    plan: dict[str, Any],
    index: int,
    tokenizer_path: str,
    workers: int,
    options: S3Options | None,
    pool=None,
) -> dict[str, Any]:
    """One unit: its shards, then its record (last). A heartbeat file says it is running."""
    settings = _settings(plan)
    name = unit_name(index)
    tokenizer = TextTokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    bos = tokenizer.row_start_id() if settings.packing == "bos-aligned" else None
    running = {
        "unit": index,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "task": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "job": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"),
        "started": _now(),
    }
    heartbeat = f"units/{name}.running.json"

    def beat(entry: dict[str, Any] | None = None) -> None:
        running["updated"] = _now()
        running["shards"] = running.get("shards", 0) + (1 if entry else 0)
        running["tokens"] = running.get("tokens", 0) + (entry["tokens"] if entry else 0)
        store.put_bytes(json.dumps(running).encode(), heartbeat)

    beat()
    builder = ShardBuilder(
        store,
        settings,
        dtype,
        None,
        {},
        on_shard=beat,
        name_prefix=f"{name}-",
        progress_name=None,
    )
    reading = Problems(policy=plan["settings"]["on_error"])  # found again when a resumed unit rereads its input
    parsing = Problems(policy=plan["settings"]["on_error"])  # kept in the unit's resume state
    corpus = CorpusSpec((), settings.text_field, settings.txt_mode)  # type: ignore[arg-type]
    unit = plan["units"][index]
    groups = tuple(unit["row_groups"]) if "row_groups" in unit else None
    units = iter_documents(corpus, reading, options, [unit["input"]], raw_jsonl=True, row_groups=groups)
    # a unit killed half-way resumes at its last shard boundary (data_prep.resume), from its own state file
    state_name = f"units/{name}.resume.npz"
    fingerprint = {"plan": plan_fingerprint(plan), "unit": index}
    chunks_done, checkpoint = resume.resumable(store, fingerprint, builder, parsing, state_name)
    encoded = pack_documents(
        units,
        builder,
        settings,
        tokenizer_path,
        dtype,
        bos,
        workers,
        parsing,
        Progress(False),  # a line every 10 seconds in the task's log
        pool=pool,
        skip_chunks=chunks_done,
        on_chunk=checkpoint,
    )
    record: dict[str, Any] = {"unit": index, **unit, "splits": {}}
    for split, state in builder.splits.items():
        record["splits"][split] = {"shards": state.shards, **state.counts()}
    record["packing"] = settings.packing_record(bos)
    record["problems"] = reading.merged(parsing).as_dict()
    record["tokenizer"] = tokenizer_record(tokenizer, tokenizer_path, plan["tokenizer"]["sha256"])
    record["finished"] = _now()
    store.put_bytes((json.dumps(record, indent=1) + "\n").encode(), f"units/{name}.json")
    store.delete(heartbeat)
    store.delete(state_name)
    return {**record, "tokens_encoded": encoded, "resumed_after_chunks": chunks_done}


def merge(out: str, options: S3Options | None = None, checksums: bool = True) -> dict[str, Any]:
    """Write OUT/{train,val}/manifest.json from every unit's record, after checking that every unit is
    done and every shard is there with the recorded size (and sha256). Nothing is written on a problem."""
    store, plan = read_plan(out, options)
    records, missing = [], []
    for index in range(len(plan["units"])):
        name = f"units/{unit_name(index)}.json"
        if not store.exists(name):
            missing.append(f"{unit_name(index)} ({describe_unit(plan['units'][index])})")
            continue
        records.append(read_json(store, name, f"remove it and run unit {unit_name(index)} again"))
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise ShardError(
            f"{out}: {len(missing)} of {len(plan['units'])} units not done: {shown}; run them (`parcae prep run "
            f"{out}` or `parcae prep submit {out}`), then merge again. No manifest was written"
        )
    problems = []
    row_len = _settings(plan).seq_len + 1
    for record in records:
        for split in SPLITS:
            for shard in record["splits"][split]["shards"]:
                if shard["tokens"] != shard["samples"] * row_len:
                    problems.append(f"tokens: {split}/{shard['name']} records {shard['tokens']} tokens in "
                                    f"{shard['samples']} rows of {row_len}")  # fmt: skip
                problems += _check_shard(store, f"{split}/{shard['name']}", shard, checksums)
    if problems:
        raise ShardError(
            f"{out}: {len(problems)} shard(s) do not match their unit's record:\n  "
            + "\n  ".join(problems[:20])
            + "\nrerun the units they belong to (delete units/u<unit>.json first). No manifest was written"
        )
    settings = _settings(plan)
    summary: dict[str, Any] = {"units": len(records)}
    for split in SPLITS:
        parts = [r["splits"][split] for r in records]
        shards = [shard for part in parts for shard in part["shards"]]
        totals = {
            "shards": len(shards),
            "samples": sum(s["samples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        }
        for key in (k for k in parts[0] if k != "shards"):  # documents, tokens produced, what packing dropped
            totals[key] = sum(part[key] for part in parts)
        problem_counts: dict[str, int] = {}
        for record in records:
            for kind, count in record["problems"]["counts"].items():
                problem_counts[kind] = problem_counts.get(kind, 0) + count
        manifest = {
            "format": FORMAT,
            "split": split,
            "tokenizer": records[0]["tokenizer"],
            "seq_len": settings.seq_len,
            "row_len": settings.seq_len + 1,
            "dtype": token_dtype(records[0]["tokenizer"]["vocab_size"]).name,
            "shards": shards,
            "totals": totals,
            "packing": records[0]["packing"],
            "corpus": {
                "sources": [u["input"] for u in plan["units"]],
                "builtin": plan["builtin"],
                "problems": {"counts": problem_counts},
            },
            "settings": plan["settings"],
            "units": len(records),
            "plan_sha256": plan_fingerprint(plan),
            "command": plan["command"],
        }
        store.put_bytes((json.dumps(manifest, indent=1) + "\n").encode(), f"{split}/{MANIFEST}")
        summary[split] = totals
    return summary


def _check_shard(store: Store, name: str, entry: dict[str, Any], checksums: bool) -> list[str]:
    if not store.exists(name):
        return [f"missing: {store.child_url(name)}"]
    if not checksums:
        size = store.size(name)
        if size != entry["bytes"]:
            return [f"size: {store.child_url(name)} has {size} bytes, its record says {entry['bytes']}"]
        return []
    try:
        with store.open(name) as stream:
            digest, size = sha256_stream(stream)
    except StorageError as exc:
        return [f"unreadable: {exc}"]
    if size != entry["bytes"] or digest != entry["sha256"]:
        return [f"corrupt: {store.child_url(name)} ({size} bytes, sha256 {digest[:12]}...) differs from its record"]
    return []


def status(out: str, options: S3Options | None = None) -> dict[str, Any]:
    """Units done, running (heartbeat within STALE_SECONDS), stalled (an older heartbeat: a task that died
    or hangs) and pending; tokens so far (done units, and the shards of running ones)."""
    store, plan = read_plan(out, options)
    names = set(open_store(store.child_url("units"), options).list())
    now = datetime.datetime.now(datetime.UTC)
    out_units: dict[str, list[str]] = {"done": [], "running": [], "stalled": [], "pending": []}
    tokens = 0
    for index in range(len(plan["units"])):
        name = unit_name(index)
        if f"{name}.json" in names:
            record = read_json(store, f"units/{name}.json", f"remove it and run unit {name} again")
            tokens += sum(record["splits"][s]["tokens_produced"] for s in SPLITS)
            out_units["done"].append(name)
        elif f"{name}.running.json" in names:
            beat = read_json(store, f"units/{name}.running.json", "a heartbeat: remove it if no task runs that unit")
            age = (now - datetime.datetime.fromisoformat(beat["updated"])).total_seconds()
            tokens += beat.get("tokens", 0)
            where = f"{name} (host {beat['host']}, task {beat.get('task')}, last heard {age:.0f} s ago)"
            out_units["stalled" if age > STALE_SECONDS else "running"].append(where)
        else:
            out_units["pending"].append(name)
    merged = store.exists(f"train/{MANIFEST}") and store.exists(f"val/{MANIFEST}")
    return {"units": len(plan["units"]), **out_units, "tokens": tokens, "merged": merged}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
