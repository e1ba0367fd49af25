"""Fault injection on real 2-rank ZeRO-3 runs: kill -9 of the launcher, of one rank, of the S3 endpoint (during
steps, during checkpoint uploads); two runs on one run directory; a full and a read-only output location; a
corrupt shard; a corrupt checkpoint. Every fault is survived, or reported by name before work is lost, and
a rerun of the same command ends with exactly the per-step losses of an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep.storage import S3Options, StorageError, open_store
from pipeline.data.loader import ShardLoader
from pipeline.jobspec import load_spec
from tests.conftest import (
    CONFIGS,
    REFERENCE_STEPS,
    REPO,
    free_port,
    parcae_cmd,
    parcae_in_process,
    parcae_refuses,
    start_run,
    step_losses,
    train_cmd,
    wait_for_step,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = REFERENCE_STEPS


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def finish_and_compare(cmd: list[str], run_dir: Path, log: Path, expected: dict[int, float], resumed_at: int) -> None:
    """Rerun the same command to the end: it resumes at ``resumed_at`` with the uninterrupted run's losses."""
    again = start_run(cmd, log)
    assert again.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resuming at step {resumed_at}" in log.read_text(), log.read_text()[-3000:]
    assert_losses(run_dir, expected, range(resumed_at + 1, STEPS + 1))


def assert_losses(run_dir: Path, expected: dict[int, float], steps: range) -> None:
    """The run's losses at ``steps`` are exactly ``expected``'s."""
    after = step_losses(run_dir)
    for step in steps:
        assert after[step] == expected[step], (step, after[step], expected[step])


def test_killed_rank_stops_the_run_quietly(tmp_path, tiny_shards, reference_losses):
    """A rank killed (SIGKILL, as the out-of-memory killer sends it) ends the run, named by the launcher with
    the rerun; the rerun resumes, and its launcher killed alone takes its ranks with it; a third start
    continues to the uninterrupted run's losses. (This test took in test_killed_launcher_takes_its_ranks_with_it,
    which trained a run of its own to step 12 before killing its launcher.)"""
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_shards, run_dir, STEPS)
    proc = start_run(cmd, tmp_path / "first.log")
    wait_for_step(run_dir, proc, 12)
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    log = (tmp_path / "first.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    # the launcher says what happened (the rank cannot): which rank, the signal, the likely cause, the rerun
    assert "error: rank 1 was killed by SIGKILL: the kernel's out-of-memory killer" in log, log[-3000:]
    assert f"the same command resumes from step-00000010 ({run_dir / 'checkpoints'})" in log
    again = start_run(cmd, tmp_path / "again.log")
    wait_for_step(run_dir, again, 17)
    assert "resuming at step 10" in (tmp_path / "again.log").read_text()
    ranks = children(again.pid)
    assert len(ranks) == 2
    os.kill(again.pid, signal.SIGKILL)  # the launcher alone, not its process group
    again.wait(timeout=30)
    wait_until(lambda: not any(alive(r) for r in ranks), 15, "the ranks die with their launcher")
    assert_losses(run_dir, reference_losses, range(11, 16))
    finish_and_compare(cmd, run_dir, tmp_path / "third.log", reference_losses, 15)


def test_a_hung_rank_ends_the_run_with_the_timeout_message(tmp_path, tiny_shards):
    """A rank that stops answering (SIGSTOP: a hung GPU, a wedged node) is not waited on forever: the other
    rank's next collective fails after training.collective_timeout_s and says so; the launcher ends the run."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_shards, run_dir, 10**6, "training.collective_timeout_s=20")
    proc = start_run(cmd, tmp_path / "run.log")
    wait_for_step(run_dir, proc, 3)
    os.kill(children(proc.pid)[1], signal.SIGSTOP)
    stopped = time.monotonic()
    assert proc.wait(timeout=120) == 1
    elapsed = time.monotonic() - stopped
    log = (tmp_path / "run.log").read_text()
    assert "a collective did not complete within training.collective_timeout_s (20 s)" in log, log[-3000:]
    assert "Traceback" not in log and 20 <= elapsed < 60, elapsed


def test_one_run_directory_has_one_owner(tmp_path, tiny_shards, reference_losses):
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_shards, run_dir, STEPS)
    first = start_run(cmd, tmp_path / "first.log")
    wait_for_step(run_dir, first, 7)
    os.killpg(first.pid, signal.SIGSTOP)  # the owner holds the run (paused, so the test can take its time)
    second = start_run(cmd, tmp_path / "second.log")
    assert second.wait(timeout=120) == 3
    log = (tmp_path / "second.log").read_text()
    assert "is in use by pid" in log and "Traceback" not in log and log.count("error: ") == 1, log[-3000:]
    assert step_losses(run_dir) == {k: v for k, v in reference_losses.items() if k <= max(step_losses(run_dir))}
    os.killpg(first.pid, signal.SIGKILL)  # a dead owner's lock is free at once
    first.wait(timeout=60)
    finish_and_compare(cmd, run_dir, tmp_path / "third.log", reference_losses, 5)


def test_a_body_cut_off_mid_read_is_read_again(s3_server):
    """botocore retries failed requests, not a response body that breaks off while it is read: the store
    does (storage.max_retries), and names the object when it gives up."""
    bucket = s3_server.new_bucket("cut")
    payload = os.urandom(300_000)
    s3_server.client().put_object(Bucket=bucket, Key="shard.tar", Body=payload)
    port, target = free_port(), int(s3_server.endpoint.rsplit(":", 1)[1])
    script = [sys.executable, str(REPO / "tests" / "fault_proxy.py"), str(port), str(target), "2"]
    proc = subprocess.Popen(script, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        endpoint = f"http://127.0.0.1:{port}"
        with pytest.raises(StorageError, match=rf"s3://{bucket}/shard.tar: cannot read \(endpoint {endpoint}\)"):
            open_store(f"s3://{bucket}", S3Options(endpoint, max_retries=0)).get_bytes("shard.tar")  # cut 1
        assert open_store(f"s3://{bucket}", S3Options(endpoint, max_retries=2)).get_bytes("shard.tar") == payload
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def proxy(s3_server):
    """The S3 endpoint behind a proxy process the test can kill -9 and restart on the same port."""
    port, target = free_port(), int(s3_server.endpoint.rsplit(":", 1)[1])
    script = [sys.executable, str(REPO / "tests" / "fault_proxy.py"), str(port), str(target)]

    class Proxy:
        endpoint = f"http://127.0.0.1:{port}"
        proc: subprocess.Popen | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(script, stdout=subprocess.PIPE, text=True)
            assert self.proc.stdout.readline().strip() == "ready"

        def kill(self) -> None:
            self.proc.kill()
            self.proc.wait()

    p = Proxy()
    p.start()
    yield p
    p.kill()


def upload(s3_server, shards: Path) -> str:
    bucket = s3_server.new_bucket("faults")
    client = s3_server.client()
    for path in shards.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"ds/{path.relative_to(shards)}")
    return f"s3://{bucket}/ds"


def test_s3_endpoint_outages(tmp_path, tiny_shards, reference_losses, s3_server, proxy):
    """The endpoint gone while checkpoints upload, and while shards stream, briefly and then for good: every
    outage is survived or named, and a rerun continues to the uninterrupted run's losses. (The short outage
    and the long one while shards stream were two runs to step 24; they are one run now.)"""
    through = (f"storage.endpoint_url={proxy.endpoint}", "storage.max_retries=2")
    data = upload(s3_server, tiny_shards)
    # a long outage while checkpoints upload (data local): the save fails, named; the previous one is intact
    bucket = s3_server.new_bucket("ckpt")
    run_dir = tmp_path / "upload"
    cmd = train_cmd(tiny_shards, run_dir, STEPS, *through, f"checkpoint.dir=s3://{bucket}/run")
    proc = start_run(cmd, tmp_path / "upload.log")
    wait_for_step(run_dir, proc, 6)
    proxy.kill()
    assert proc.wait(timeout=300) != 0
    log = (tmp_path / "upload.log").read_text()
    assert f"s3://{bucket}/run" in log and "Traceback" not in log, log[-3000:]
    proxy.start()
    finish_and_compare(cmd, run_dir, tmp_path / "upload-again.log", reference_losses, 5)
    # while shards stream: a short outage is survived (retries with backoff) with the losses unchanged, and a
    # long one stops the run naming the shard it could not read
    run_dir = tmp_path / "stream"
    cmd = train_cmd(data, run_dir, STEPS, *through)
    proc = start_run(cmd, tmp_path / "stream.log")
    wait_for_step(run_dir, proc, 3)
    proxy.kill()
    time.sleep(1.5)
    proxy.start()
    wait_for_step(run_dir, proc, 6)
    assert_losses(run_dir, reference_losses, range(1, 6))
    proxy.kill()
    assert proc.wait(timeout=300) != 0
    log = (tmp_path / "stream.log").read_text()
    assert "unreadable after 3 attempts" in log and "Traceback" not in log, log[-3000:]
    proxy.start()
    finish_and_compare(cmd, run_dir, tmp_path / "stream-again.log", reference_losses, 5)


def test_a_stop_signal_ends_a_wait_for_data(tmp_path, tiny_shards, s3_server, proxy):
    """The endpoint gone while shards stream, with retries that would back off for minutes: SIGTERM (as
    `scancel` sends it) ends the wait at once; the run exits 75 (requeue) naming why, no traceback."""
    data = upload(s3_server, tiny_shards)
    through = (f"storage.endpoint_url={proxy.endpoint}", "storage.max_retries=60", "logging.log_interval=1")
    proc = start_run(train_cmd(data, tmp_path / "run", STEPS, *through), tmp_path / "run.log")
    wait_for_step(tmp_path / "run", proc, 3)
    proxy.kill()
    # the ranks are retrying once their buffered rows are used up: no new step for 4 s (a fixed 3 s wait after
    # the kill once caught a loaded run still training on buffered rows: it stopped the ordinary way)
    seen, since = -1, time.monotonic()
    while time.monotonic() - since < 4:
        assert proc.poll() is None and time.monotonic() - since < 120, "the run did not stall without its endpoint"
        step = max(step_losses(tmp_path / "run"), default=0)
        seen, since = (step, time.monotonic()) if step != seen else (seen, since)
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    started = time.monotonic()
    assert proc.wait(timeout=120) == 75
    log = (tmp_path / "run.log").read_text()
    assert time.monotonic() - started < 30, log[-3000:]
    assert log.count("stopped by a signal while waiting for data") == 1 and "Traceback" not in log, log[-3000:]
    proxy.start()


@pytest.fixture
def tmpfs(tmp_path):
    """A small file system of our own (root can mount tmpfs here and in CI): full, then grown, then read-only."""
    mount = tmp_path / "small"
    mount.mkdir()
    # one checkpoint of the tiny run (about 5.6 MB) fits, a second does not
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.decode()}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_and_read_only_output_locations(tmp_path, tiny_shards, reference_losses, tmpfs):
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_shards, run_dir, STEPS, f"checkpoint.dir={tmpfs}/ckpt")
    proc = start_run(cmd, tmp_path / "full.log")
    assert proc.wait(timeout=600) != 0
    log = (tmp_path / "full.log").read_text()
    assert "cannot write the checkpoint of step 10" in log and "step-00000005, is intact" in log, log[-3000:]
    assert "no space left" in log
    assert "Traceback" not in log
    assert (tmpfs / "ckpt" / "LATEST").read_text().strip() == "step-00000005"
    subprocess.run(["mount", "-o", "remount,size=64M", str(tmpfs)], check=True)
    finish_and_compare(cmd, run_dir, tmp_path / "grown.log", reference_losses, 5)
    shutil.copytree(run_dir, tmpfs / "run-copy", ignore=shutil.ignore_patterns("checkpoint-staging", "memory"))
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    # eval of a run on a read-only file system, --out elsewhere: its TensorBoard directory is named at once
    evaluate = ["eval", str(tmpfs / "run-copy"), "--out", str(tmp_path / "e"), "--max-batches", "1"]
    readonly = parcae_refuses(*evaluate, "--loops", "1")
    assert readonly.returncode == 1 and "Traceback" not in readonly.stderr, readonly.stderr[-3000:]
    assert f"TensorBoard: {tmpfs / 'run-copy' / 'tensorboard'}: cannot write" in readonly.stderr
    assert "--tensorboard none" in readonly.stderr and not (tmp_path / "e").exists()
    refused = subprocess.run(
        train_cmd(tiny_shards, tmpfs / "run", 4), capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert refused.returncode == 2 and "run_dir:" in refused.stderr and "Read-only file system" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_corrupt_shard_is_named_once(tmp_path, tiny_shards):
    """The first shard rank 1 reads has a flipped byte: rank 1 names it; rank 0 stops with no error of its own
    (when it meets the lost peer before the launcher stops it, one INFO line says so, gloo's advice left out)."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    seed = load_spec(CONFIGS / "demo-tiny.yaml").spec.training.seed
    loader = ShardLoader(
        str(shards / "train"), rank=1, world_size=2, micro_batch_size=8, seq_len=32, seed=seed, shuffle_buffer=0
    )
    victim = shards / "train" / loader.shards[loader.rank_shards(0)[0]]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    result = subprocess.run(
        train_cmd(shards, tmp_path / "run", STEPS), capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count(f"{victim.name}: corrupt") == 1, result.stderr[-3000:]
    assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "GLHF" not in result.stderr, result.stderr[-3000:]
    said = [line for line in result.stderr.splitlines() if "Connection closed" in line or "another rank" in line]
    assert all("INFO pipeline.cli: stopped: another rank is gone (" in line for line in said), said


def test_corrupt_checkpoint_is_named_with_the_one_to_use(tmp_path, tiny_shards, reference_run, reference_losses):
    """A truncated optimizer partition in the newest checkpoint: `train` and `export` name the file and the
    checkpoint to use instead; resuming from that one gives the uninterrupted run's losses. On a copy of the
    session's reference run (checkpoints 20 and 24; this test trained 12 steps of its own before)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    victim = sorted((run_dir / "checkpoints" / "step-00000024").glob("*optim_states.pt"))[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    cmd = train_cmd(tiny_shards, run_dir, STEPS)
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"{victim.name} is corrupt or truncated" in refused.stderr
    assert "--resume-from step-00000020" in refused.stderr and "Traceback" not in refused.stderr
    export = parcae_in_process("export", str(run_dir / "checkpoints"), "--out", str(tmp_path / "m.safetensors"))
    assert export.returncode == 1 and victim.name in export.stderr and "--tag step-00000020" in export.stderr
    assert not (tmp_path / "m.safetensors").exists()
    finish_and_compare([*cmd, "--resume-from", "step-00000020"], run_dir, tmp_path / "again.log", reference_losses, 20)


def test_eval_of_a_copied_run_reads_and_writes_the_copy(tmp_path, tiny_shards):
    run_dir = tmp_path / "original"
    assert start_run(train_cmd(tiny_shards, run_dir, 5), tmp_path / "train.log").wait(timeout=600) == 0
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(run_dir / "checkpoints")  # the copy must not need the original's files
    result = subprocess.run(
        [*parcae_cmd(), "eval", str(copy), "--loops", "1", "2", "--max-batches", "2"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (copy / "eval" / "step-00000005" / "eval.json").is_file() and not (run_dir / "eval").exists()
    assert "copy/step-00000005" in result.stdout
