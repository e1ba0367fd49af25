"""The README's demo, end to end (tokenizer, shards on a real local S3 endpoint, ZeRO-3 training on 2 CPU
ranks, evaluation at several loop counts), and the TensorBoard events it leaves, read back with
TensorBoard's own EventAccumulator."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from pipeline.training.distributed import cpu_threads_per_rank
from tests.conftest import REPO, parcae_cmd

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.heavy]


def test_demo_trains_and_logs(tmp_path):
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a user runs it (conftest sets it)
    result = subprocess.run(
        [*parcae_cmd(), "demo", "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    threads = cpu_threads_per_rank(2)  # the demo's 2 ranks split this machine's cores
    assert f"CPU: {threads} intra-op thread(s) per rank" in out + result.stderr
    assert "shm_comm" not in out + result.stderr  # DeepSpeed's inference-only CPU op is neither built nor loaded
    rows = next(line for line in out.splitlines() if "packing bos-aligned:" in line).split(":")[1].split()
    assert rows[0] == rows[2]  # "N of N rows": every training row starts at a document
    for marker in (
        "[1/4] tokenizer",
        "[2/4] shards",
        "rows start a document with <bos>, as CORE prompts and samples do",
        "[3/4] training",
        "[4/4] results",
        "8 loops:",
        "parcae tb ",
    ):
        assert marker in out
    records = [json.loads(line) for line in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 300 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "loss/train",
        "loss/val",  # at the mean recurrence, 4
        "optim/lr",
        "optim/grad_norm",
        "throughput/tokens_per_s",
        "throughput/data_wait_s",
        "loops/spectral_radius",
        "loops/stability_limit",
        "loops/a_bar_mean",
        "loops/h_norm_L01",
        "loops/h_change_L01",
        "scaling/val_loss_T1",
        "scaling/val_loss_T8",
    ):
        assert tag in tags, tag
    assert len(events.Scalars("loss/train")) == 300
    assert [e.value for e in events.Scalars("loss/val")] == [e.value for e in events.Scalars("scaling/val_loss_T4")]
    assert all(0 < e.value < 1 for e in events.Scalars("loops/spectral_radius"))
    assert "loops/sampled" in events.Tags()["histograms"]

    # The README's follow-up commands work after the demo (its S3 endpoint is gone), from another directory,
    # and on a moved copy of the run: the run names its files by absolute paths, keeps its tokenizer and
    # finds its own checkpoints, TensorBoard and eval/ outputs where it is now.
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    (workdir / "run").rename(moved)
    assert (moved / "tokenizer" / "demo.model").is_file()
    evaluated = subprocess.run(
        [*parcae_cmd(), "eval", str(moved), "--loops", "1", "4", "--max-batches", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]
    assert (moved / "eval" / "step-00000300" / "eval.json").is_file()
    generated = subprocess.run(
        [*parcae_cmd(), "generate", str(moved), "--prompt", "The history of", "--max-new-tokens", "8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert generated.returncode == 0, generated.stdout[-2000:] + generated.stderr[-2000:]
    assert f"tokenizer {moved / 'tokenizer' / 'demo.model'}" in generated.stdout + generated.stderr
