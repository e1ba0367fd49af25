"""Shards on a real S3 endpoint (moto's standalone server on loopback, boto3 with endpoint_url):
upload and verify, resume after a killed run, refuse mixed settings, detect damaged shard sets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from data_prep.shards import ShardSettings, build_shards
from tests.conftest import REPO, parcae_cmd

pytestmark = pytest.mark.slow


def prep(endpoint, *args, wait=True):
    cmd = [*parcae_cmd(), "prep", *args, "--endpoint-url", endpoint]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def objects(client, bucket, prefix):
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) :]: o for o in listing}


def test_upload_verify_and_match_a_local_run(s3_server, tmp_path, corpus_jsonl, tokenizer):
    bucket = s3_server.new_bucket("shards")
    out = f"s3://{bucket}/ds"
    args = [
        "--input",
        str(corpus_jsonl),
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        "64",
        "--shard-size",
        "200KB",
        "--val-fraction",
        "0.05",
    ]
    result = prep(s3_server.endpoint, "shards", *args, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "final partial row dropped" in result.stdout
    verified = prep(s3_server.endpoint, "inspect", f"{out}/train", "--verify")
    assert verified.returncode == 0, verified.stderr
    assert "shards present and intact" in verified.stdout
    decoded = prep(s3_server.endpoint, "inspect", f"{out}/val", "--samples", "2")
    assert decoded.returncode == 0 and decoded.stdout.count("--- shard-000000.tar sample") == 2

    settings = ShardSettings(seq_len=64, shard_bytes=200_000, val_fraction=0.05, packing="bos-aligned")  # the CLI's
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "local"), settings, workers=2)
    client = s3_server.client()
    for split in ("train", "val"):
        local = sorted(p.name for p in (tmp_path / "local" / split).glob("*.tar"))
        remote = sorted(k for k in objects(client, bucket, f"ds/{split}/") if k.endswith(".tar"))
        assert local == remote
        for name in local:
            body = client.get_object(Bucket=bucket, Key=f"ds/{split}/{name}")["Body"].read()
            assert body == (tmp_path / "local" / split / name).read_bytes(), name


def test_resume_after_a_killed_run_keeps_verified_shards(s3_server, tmp_path, tokenizer):
    bucket = s3_server.new_bucket("resume")
    out = f"s3://{bucket}/ds"
    client = s3_server.client()
    args = ["shards", "--tokenizer", str(tokenizer), "--seq-len", "64", "--shard-size", "64KB", "--out", out]
    proc = prep(s3_server.endpoint, *args, wait=False)  # the embedded corpus: a few seconds of work
    deadline = time.monotonic() + 120
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            progress = json.loads(client.get_object(Bucket=bucket, Key="ds/progress.json")["Body"].read())
            written = len(progress["shards"])
        except client.exceptions.NoSuchKey:
            pass
        if written >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert "train/manifest.json" not in objects(client, bucket, "ds/")
    before = objects(client, bucket, "ds/train/")
    assert len(before) >= 3

    result = prep(s3_server.endpoint, *args)
    assert result.returncode == 0, result.stderr
    assert "shards from the interrupted run" in result.stdout
    after = objects(client, bucket, "ds/train/")
    first = "shard-000000.tar"
    assert after[first]["LastModified"] == before[first]["LastModified"]  # kept, not written again

    settings = ShardSettings(seq_len=64, shard_bytes=64 * 1000, packing="bos-aligned")  # the CLI's default
    build_shards(["builtin:stdlib-docstrings"], str(tokenizer), str(tmp_path / "clean"), settings, workers=2)
    manifest = json.loads(client.get_object(Bucket=bucket, Key="ds/train/manifest.json")["Body"].read())
    clean = json.loads((tmp_path / "clean" / "train" / "manifest.json").read_text())
    assert manifest["shards"] == clean["shards"]  # names, sizes and sha256 of every shard
    assert prep(s3_server.endpoint, "inspect", f"{out}/train", "--verify").returncode == 0

    changed = prep(s3_server.endpoint, *[a if a != "64" else "32" for a in args])
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert "started with other settings (settings.seq_len: was 64, now 32)" in changed.stderr


def test_verify_names_missing_corrupt_and_extra_shards(s3_server, corpus_jsonl, tokenizer):
    bucket = s3_server.new_bucket("damaged")
    out = f"s3://{bucket}/ds"
    args = ["--input", str(corpus_jsonl), "--tokenizer", str(tokenizer), "--seq-len", "64", "--shard-size", "100KB"]
    assert prep(s3_server.endpoint, "shards", *args, "--out", out).returncode == 0
    client = s3_server.client()
    body = bytearray(client.get_object(Bucket=bucket, Key="ds/train/shard-000001.tar")["Body"].read())
    body[600] ^= 0x01
    client.put_object(Bucket=bucket, Key="ds/train/shard-000001.tar", Body=bytes(body))
    client.delete_object(Bucket=bucket, Key="ds/train/shard-000002.tar")
    client.put_object(Bucket=bucket, Key="ds/train/shard-999999.tar", Body=b"stray")
    result = prep(s3_server.endpoint, "inspect", f"{out}/train", "--verify")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"corrupt: {out}/train/shard-000001.tar sha256" in result.stderr
    assert f"missing: {out}/train/shard-000002.tar" in result.stderr
    assert f"extra: {out}/train/shard-999999.tar is not in the manifest" in result.stderr
    missing = prep(s3_server.endpoint, "inspect", f"s3://{bucket}/nothing-here", "--verify")
    assert missing.returncode == 1 and "no manifest" in missing.stderr


def test_large_objects_go_up_in_parts(s3_server, monkeypatch):
    import data_prep.storage as storage

    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)  # S3's smallest part size
    bucket = s3_server.new_bucket("multipart")
    store = storage.open_store(f"s3://{bucket}/p", storage.S3Options(s3_server.endpoint))
    payload = os.urandom(11 * 1024 * 1024)
    store.put_bytes(payload, "big.bin")
    head = s3_server.client().head_object(Bucket=bucket, Key="p/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: md5-of-parts "-" part count
    assert store.get_bytes("big.bin") == payload and store.size("big.bin") == len(payload)
