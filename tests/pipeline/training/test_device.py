"""training.device: a GPU spec requests one GPU per rank and refuses to start where it sees none, naming what it
saw (torch's build, CUDA_VISIBLE_DEVICES, the Slurm allocation) and what to set; every shipped GPU config
renders a batch script that asks for GPUs."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.jobs.slurm import render
from pipeline.jobspec import load_spec
from pipeline.jobspec.schema import GPU_CPUS_PER_TASK
from pipeline.training.device import device_problems
from tests.conftest import CONFIGS, REPO, parcae_cmd

SLURM = {"SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}


def test_what_a_gpu_spec_needs_from_the_machine():
    assert device_problems("auto", 8, {}, 0) == [] and device_problems("cpu", 8, {}, 0) == []
    (none,) = device_problems("cuda", 2, SLURM, 0)
    assert "training.device: cuda, but this process sees no GPU" in none
    assert "CUDA_VISIBLE_DEVICES=0,1" in none and "Slurm job 42: SLURM_GPUS_ON_NODE=2" in none
    assert "training.device: cpu" in none  # the way out
    (ungiven,) = device_problems("cuda", 2, {"SLURM_JOB_ID": "7"}, 0)
    assert "Slurm job 7: no GPUs allocated" in ungiven
    (forced,) = device_problems("cuda", 2, {"DS_ACCELERATOR": "cpu"}, 2)
    assert "DS_ACCELERATOR=cpu" in forced
    (short,) = device_problems("cuda", 8, SLURM, 2)
    assert "cluster.procs_per_node: 8 ranks per node need one GPU each, but 2 are visible" in short
    assert device_problems("cuda", 2, SLURM, 2) == []


def test_gpu_specs_request_one_gpu_per_rank():
    spec = load_spec(CONFIGS / "demo-tiny.yaml", ["training.device=cuda", "cluster.procs_per_node=4"]).spec
    assert spec.cluster.gpus_per_node == 4 and spec.cluster.cpus_per_task == GPU_CPUS_PER_TASK
    with pytest.raises(Exception, match="cluster.gpus_per_node: fewer GPUs than ranks per node"):
        load_spec(CONFIGS / "demo-tiny.yaml", ["training.device=cuda", "cluster.gpus_per_node=1"])
    with pytest.raises(Exception, match="GPUs requested for a run that trains on CPUs"):
        load_spec(CONFIGS / "demo-tiny.yaml", ["training.device=cpu", "cluster.gpus_per_node=1"])
    typed = load_spec(CONFIGS / "demo-tiny.yaml", ["training.device=cuda", "cluster.gpu_type=a100",
                                                   "cluster.gpu_request=gres"])  # fmt: skip
    assert "#SBATCH --gres=gpu:a100:2\n" in render(typed, REPO / "runs" / "x")


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "demo-tiny.yaml"))
def test_every_shipped_gpu_config_asks_for_its_gpus(config):
    loaded = load_spec(CONFIGS / config)
    cluster = loaded.spec.cluster
    assert loaded.spec.training.device == "cuda"
    script = render(loaded, REPO / "runs" / "x")
    assert f"#SBATCH --gpus-per-node={cluster.procs_per_node}\n" in script
    assert f"#SBATCH --ntasks-per-node={cluster.procs_per_node}\n" in script and "--cpus-per-task=" in script


def test_a_gpu_spec_is_refused_on_this_machine(tmp_path):
    one = ["--set=cluster.nodes=1", "--set=cluster.procs_per_node=1", "--set=training.micro_batch_size=256"]
    cmd = [*parcae_cmd(), "train", str(CONFIGS / "parcae-140m.yaml"), f"--set=run_dir={tmp_path / 'r'}", *one]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "training.device: cuda, but this process sees no GPU" in done.stderr
    assert not (tmp_path / "r").exists()  # nothing written
