"""`parcae eval --tasks core core-extended`: the same scores on 1 and 2 ranks and run to run, the table, JSON,
PNG and TensorBoard (read back with TensorBoard's reader), and bad input named without a traceback."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from model import ParcaeConfig, build_model, save_reference
from tests.conftest import REPO, parcae_cmd, parcae_in_process, parcae_refuses
from tests.icl_bundles import make_bundle, train_on_tasks
from tests.pipeline.jobs.test_eval import event_scalars

CFG = ParcaeConfig(vocab_size=512, d_model=64, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=64)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*parcae_cmd(), *args], capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_downstream_eval_is_identical_on_one_and_two_ranks(tmp_path, tokenizer):
    bundle = make_bundle(tmp_path / "eval_bundle")
    model, _ = train_on_tasks(build_model(CFG, seed=5), bundle, tokenizer, steps=25)  # part-way: near ties
    weights = save_reference(model, tmp_path / "w.safetensors")
    args = ["eval", str(weights), "--tasks", "core", "core-extended", "--bundle", str(bundle)]
    args += ["--tokenizer", str(tokenizer), "--loops", "1", "2", "4", "--seeds", "1234", "99", "--batch-tokens", "300"]
    two = run(*args, "--procs", "2", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    one = parcae_in_process(*args, "--out", str(tmp_path / "one"), "--tensorboard", "none")  # one process
    assert one.returncode == 0, one.stderr
    again = parcae_in_process(*args, "--out", str(tmp_path / "again"), "--tensorboard", "none")
    reports = [json.loads((tmp_path / d / "downstream.json").read_text()) for d in ("two", "one", "again")]
    assert reports[0]["ranks"] == 2 and reports[1]["ranks"] == 1
    assert reports[0]["results"] == reports[1]["results"] == reports[2]["results"]
    assert again.stdout.replace("again", "one") == one.stdout
    results = reports[0]["results"]
    assert [r["loops"] for r in results] == [1, 2, 4]
    assert all({"core", "core_std", "core_extended", "core_extended_std"} <= r.keys() for r in results)
    assert set(results[0]["tasks"]) == {"colors", "pets", "counting", "counting_long"}
    assert reports[0]["aggregates"]["core"] == ["colors", "pets", "counting"]
    # the table: every task and both aggregates at every loop count, printed once (by rank 0)
    out = two.stdout
    assert out.count("T=1") == 1 and "CORE" in out and "Core-Extended" in out and "counting_long" in out
    assert "Traceback" not in two.stderr
    assert (tmp_path / "two" / "downstream.png").stat().st_size > 1000
    scalars, images = event_scalars(tmp_path / "two" / "tensorboard")
    assert scalars["downstream/core_loops_2"] == [(0, pytest.approx(results[1]["core"], rel=1e-6))]
    assert scalars["downstream/centered/colors_loops_4"][0][1] == pytest.approx(
        results[2]["tasks"]["colors"]["centered"], rel=1e-6
    )
    assert [s for s, _ in scalars["downstream_curve_step_0/core_vs_loops"]] == [1, 2, 4]
    assert "downstream/core_vs_loops" in images


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_downstream_eval_names_what_is_wrong(tmp_path, tokenizer):
    weights = save_reference(build_model(CFG, seed=5), tmp_path / "w.safetensors")
    no_bundle = parcae_refuses("eval", str(weights), "--tasks", "core")
    assert no_bundle.returncode == 2 and "--tasks core: needs --bundle" in no_bundle.stderr
    bundle = make_bundle(tmp_path / "eval_bundle")
    (bundle / "eval_data" / "symbolic" / "counting.jsonl").unlink()
    tokenized = ("--tokenizer", str(tokenizer))
    missing = parcae_refuses("eval", str(weights), "--tasks", "core", "--bundle", str(bundle), *tokenized)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "eval_data/symbolic/counting.jsonl: no such file in the bundle" in missing.stderr
    no_tokenizer = parcae_refuses("eval", str(weights), "--tasks", "core", "--bundle", str(bundle))
    assert no_tokenizer.returncode == 1 and "pass --tokenizer" in no_tokenizer.stderr, no_tokenizer.stderr
    assert not Path(tmp_path / "w-eval" / "downstream.json").exists()
