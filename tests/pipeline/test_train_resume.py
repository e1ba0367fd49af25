"""`parcae train` on 2 CPU ranks (ZeRO-3, gloo): a SIGKILLed run resumes to the same per-step losses as an
uninterrupted one; SIGUSR1 checkpoints and exits with the requeue code; the next start resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.shards import ShardSettings, build_shards
from pipeline.train import REQUEUE_EXIT_CODE
from tests.conftest import CONFIGS, REPO, parcae_cmd

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus_jsonl, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("train-shards")
    settings = ShardSettings(seq_len=32, shard_bytes=40_000, val_fraction=0.05)
    build_shards([str(corpus_jsonl)], str(tokenizer), str(out), settings, workers=0)
    return out


def train_cmd(shards: Path, run_dir: Path, steps: int) -> list[str]:
    overrides = [
        f"data.train_url={shards / 'train'}",
        f"data.val_url={shards / 'val'}",
        "data.seq_len=32",
        f"run_dir={run_dir}",
        f"training.total_steps={steps}",
        "checkpoint.interval_steps=5",
        "eval.interval_steps=10",
        "eval.loop_counts=[1, 4]",
        "logging.log_interval=5",
        "data.num_workers=1",
    ]
    return [*parcae_cmd(), "train", str(CONFIGS / "demo-tiny.yaml"), *[f"--set={o}" for o in overrides]]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]  # the last occurrence wins (a resumed run rewrites steps)
    return out


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_killed_run_resumes_to_the_same_losses(tmp_path, shards):
    steps = 24
    reference = start(train_cmd(shards, tmp_path / "reference", steps), tmp_path / "reference.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = losses(tmp_path / "reference")
    assert sorted(expected) == list(range(1, steps + 1))
    assert expected[steps] < expected[1] - 0.5  # it learns

    run_dir = tmp_path / "killed"
    proc = start(train_cmd(shards, run_dir, steps), tmp_path / "killed.log")
    wait_for_step(run_dir, proc, 12)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step-00000010"
    resumed = start(train_cmd(shards, run_dir, steps), tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resuming at step 10" in (tmp_path / "resumed.log").read_text()
    after = losses(run_dir)
    for step in range(11, steps + 1):
        assert after[step] == expected[step], (step, after[step], expected[step])
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == ["step-00000020", "step-00000024"]  # keep_last 2


def test_sigusr1_checkpoints_exits_for_requeue_and_resumes(tmp_path, shards):
    run_dir = tmp_path / "preempted"
    proc = start(train_cmd(shards, run_dir, 200), tmp_path / "first.log")
    wait_for_step(run_dir, proc, 3)
    os.kill(proc.pid, signal.SIGUSR1)  # what Slurm's --signal=B:USR1 sends to the batch step
    assert proc.wait(timeout=300) == REQUEUE_EXIT_CODE, (tmp_path / "first.log").read_text()[-3000:]
    stopped_at = max(losses(run_dir))
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step-{stopped_at:08d}"
    again = start(train_cmd(shards, run_dir, 200), tmp_path / "second.log")
    wait_for_step(run_dir, again, stopped_at + 1)
    os.killpg(again.pid, signal.SIGKILL)
    again.wait(timeout=60)
    assert f"resuming at step {stopped_at}" in (tmp_path / "second.log").read_text()
