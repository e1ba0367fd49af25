"""`parcae submit --dry-run`: the batch script from the spec, with nothing from the spec able to inject shell."""

from __future__ import annotations

import pytest

from tests.conftest import CONFIGS, parcae_in_process


def dry_run(*sets):
    return parcae_in_process("submit", str(CONFIGS / "demo-tiny.yaml"), "--dry-run", *[f"--set={s}" for s in sets])


def test_script_from_the_cluster_section():
    result = dry_run(
        "cluster.nodes=4",
        "cluster.procs_per_node=8",
        "cluster.gpus_per_node=8",
        "cluster.partition=gpu",
        "cluster.account=proj-1",
        "cluster.qos=high",
        "cluster.time_limit='2-00:00:00'",
        "cluster.cpus_per_task=12",
        "cluster.constraint=h100",
        "cluster.signal_seconds=300",
        "cluster.extra_sbatch=['--exclusive']",
        "cluster.setup_lines=['module load cuda/12.4']",
        "run_dir=/scratch/runs/demo",
        "training.micro_batch_size=1",
    )
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in (
        "#SBATCH --job-name=demo-tiny",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-1",
        "#SBATCH --qos=high",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --constraint=h100",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "#SBATCH --output=/scratch/runs/demo/slurm/%j.out",
        "#SBATCH --open-mode=append",
        "module load cuda/12.4",
    ):
        assert line in script.splitlines(), line
    assert script.splitlines()[-1].endswith("-m pipeline slurm-job /scratch/runs/demo")


def test_a_node_range_every_count_of_which_forms_the_global_batch():
    """``cluster.min_nodes``: ``--nodes=min-max``; refused when a node count of the range cannot form the global
    batch; inside the job, an allocation of another size trains on it with the global batch kept."""
    from pipeline.jobs.slurm import allocation_overrides
    from pipeline.jobspec import ClusterSpec

    nodes = ("cluster.nodes=4", "cluster.min_nodes=2", "cluster.procs_per_node=1", "training.micro_batch_size=4")
    ok = dry_run(*nodes, "training.global_batch_size=48", "training.gradient_accumulation_steps=null")
    assert ok.returncode == 0 and "#SBATCH --nodes=2-4" in ok.stdout.splitlines(), ok.stderr
    bad = dry_run(*nodes, "training.global_batch_size=16", "training.gradient_accumulation_steps=null")
    assert bad.returncode == 2, bad.stderr
    assert "cluster.min_nodes: on 3 node(s) the global batch 16 is not a multiple" in bad.stderr
    cluster = ClusterSpec(nodes=4, min_nodes=2)
    assert allocation_overrides(cluster, {"SLURM_JOB_NUM_NODES": "4"}) == []
    assert allocation_overrides(cluster, {"SLURM_JOB_NUM_NODES": "2"}) == [
        "cluster.nodes=2",
        "training.gradient_accumulation_steps=null",
    ]


def test_values_cannot_inject_shell():
    assert "cluster.partition: String should match pattern" in dry_run("cluster.partition='gpu; rm -rf ~'").stderr
    assert (
        "cluster.extra_sbatch.0: String should match pattern"
        in dry_run("cluster.extra_sbatch=['--x\\nrm -rf ~']").stderr
    )
    bad_dir = dry_run("run_dir='/tmp/a b;rm'", "training.micro_batch_size=8")
    assert bad_dir.returncode == 1 and "run_dir: '" in bad_dir.stderr and "cannot carry safely" in bad_dir.stderr


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_prep_submit_renders_an_array_and_its_merge(tmp_path, corpus_jsonl, tokenizer):
    lines = corpus_jsonl.read_text().splitlines()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(3):
        (inputs / f"p{k}.jsonl").write_text("\n".join(lines[k::3]) + "\n")

    def parcae(*args):
        return parcae_in_process("prep", *args)

    out = tmp_path / "out"
    missing = parcae("submit", str(out), "--tasks", "2", "--dry-run")
    assert missing.returncode != 0 and "no plan here" in missing.stderr and "Traceback" not in missing.stderr
    assert parcae("plan", "--input", str(inputs), "--tokenizer", str(tokenizer), "--out", str(out)).returncode == 0
    endpoint = "http://127.0.0.1:9"
    result = parcae("submit", str(out), "--tasks", "8", "--workers", "3", "--partition", "cpu", "--time", "4:00:00",
                    "--setup-line", "module load python", "--endpoint-url", endpoint, "--dry-run")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "the plan has 3 units; submitting 3 tasks" in result.stderr
    array, merge = result.stdout.split("#!/bin/bash")[1:]
    expected = ("#SBATCH --array=0-2", "#SBATCH --cpus-per-task=3", "#SBATCH --partition=cpu",
                "#SBATCH --time=4:00:00", "module load python", "%A_%a.out")  # fmt: skip
    for line in expected:
        assert line in array, line
    assert f'prep run {out} --task "$SLURM_ARRAY_TASK_ID" --tasks 3 --workers 3 --endpoint-url {endpoint}' in array
    assert "--array" not in merge and f"prep merge {out} --endpoint-url {endpoint}" in merge
    bad = parcae("submit", str(out), "--tasks", "2", "--time", "soon", "--dry-run")
    assert bad.returncode == 2 and "--time soon:" in bad.stderr
