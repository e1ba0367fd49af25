"""`parcae check-gpu --tiny`: the GPU acceptance command's whole code path on CPU (the tiny shape, fp32 matmul
peak, no compile), so that the command a user first runs on a GPU node cannot rot here. What only a GPU runs
(the CUDA environment lines, the bf16 matmul peak, compile, cuda synchronisation) is in `environment`,
`matmul_peak` and `_sync` of pipeline/jobs/acceptance.py."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, parcae_cmd, parcae_refuses

pytestmark = pytest.mark.slow


def test_check_gpu_tiny_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([*parcae_cmd(), "check-gpu", "--tiny", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checks: all passed" in done.stdout
    report = json.loads((out / "report.json").read_text())
    env = report["environment"]
    assert env["torch"] and env["deepspeed"] and "ninja" in env["jit_compile"]
    assert set(env["ops_used"]) >= {"fused_adam (optimizer adamw on GPU)", "cpu_adam (zero.offload_optimizer)"}
    t = report["training"]
    assert t["steps"] == 8 and t["loss_finite"] and t["loss_last"] < t["loss_first"]
    assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and t["hfu"] >= t["mfu"]
    assert t["loss_after_resume"] == t["loss_before_resume"]  # on CPU a resume continues bit for bit
    assert 0 < t["bf16_fp32_mean_abs_diff"] < 0.1
    for shape in ("demo-tiny", "demo-tiny d=128"):
        memory = t["memory"][shape]
        assert memory["planned_gib"] > 0 and memory["measured_gib"] > 0, memory
    assert [row["loops"] for row in report["generation"]] == [1, 4, 8]
    assert all(row["cached_tokens_per_s"] > 0 and row["uncached_tokens_per_s"] > 0 for row in report["generation"])
    assert set(report["core"]) == {"T=1", "T=4", "T=8"}
    assert all(report["checks"].values()) and len(report["checks"]) == 4
    table = (out / "report.md").read_text()
    for row in ("| matmul peak (measured) |", "| MFU / HFU", "peak memory", "| generation T=8:", "| CORE, sample"):
        assert row in table
    # the user's mistakes: a GPU check where there is no GPU, an --out that already holds something
    no_gpu = parcae_refuses("check-gpu", "--out", str(tmp_path / "gpu"))
    assert "sees no GPU" in no_gpu.stderr and "--tiny" in no_gpu.stderr
    assert "Traceback" not in no_gpu.stderr
    again = parcae_refuses("check-gpu", "--tiny", "--out", str(out))
    assert "not empty" in again.stderr
    assert json.loads((out / "report.json").read_text()) == report  # nothing already written is lost
