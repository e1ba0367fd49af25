"""The entry point as a user runs it: a fresh interpreter, real files, exit codes and messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, parcae_cmd


def run(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*parcae_cmd(), *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_validate_prints_a_resolved_summary():
    result = run("validate", str(CONFIGS / "parcae-140m.yaml"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "valid" in out
    assert "144.3M" in out and "tokens_per_step  524288" in out
    assert "world_size       8" in out and "flops_per_token" in out


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_validate_json_summary():
    result = run(
        "validate",
        str(CONFIGS / "demo-tiny.yaml"),
        "--json",
        "--set",
        "training.seed=3",
        "--set",
        "tokenizer.path=null",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["tokens_per_step"] == 16 * 64 and summary["total_steps"] == 300


def test_invalid_spec_exits_2_with_every_problem_and_no_traceback(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "name: t\nmodel: {injection: diag, mean_recurence: 3}\ndata: {train_url: x}\n"
        "training: {micro_batch_size: 4, global_batch_size: 6, gradient_accumulation_steps: 1, total_steps: 5}\n"
    )
    result = run("validate", str(spec))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{spec}: invalid job spec (3 problems)" in result.stderr
    assert "model.injection: Input should be 'diagonal', 'add' or 'concat' (got 'diag')" in result.stderr
    assert "model.mean_recurence: unknown key (did you mean 'model.mean_recurrence'?)" in result.stderr
    assert "training.global_batch_size: inconsistent: 4 x 1 x 1 = 4" in result.stderr


def test_bad_override_exits_2():
    result = run("validate", str(CONFIGS / "demo-tiny.yaml"), "--set", "training.micro_batch_sise=4")
    assert result.returncode == 2
    assert "training.micro_batch_sise: unknown key (did you mean 'training.micro_batch_size'?)" in result.stderr


def test_missing_file_exits_2(tmp_path):
    result = run("validate", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "cannot read the spec file" in result.stderr
    assert "Traceback" not in result.stderr


def test_schema_is_json_schema_of_the_spec():
    result = run("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "JobSpec"
    assert {"model", "data", "training", "zero", "cluster"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("command", [[], ["validate"], ["schema"], ["demo"]])
def test_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0 and "usage: parcae" in result.stdout


def test_installed_console_script_matches_module():
    exe = Path(sys.executable).parent / "parcae"
    assert exe.is_file(), "the parcae console script is installed by `make setup`"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "validate" in result.stdout


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_version_flags_anywhere_and_argument_ranges(tmp_path, tiny_shards):
    """--version; -v after the command as before it; loop counts beyond the spec's cap (1024) and shard
    indices beyond the set are refused as argument errors (exit 2), not taken or clamped."""
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("parcae ")
    after = run("validate", str(CONFIGS / "demo-tiny.yaml"), "-v")
    assert after.returncode in (0, 2) and " DEBUG " in after.stderr
    loops = run("eval", str(tmp_path), "--loops", "1", "5000")
    assert loops.returncode == 2 and "'5000': expected a loop count from 1 to 1024" in loops.stderr
    train = str(tiny_shards / "train")
    shard = run("prep", "inspect", train, "--shard", "999", "--samples", "1")
    assert shard.returncode == 2 and "--shard 999: " in shard.stderr and "holds shards 0 to" in shard.stderr
    samples = run("prep", "inspect", train, "--samples", "-1")
    assert samples.returncode == 2 and "expected an integer >= 0" in samples.stderr


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_validate_refuses_a_local_path_that_train_would_refuse(tmp_path):
    """A local path that is not there is a problem for validate as for train (exit 2, the absolute path it
    looked at, the rule for relative paths), not "not checked": only s3:// may be out of reach from here."""
    spec = tmp_path / "spec.yaml"
    spec.write_text((CONFIGS / "demo-tiny.yaml").read_text())
    result = subprocess.run(
        [*parcae_cmd(), "validate", str(spec), "--set", "tokenizer.path=tok/none.model"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"tokenizer.path: {tmp_path}/tok/none.model: cannot read" in result.stderr
    assert f"starts from the directory the command runs in, here {tmp_path}" in result.stderr
    assert "cannot train (1 problem)" in result.stderr  # the S3 shards, out of reach here, are not problems
