"""A real two-node Slurm cluster (slurm/local_cluster.sh: munge, slurmctld, two slurmd on 127.0.0.1):
submit the demo spec as a 2-node job training with ZeRO-3 over gloo from the local S3 endpoint; send the
warning signal, see it checkpoint, requeue and finish with the losses of an uninterrupted run; refuse
impossible requests before submitting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.shards import ShardSettings, build_shards
from data_prep.storage import S3Options
from tests.conftest import CONFIGS, REPO, parcae_in_process, step_losses, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.xdist_group("slurm")]  # one cluster per run
SCRIPT = REPO / "slurm" / "local_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    can_install = os.geteuid() == 0 and shutil.which("apt-get")
    if not shutil.which("slurmctld") and not can_install:
        if os.environ.get("CI") == "true":
            pytest.fail("Slurm is not installed and cannot be installed here (needs root and apt-get)")
        pytest.skip("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    started = subprocess.run(["bash", str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        message = f"local Slurm cluster did not start: {started.stderr[-2000:]}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    conf = str(state / "etc" / "slurm.conf")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield state
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def s3_shards(s3_server, corpus_jsonl, tokenizer):
    bucket = s3_server.new_bucket("slurm")
    build_shards(
        [str(corpus_jsonl)],
        str(tokenizer),
        f"s3://{bucket}/ds",
        ShardSettings(seq_len=32, shard_bytes=40_000, val_fraction=0.05),
        workers=0,
        options=S3Options(s3_server.endpoint),
    )
    return f"s3://{bucket}/ds", s3_server.endpoint


def overrides(shards, run_dir: Path, steps: int) -> list[str]:
    url, endpoint = shards
    return tiny_run(url, run_dir, steps, cluster__nodes=2, cluster__procs_per_node=1, storage__endpoint_url=endpoint)


def parcae(*args):
    return parcae_in_process(*args)


def submit(shards, run_dir: Path, steps: int) -> str:
    result = parcae("submit", str(CONFIGS / "demo-tiny.yaml"), *overrides(shards, run_dir, steps))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()[-1]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job, "--oneliner"], capture_output=True, text=True).stdout
    fields = dict(x.split("=", 1) for x in out.split() if "=" in x)
    return fields.get("JobState", "GONE")


def wait_state(job: str, states: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state in states:
            return state
        time.sleep(0.5)
    detail = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    nodes = subprocess.run(["sinfo"], capture_output=True, text=True).stdout
    raise AssertionError(f"job {job} still {job_state(job)} after {timeout} s\n{detail}\n{nodes}")


@pytest.fixture(scope="module")
def uninterrupted(slurm, s3_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("slurm-run") / "run"
    job = submit(s3_shards, run_dir, 24)
    state = wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    log = (run_dir / "slurm" / f"{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    return run_dir, job, log


def test_two_node_job_trains_from_s3_and_logs(uninterrupted):
    run_dir, job, log = uninterrupted
    assert "ZeRO stage 3, fp32, world size 2" in log and "training finished: 24 steps" in log
    assert sorted(step_losses(run_dir)) == list(range(1, 25))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    status = parcae("status", str(run_dir))
    assert status.returncode == 0
    assert f"job {job}: COMPLETED" in status.stdout and "checkpoint: step-00000024" in status.stdout


def test_warning_signal_checkpoints_requeues_and_resumes_exactly_on_fewer_nodes(uninterrupted, s3_shards, tmp_path):
    """The warning signal: checkpoint, requeue; the requeued job gets 1 node instead of 2 (as a user resubmitting
    with other --nodes, or a --nodes=min-max range, would): it trains on 1 rank accumulating 2 micro batches,
    the checkpoint rewritten for it, to the uninterrupted 2-node run's losses. (This test also covers the
    requeue onto the same node count: every step of it but the rewrite.)"""
    expected = step_losses(uninterrupted[0])
    run_dir = tmp_path / "run"
    job = submit(s3_shards, run_dir, 24)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= 7):
        assert time.monotonic() < deadline and job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_state(job, {"PENDING"}, timeout=120)  # requeued by the job's wrapper
    stopped_at = int((run_dir / "checkpoints" / "LATEST").read_text().strip().split("-")[1])
    assert stopped_at >= 7
    # Slurm holds a requeued job for about two minutes before it is eligible again. The test shortens that to
    # 15 s: slurmd refuses to relaunch a job id it has just killed ("Job N already killed, do not launch batch
    # job"), so an immediate restart fails.
    subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"], check=True)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+15"], check=True)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    log = (run_dir / "slurm" / f"{job}.out").read_text()
    assert "preempted: requeueing" in log and f"resuming at step {stopped_at}" in log
    assert "the job has 1 node(s), the spec names 2" in log and "world size 2 -> 1" in log, log[-3000:]
    after = step_losses(run_dir)
    for step in range(stopped_at + 1, 25):
        assert after[step] == expected[step], (step, after[step], expected[step])
    status = parcae("status", str(run_dir)).stdout
    assert f"segment 1: from step 0 on 2 rank(s), 2 node(s), job {job} (restart 0)" in status, status
    assert f"segment 2: from step {stopped_at} on 1 rank(s), 1 node(s), job {job} (restart 1)" in status, status


GPU = "training.device=cuda"
ONE_CPU = "cluster.cpus_per_task=1"  # the local nodes have 2 CPUs; a GPU spec asks 4 per rank by default


@pytest.mark.parametrize(
    "settings, message, code",
    [
        (["cluster.nodes=3"], "cluster.nodes: 3 requested, but the default partition ('debug') has 2 node(s)", 1),
        (["cluster.partition=gpu"], "cluster.partition: 'gpu' does not exist on this cluster (partitions: debug)", 1),
        (["cluster.time_limit='1 day'"], "cluster.time_limit: String should match pattern", 2),
        ([GPU, ONE_CPU, "cluster.gpus_per_node=4"], "cluster.gpus_per_node: 1 node(s) with 4 GPU(s) per node "
         "requested, but the default partition ('debug') has 0 such node(s) (2 node(s) with GRES gpu:2)", 1),
        ([GPU, ONE_CPU, "cluster.gpu_type=a100"], "cluster.gpu_type: 1 node(s) with 1 a100 GPU(s) per node", 1),
        ([GPU], "cluster.cpus_per_task: 4 x procs_per_node 1 = 4 CPUs per node requested, but the nodes of the "
         "default partition ('debug') have at most 2", 1),
    ],
    ids=["nodes", "partition", "time", "gpus", "gpu-type", "cpus"],
)  # fmt: skip
def test_impossible_requests_are_refused_before_submission(slurm, tmp_path, settings, message, code):
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    result = parcae(
        "submit",
        str(CONFIGS / "demo-tiny.yaml"),
        f"--set=run_dir={tmp_path / 'r'}",
        "--set=cluster.procs_per_node=1",
        *[f"--set={setting}" for setting in settings],
    )
    assert result.returncode == code and message in result.stderr and "Traceback" not in result.stderr
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "r" / "slurm" / "jobs.txt").exists()


@pytest.mark.parametrize("request_kind", ["gpus-per-node", "gres"])
def test_a_gpu_job_gets_its_gpus_from_slurm_and_refuses_to_train_without_cuda(slurm, s3_shards, tmp_path, request_kind):
    """The local cluster's fake GRES: Slurm allocates one GPU per rank and says so in the job's environment;
    this machine's torch has no CUDA, so the job stops at its start, naming what it was given."""
    run_dir = tmp_path / "run"
    settings = [*overrides(s3_shards, run_dir, 4), f"--set={GPU}", f"--set={ONE_CPU}"]
    result = parcae("submit", str(CONFIGS / "demo-tiny.yaml"), *settings, f"--set=cluster.gpu_request={request_kind}")
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.split()[-1]
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    assert ("#SBATCH --gres=gpu:1" if request_kind == "gres" else "#SBATCH --gpus-per-node=1") in script
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"
    log = (run_dir / "slurm" / f"{job}.out").read_text()
    assert "training.device: cuda, but this process sees no GPU" in log, log[-3000:]
    assert "CUDA_VISIBLE_DEVICES=0;" in log and f"Slurm job {job}: SLURM_GPUS_ON_NODE=1" in log
    assert "Traceback" not in log and not (run_dir / "metrics.jsonl").exists()


def test_cancel(slurm, s3_shards, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(s3_shards, run_dir, 100000)
    wait_state(job, {"RUNNING"}, timeout=120)
    result = parcae("cancel", str(run_dir))
    assert result.returncode == 0 and f"cancelled job {job}" in result.stdout
    assert wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120) == "CANCELLED"
    # what the job wrapper asks before it requeues a failed step: a cancel that reached srun before the
    # wrapper (srun: "Slurm job N has expired", exit 1) was requeued once, undoing the cancel
    from pipeline.jobs.slurm import _cancelled

    assert _cancelled(job)
    missing = parcae("status", str(tmp_path / "elsewhere"))
    assert missing.returncode == 1 and "no Slurm job was submitted" in missing.stderr


def test_killed_job_wrapper_takes_the_ranks_with_it(slurm, s3_shards, tmp_path):
    """kill -9 of `parcae slurm-job` (the ranks' launcher under Slurm): no rank is left training."""
    run_dir = tmp_path / "run"
    job = submit(s3_shards, run_dir, 100000)
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= 3):
        assert time.monotonic() < deadline and job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    spec = str(run_dir / "spec.yaml")

    def pids(pattern: str) -> list[str]:
        return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()

    assert len(pids(f"pipeline train {spec}")) >= 2
    for pid in pids(f"pipeline slurm-job {run_dir}"):
        os.kill(int(pid), 9)
    deadline = time.monotonic() + 120
    while pids(f"pipeline train {spec}"):
        assert time.monotonic() < deadline, "ranks outlived their launcher"
        time.sleep(0.5)
    subprocess.run(["scancel", job], capture_output=True)


def test_sweep_runs_as_one_job_array(slurm, s3_shards, tmp_path):
    """Two points of a learning-rate grid as one job array (a task per point, one node each)."""
    directory = tmp_path / "sweep"
    args = [a for a in overrides(s3_shards, tmp_path / "unused", 8) if "run_dir" not in a and "nodes" not in a]
    result = parcae(
        "sweep", "run", str(CONFIGS / "demo-tiny.yaml"), *args,
        "--set=cluster.nodes=1", "--set=cluster.procs_per_node=1",
        "--grid", "optimizer.lr=1e-3,3e-3", "--dir", str(directory), "--submit",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    job = result.stdout.split()[-1]
    assert "#SBATCH --output=" in (directory / "slurm" / "job.sbatch").read_text()
    for task in (0, 1):
        state = wait_state(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
        log = directory / "slurm" / f"{job}_{task}.out"
        assert state == "COMPLETED", log.read_text()[-3000:] if log.exists() else state
    for name in ("lr1e-3", "lr3e-3"):
        assert sorted(step_losses(directory / name)) == list(range(1, 9)), name
    summary = parcae("sweep", "summary", str(directory))
    assert summary.returncode == 0, summary.stderr
    assert "lr1e-3" not in summary.stderr and "1e-3" in summary.stdout and "3e-3" in summary.stdout


def test_prep_job_array_matches_one_machine_after_a_killed_task(slurm, s3_server, corpus_jsonl, tokenizer, tmp_path):
    """8 units into the S3 endpoint: one machine (`prep run`, then merge) against a 4-task job array on the
    two nodes submitted after a task died half-way through a unit; the array redoes that unit, the merge job
    runs after it, and every shard and manifest is the same byte for byte."""
    from tests.data_prep.test_units import crash_after

    inputs = tmp_path / "in"
    inputs.mkdir()
    lines = corpus_jsonl.read_text().splitlines()
    for k in range(8):
        (inputs / f"part{k}.jsonl").write_text("\n".join(lines[k::8]) + "\n")
    bucket = s3_server.new_bucket("prep-array")
    endpoint = ["--endpoint-url", s3_server.endpoint]
    settings = ["--tokenizer", str(tokenizer), "--seq-len", "32", "--shard-size", "20000", "--val-fraction", "0.05"]
    for name in ("one", "many"):
        made = parcae("prep", "plan", "--input", str(inputs), "--out", f"s3://{bucket}/{name}", *settings, *endpoint)
        assert made.returncode == 0 and "8 units" in made.stdout, made.stderr
    assert parcae("prep", "run", f"s3://{bucket}/one", "--workers", "1", *endpoint).returncode == 0
    assert parcae("prep", "merge", f"s3://{bucket}/one", *endpoint).returncode == 0
    os.environ["AWS_ENDPOINT_URL"] = s3_server.endpoint  # for the crashing task, which reads the environment
    try:
        died = crash_after(f"s3://{bucket}/many", shards=2, task=1, tasks=4)  # units 1 and 5: dies inside unit 1
    finally:
        os.environ.pop("AWS_ENDPOINT_URL")
    assert died.returncode == -9, died.stderr[-2000:]
    logs = tmp_path / "logs"
    submitted = parcae("prep", "submit", f"s3://{bucket}/many", "--tasks", "4", "--workers", "1", "--log-dir",
                       str(logs), *endpoint)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    array, merge_job = submitted.stdout.split()[-2:]
    state = wait_state(merge_job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    task_logs = "\n".join(p.read_text() for p in sorted(logs.glob(f"{array}_*.out")))
    assert state == "COMPLETED", task_logs[-3000:] + "".join(p.read_text() for p in logs.glob("merge-*.out"))
    assert "prep task 1: unit u00001 (" in task_logs and "prep task 3: unit u00007 (" in task_logs
    client = s3_server.client()

    def objects(prefix: str) -> dict[str, bytes]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        out = {}
        for key in keys:
            rel = key[len(prefix) :]
            if rel.startswith(("train/", "val/")):
                out[rel] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return out

    one, many = objects("one/"), objects("many/")
    assert sum(k.endswith(".tar") for k in one) > 16 and one.keys() == many.keys()
    for key in one:
        if key.endswith("manifest.json"):
            a, b = json.loads(one[key]), json.loads(many[key])
            assert {k: v for k, v in a.items() if k != "command"} == {k: v for k, v in b.items() if k != "command"}
        else:
            assert one[key] == many[key], key
    status = parcae("prep", "status", f"s3://{bucket}/many", *endpoint)
    assert status.returncode == 0 and "8 of 8 units done" in status.stdout and "merged" in status.stdout
