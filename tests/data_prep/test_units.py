"""Prep in work units: a plan, units run by any number of tasks giving byte-identical shards, a unit
killed half-way redone from its start, a merge that refuses a partial set, status."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from data_prep.shards import ShardError, ShardSettings
from data_prep.units import make_plan, merge, run_units, status
from tests.conftest import REPO

SETTINGS = ShardSettings(seq_len=32, shard_bytes=20_000, val_fraction=0.05)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_jsonl):
    """The test corpus as 8 JSON Lines files: 8 units."""
    root = tmp_path_factory.mktemp("units-in")
    lines = corpus_jsonl.read_text().splitlines()
    for k in range(8):
        (root / f"part{k}.jsonl").write_text("\n".join(lines[k::8]) + "\n")
    return root


def shard_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def manifests(root):
    out = {}
    for split in ("train", "val"):
        manifest = json.loads((root / split / "manifest.json").read_text())
        out[split] = {k: v for k, v in manifest.items() if k not in ("command",)}
    return out


def crash_after(out, shards, task=0, tasks=1):
    """`prep run` in a subprocess SIGKILLed right after writing its n-th shard: a task killed
    mid-unit."""
    code = textwrap.dedent(f"""
        import os
        from data_prep import shards, units
        written = [0]
        close = shards.ShardBuilder._close
        def dying_close(self, state):
            before = state.shard_index
            close(self, state)
            if state.shard_index > before:
                written[0] += 1
                if written[0] == {shards}:
                    os.kill(os.getpid(), 9)  # SIGKILL
        shards.ShardBuilder._close = dying_close
        units.run_units({str(out)!r}, {task}, {tasks}, workers=0)
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inputs, tokenizer):
    """The plan run whole by one task with 2 workers, merged."""
    out = tmp_path_factory.mktemp("units-ref") / "out"
    plan = make_plan([str(inputs)], str(tokenizer), str(out), SETTINGS)
    assert len(plan["units"]) == 8
    assert run_units(str(out), workers=2, log=lambda _: None)["done_now"] == 8
    merge(str(out))
    return out


def test_any_number_of_tasks_gives_the_same_shards(tmp_path, inputs, tokenizer, reference):
    out = tmp_path / "out"
    make_plan([str(inputs)], str(tokenizer), str(out), SETTINGS)
    for task in (2, 0, 1):  # any order, any machine
        run_units(str(out), task, 3, workers=0, log=lambda _: None)
    summary = merge(str(out))
    assert summary["units"] == 8 and shard_files(out) == shard_files(reference)
    assert manifests(out) == manifests(reference)
    names = [s["name"] for s in json.loads((out / "train" / "manifest.json").read_text())["shards"]]
    assert names[0] == "u00000-000000.tar" and len(set(names)) == len(names)
    # training reads the merged manifest
    from pipeline.data.loader import ShardLoader

    loader = ShardLoader(str(out / "train"), rank=0, world_size=2, micro_batch_size=4, seq_len=32, seed=0,
                         shuffle_buffer=0, prefetch=0)  # fmt: skip
    assert next(iter(loader)).shape == (4, 33)


def test_a_unit_killed_half_way_is_redone_and_the_set_completes(tmp_path, inputs, tokenizer, reference):
    out = tmp_path / "out"
    make_plan([str(inputs)], str(tokenizer), str(out), SETTINGS)
    died = crash_after(out, shards=5, task=1, tasks=2)  # task 1 of 2: units 1, 3, 5, 7
    assert died.returncode == -9, died.stderr[-2000:]
    now = status(str(out))
    assert len(now["done"]) + len(now["running"]) + len(now["pending"]) == 8 and len(now["running"]) == 1
    running = now["running"][0].split()[0]
    assert not (out / "units" / f"{running}.json").exists()  # a half-made unit has no record
    with pytest.raises(ShardError, match=rf"units not done: .*{running}"):
        merge(str(out))
    assert not (out / "train" / "manifest.json").exists()
    # rerun: the half-made unit is redone from its start, recorded units are kept
    again = run_units(str(out), 1, 2, workers=0, log=lambda _: None)
    assert again["done_now"] + again["already_done"] == 4 and again["already_done"] == len(now["done"])
    run_units(str(out), 0, 2, workers=0, log=lambda _: None)
    merge(str(out))
    assert shard_files(out) == shard_files(reference)  # no document lost or written twice
    assert status(str(out))["merged"] and not list((out / "units").glob("*.running.json"))


def test_merge_checks_every_shard_and_status_finds_stalled_units(tmp_path, inputs, tokenizer):
    out = tmp_path / "out"
    make_plan([str(inputs)], str(tokenizer), str(out), SETTINGS)
    run_units(str(out), workers=0, log=lambda _: None)
    shard = sorted((out / "train").glob("u00003-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"corrupt: {shard}"):
        merge(str(out))
    merge(str(out), checksums=False)  # sizes only: the flipped byte is not seen
    (out / "units" / "u00004.json").unlink()
    heartbeat = {"unit": 4, "host": "node7", "pid": 1, "task": "2", "updated": "2026-01-01T00:00:00+00:00"}
    (out / "units" / "u00004.running.json").write_text(json.dumps(heartbeat))
    now = status(str(out))
    assert len(now["done"]) == 7 and now["stalled"][0].startswith("u00004 (host node7, task 2, last heard")
    # another plan into the same place is refused, naming what differs
    with pytest.raises(ShardError, match=r"a different plan is already here \(settings.seq_len: was 32, now 64"):
        make_plan([str(inputs)], str(tokenizer), str(out), ShardSettings(seq_len=64, shard_bytes=20_000))


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_cli_plan_run_merge_status(tmp_path, inputs, tokenizer, reference):
    def parcae(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", "prep", *args], cwd=REPO, capture_output=True,
                              text=True)  # fmt: skip

    out = tmp_path / "out"
    plan = parcae("plan", "--input", str(inputs), "--tokenizer", str(tokenizer), "--out", str(out), "--seq-len", "32",
                  "--shard-size", "20000", "--val-fraction", "0.05", "--packing", "concat")  # fmt: skip
    assert plan.returncode == 0 and "8 units" in plan.stdout, plan.stderr
    early = parcae("merge", str(out))
    assert early.returncode == 1 and "8 of 8 units not done: u00000" in early.stderr and "Traceback" not in early.stderr
    run = parcae("run", str(out), "--task", "0", "--tasks", "2", "--workers", "1")
    assert run.returncode == 0 and "unit u00006 (" in run.stderr and "4 units prepared" in run.stdout
    assert "4 of 8 units done" in parcae("status", str(out)).stdout
    bad = parcae("run", str(out), "--task", "2", "--tasks", "2")
    assert bad.returncode != 0 and "--task 2: expected 0 <= task < --tasks (2)" in bad.stderr
    assert parcae("run", str(out), "--task", "1", "--tasks", "2", "--workers", "0").returncode == 0
    merged = parcae("merge", str(out))
    assert merged.returncode == 0 and "merged 8 units" in merged.stdout
    assert shard_files(out) == shard_files(reference)


def test_parquet_row_groups_as_units_from_s3(tmp_path, builtin_docs, tokenizer, s3_server):
    """A Parquet file on S3 split into units of 2 row groups (read by ranged GETs): every document once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.storage import S3Options

    docs = builtin_docs[:500]
    pq.write_table(pa.table({"text": docs}), tmp_path / "docs.parquet", row_group_size=100)  # 5 row groups
    bucket = s3_server.new_bucket("parquet-units")
    s3_server.client().upload_file(str(tmp_path / "docs.parquet"), bucket, "in/docs.parquet")
    options = S3Options(s3_server.endpoint)
    out = tmp_path / "out"
    plan = make_plan([f"s3://{bucket}/in"], str(tokenizer), str(out), SETTINGS, options=options, row_groups_per_unit=2)
    assert [u["row_groups"] for u in plan["units"]] == [[0, 2], [2, 4], [4, 5]]
    run_units(str(out), 1, 2, workers=0, options=options, log=lambda _: None)
    with pytest.raises(ShardError, match=r"u00000 \(s3://.*/in/docs.parquet, row groups 0-1\)"):
        merge(str(out))
    run_units(str(out), 0, 2, workers=0, options=options, log=lambda _: None)
    summary = merge(str(out))
    assert summary["train"]["documents"] + summary["val"]["documents"] == len(docs)
    record = json.loads((out / "units" / "u00002.json").read_text())
    assert (
        record["row_groups"] == [4, 5]
        and record["splits"]["train"]["documents"] + record["splits"]["val"]["documents"] == 100
    )


def test_a_unit_killed_half_way_resumes_at_its_last_shard_boundary(tmp_path, corpus_jsonl, tokenizer):
    """Two plain-text units in small chunks: a task killed inside unit 0 leaves units/u00000.resume.npz; the
    rerun tokenizes only what follows its last shard boundary and writes the reference's bytes."""
    texts = [json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(2):
        (inputs / f"part{k}.txt").write_text("\n\n".join(texts[k::2]))
    settings = ShardSettings(seq_len=32, shard_bytes=20_000, val_fraction=0.05, txt_mode="paragraph",
                             chunk_chars=5_000)  # fmt: skip
    for name in ("ref", "out"):
        make_plan([str(inputs)], str(tokenizer), str(tmp_path / name), settings)
    run_units(str(tmp_path / "ref"), workers=0, log=lambda _: None)
    merge(str(tmp_path / "ref"))
    died = crash_after(tmp_path / "out", shards=60)
    assert died.returncode == -9, died.stderr[-2000:]
    assert (tmp_path / "out" / "units" / "u00000.resume.npz").exists()
    again = run_units(str(tmp_path / "out"), workers=0, log=lambda _: None)
    assert again["done_now"] == 2 and again["tokens_encoded"] < again["tokens"] - 10_000
    merge(str(tmp_path / "out"))
    assert shard_files(tmp_path / "out") == shard_files(tmp_path / "ref")
    assert manifests(tmp_path / "out") == manifests(tmp_path / "ref")
    assert not list((tmp_path / "out" / "units").glob("*.resume.npz"))
