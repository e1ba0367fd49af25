"""`parcae train` resumed on another world size (ZeRO-3, gloo): a run stopped on 2 ranks goes on as 1 rank
accumulating 2 micro batches (the same global batch), and back on 2 ranks, to the per-step losses of the
uninterrupted 2-rank run: the ZeRO-3 checkpoint is rewritten for the new ranks (AdamW's moments, Muon's
per-matrix state), and the data and depth draws follow the rows' positions, not the ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from parcae_errors import REQUEUE_EXIT_CODE
from tests.conftest import (
    REFERENCE_STEPS,
    parcae_cmd,
    parcae_in_process,
    start_run,
    step_losses,
    train_cmd,
    wait_for_step,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

ONE_RANK = ["cluster.procs_per_node=1", "training.gradient_accumulation_steps=2"]
# The reduction order differs (1 rank accumulates two micro batches, 2 ranks average over the group). Measured
# here (CPU, gloo, fp32): the losses are bit-identical, AdamW and Muon (a sum of two terms is exact in either
# order); the bound leaves room for other reduction trees, not for a wrong row or draw (the loss of one
# step's rows differs from the next step's by 1e-2 and more).
TOLERANCE = 1e-6


def stop_with_sigusr1(cmd: list[str], run_dir: Path, log: Path, after: int) -> int:
    """Start a run, let it pass step ``after``, ask it to checkpoint and exit for a requeue; its last step."""
    proc = start_run(cmd, log)
    wait_for_step(run_dir, proc, after)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == REQUEUE_EXIT_CODE, log.read_text()[-3000:]
    stopped = max(step_losses(run_dir))
    assert f"checkpoint written at step {stopped};" in log.read_text()
    return stopped


def run_to_end(cmd: list[str], log: Path) -> str:
    proc = start_run(cmd, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def assert_same_losses(run_dir: Path, expected: dict[int, float], after: int, last: int) -> None:
    got = step_losses(run_dir)
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in range(after + 1, last + 1))
    print(f"worst relative loss difference after step {after}: {worst:.2e}")
    assert worst < TOLERANCE, {s: (got[s], expected[s]) for s in range(after + 1, last + 1)}


def test_two_ranks_to_one_and_back(tmp_path, tiny_shards, reference_losses):
    """AdamW, one source: 2 ranks stopped by SIGUSR1, 1 rank (accumulation 2) to the end, then 2 ranks again
    from the 1-rank run's checkpoint at step 20."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(tiny_shards, run_dir, REFERENCE_STEPS)
    stopped = stop_with_sigusr1(cmd, run_dir, tmp_path / "two.log", after=4)
    log = run_to_end([*cmd, *(f"--set={o}" for o in ONE_RANK)], tmp_path / "one.log")
    assert "world size 2 -> 1, micro batch 8 -> 8, accumulation 1 -> 2, global batch 16 kept" in log, log[-3000:]
    assert f"resuming at step {stopped}" in log and f"step-{stopped:08d}: rewritten from 2 rank(s) for 1" in log
    assert_same_losses(run_dir, reference_losses, stopped, REFERENCE_STEPS)
    log = run_to_end([*cmd, "--resume-from", "step-00000020"], tmp_path / "again.log")
    assert "world size 1 -> 2" in log and "resuming at step 20" in log, log[-3000:]
    assert_same_losses(run_dir, reference_losses, 20, REFERENCE_STEPS)
    assert (run_dir / "checkpoints" / "step-00000020" / "world-2").is_dir()


def test_a_batch_that_cannot_be_kept_is_refused_with_the_sizes_that_can(tmp_path, tiny_shards, reference_run):
    """Refused by rank 0 before the engine is built: a global batch the new world size changes, and any change
    under training.on_world_size_change: refuse. On a copy of the session's reference run (2 ranks, newest
    checkpoint at step 24; this test trained 5 steps of its own before), continued to step 28."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    longer = train_cmd(tiny_shards, run_dir, REFERENCE_STEPS + 4)
    # `parcae validate` says what a resume would change, and refuses what `train` refuses
    validate = ["validate" if a == "train" else a for a in longer[len(parcae_cmd()) :]]
    said = parcae_in_process(*validate, *(f"--set={o}" for o in ONE_RANK))
    assert said.returncode == 0, said.stderr
    assert "step-00000024: world size 2 -> 1, micro batch 8 -> 8, accumulation 1 -> 2" in said.stdout, said.stdout
    said = parcae_in_process(*validate, "--set=cluster.procs_per_node=1")
    assert said.returncode == 2 and "training.global_batch_size=16" in said.stderr, said.stderr
    proc = start_run([*longer, "--set=cluster.procs_per_node=1"], tmp_path / "batch.log")
    assert proc.wait(timeout=300) == 2, (tmp_path / "batch.log").read_text()[-3000:]
    log = (tmp_path / "batch.log").read_text()
    assert "global batch of 16 rows, this run's is 8" in log and "training.global_batch_size=16" in log, log[-2000:]
    assert "micro_batch_size 16 x accumulation 1, micro_batch_size 8 x accumulation 2" in log
    assert "Traceback" not in log
    refuse = [*longer, *(f"--set={o}" for o in ONE_RANK), "--set=training.on_world_size_change=refuse"]
    proc = start_run(refuse, tmp_path / "refuse.log")
    assert proc.wait(timeout=300) == 2
    assert "resume on 2 rank(s), or set training.on_world_size_change: convert" in (tmp_path / "refuse.log").read_text()


@pytest.fixture(scope="module")
def muon_mixture(tmp_path_factory, tiny_shards, builtin_docs, tokenizer, s3_server):
    """Two sources on S3 (the tiny shards, and other documents), the checkpoints there too."""
    from data_prep.shards import ShardSettings, build_shards

    root = tmp_path_factory.mktemp("resize-mixture")
    (root / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_docs[2000:3500]))
    settings = ShardSettings(seq_len=32, shard_bytes=40_000, val_fraction=0.0)
    build_shards([str(root / "code.jsonl")], str(tokenizer), str(root / "code"), settings, workers=0)
    bucket = s3_server.new_bucket("resize")
    client = s3_server.client()
    for name, local in (("web", tiny_shards), ("code", root / "code")):
        for path in (local / "train").iterdir():
            client.upload_file(str(path), bucket, f"{name}/train/{path.name}")
    mix = [{"name": n, "url": f"s3://{bucket}/{n}/train", "weight": w} for n, w in (("web", 3), ("code", 1))]
    return bucket, mix


def test_muon_and_a_mixture_on_s3_resume_on_one_rank(tmp_path, muon_mixture, s3_server):
    bucket, mix = muon_mixture
    extra = [
        "data.train_url=null",
        "data.val_url=null",
        f"data.sources={json.dumps(mix)}",
        f"storage.endpoint_url={s3_server.endpoint}",
        "optimizer.name=muon",
        "optimizer.lr=0.02",
        "optimizer.adam_lr=0.003",
        "checkpoint.staging_dir=STAGING",
    ]
    steps = 12

    def cmd(name: str, *more: str) -> list[str]:
        settings = [o.replace("STAGING", str(tmp_path / name / "staging")) for o in extra]
        settings.append(f"checkpoint.dir=s3://{bucket}/{name}/checkpoints")
        return train_cmd("unused", tmp_path / name, steps, *settings, *more)

    run_to_end(cmd("ref"), tmp_path / "ref.log")
    expected = step_losses(tmp_path / "ref")
    stopped = stop_with_sigusr1(cmd("run"), tmp_path / "run", tmp_path / "two.log", after=3)
    log = run_to_end(cmd("run", *ONE_RANK), tmp_path / "one.log")
    assert "world size 2 -> 1" in log and f"resuming at step {stopped}" in log, log[-3000:]
    assert_same_losses(tmp_path / "run", expected, stopped, steps)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    last = [[r for r in run if "data/web/tokens" in r][-1] for run in (records, reference)]
    tokens = [{k: v for k, v in r.items() if k.endswith("/tokens")} for r in last]
    assert tokens[0]["data/code/tokens"] > 0 and tokens[0] == tokens[1]  # every source gave the same rows
    assert f"step-{stopped:08d}: rewritten from 2 rank(s) for 1" in log
    # and back on 2 ranks from the 1-rank run's checkpoint at step 10: its rewritten copy is kept on S3
    log = run_to_end([*cmd("run"), "--resume-from", "step-00000010"], tmp_path / "again.log")
    assert "world size 1 -> 2" in log and "step-00000010: rewritten from 1 rank(s) for 2" in log, log[-3000:]
    assert_same_losses(tmp_path / "run", expected, 10, steps)
    client = s3_server.client()
    names = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/")["Contents"]]
    assert any("step-00000010/world-2/step-00000010/zero_pp_rank_1_" in n for n in names), names
