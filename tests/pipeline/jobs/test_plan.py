"""`parcae plan`: the compute-optimal recurrence and tokens follow the stated power laws exactly, the
refit recovers exponents from a sweep summary, and nonsense inputs are refused by name."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from model.config import paper_flops_per_token as flops_per_token
from parcae_errors import ParcaeError
from pipeline.jobs.plan import plan, refit
from pipeline.jobspec import load_spec
from tests.conftest import CONFIGS, REPO, parcae_cmd

SPEC = load_spec(CONFIGS / "parcae-140m.yaml").spec


@pytest.mark.parametrize("budget", [1e18, 3.7e19, 1e21])
def test_doubling_compute_follows_the_power_laws(budget):
    one, two = plan(SPEC, budget), plan(SPEC, 2 * budget)
    assert two["mean_recurrence"] / one["mean_recurrence"] == pytest.approx(2**0.40, rel=1e-12)
    assert two["tokens"] / one["tokens"] == pytest.approx(2**0.78, rel=1e-12)
    custom = plan(SPEC, 2 * budget, loops_exponent=0.5, tokens_exponent=0.5)
    assert custom["mean_recurrence"] / plan(SPEC, budget, loops_exponent=0.5)["mean_recurrence"] == pytest.approx(
        math.sqrt(2), rel=1e-12
    )


def test_the_spec_is_the_default_anchor_and_the_plan_is_costed():
    tokens = SPEC.total_steps * SPEC.tokens_per_step
    cfg = SPEC.model.build()
    own = flops_per_token(cfg, SPEC.data.seq_len) * tokens
    at_anchor = plan(SPEC, own)
    assert at_anchor["mean_recurrence"] == pytest.approx(cfg.mean_recurrence)
    assert at_anchor["tokens"] == pytest.approx(tokens)
    assert at_anchor["steps"] == SPEC.total_steps and at_anchor["plan_flops_over_budget"] == pytest.approx(1.0)
    anchored = plan(SPEC, 8e20, anchor=(1e20, 4.0, 2e9))
    assert anchored["mean_recurrence"] == pytest.approx(4 * 8**0.40)
    assert anchored["tokens"] == pytest.approx(2e9 * 8**0.78)
    r = anchored["mean_recurrence_rounded"]
    expected = (
        flops_per_token(cfg, SPEC.data.seq_len, r, (r + 1) // 2)  # the reference's sweeps' backprop depth
        * anchored["steps"]
        * (SPEC.tokens_per_step)
    )
    assert anchored["plan_flops"] == pytest.approx(expected)
    hours = anchored["plan_flops"] / (SPEC.world_size * anchored["peak_flops_per_device"] * 0.4) / 3600
    assert anchored["wall_clock_hours"] == pytest.approx(hours)


def test_refit_recovers_exponents_from_a_sweep_summary(tmp_path):
    runs = []
    for i, compute in enumerate([1e17, 1e18, 1e19]):
        best_r, best_d = 3.0 * (compute / 1e17) ** 0.35, 1e8 * (compute / 1e17) ** 0.7
        for j, factor in enumerate([0.5, 1.0, 2.0]):  # an isoFLOP group: the middle run is the optimum
            runs.append(
                {
                    "name": f"c{i}-r{j}",
                    "flops": compute * (1 + 0.01 * j),
                    "mean_recurrence": best_r * factor,
                    "tokens": best_d / factor,
                    "final_val_loss": 3.0 + abs(math.log(factor)),
                    "diverged": False,
                }
            )
    (tmp_path / "summary.json").write_text(json.dumps({"runs": runs}))
    fits = refit(tmp_path)["fits"]
    assert fits["mean_recurrence"]["exponent"] == pytest.approx(0.35, abs=0.01)
    assert fits["tokens"]["exponent"] == pytest.approx(0.7, abs=0.01)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "summary.json").write_text(json.dumps({"runs": runs[:3]}))
    with pytest.raises(ParcaeError, match=">= 2 compute budgets"):
        refit(tmp_path / "one")


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_nonsense_is_refused_by_name():
    spec = str(CONFIGS / "parcae-140m.yaml")
    cases = {
        ("--flops=-1e20",): "--flops: must be a positive",
        ("--flops", "nan"): "--flops: must be a positive",
        ("--flops", "1e20", "--gpu-hours", "10"): "exactly one of --flops",
        (): "exactly one of --flops",
        ("--gpu-hours", "10", "--mfu", "1.5"): "--mfu",
        ("--flops", "1e20", "--anchor-flops", "1e19"): "go together",
        ("--flops", "1e20", "--loops-exponent", "0"): "--loops-exponent",
        ("--flops", "1e20", "--from-sweep", "/nonexistent"): "no sweep summary",
    }
    for args, needle in cases.items():
        done = subprocess.run([*parcae_cmd(), "plan", spec, *args], capture_output=True, text=True, cwd=REPO)
        assert done.returncode != 0 and needle in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    gpt = subprocess.run(
        [*parcae_cmd(), "plan", str(CONFIGS / "gpt-140m.yaml"), "--flops", "1e20"], capture_output=True, text=True
    )
    assert gpt.returncode != 0 and "model.arch: gpt" in gpt.stderr


def test_cli_prints_the_plan_and_json():
    spec = str(CONFIGS / "parcae-140m.yaml")
    done = subprocess.run([*parcae_cmd(), "plan", spec, "--gpu-hours", "100", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["budget_flops"] == pytest.approx(100 * 3600 * 989e12 * 0.4)
    text = subprocess.run([*parcae_cmd(), "plan", spec, "--flops", "1e20"], capture_output=True, text=True).stdout
    assert "mean recurrence" in text and "--set model.mean_recurrence=" in text


def test_isoflop_points_spend_the_budget(tmp_path):
    from pipeline.jobs.plan import isoflop_points

    budget = 3e18
    points = isoflop_points(SPEC, budget, [2, 4, 8, 16])
    cfg = SPEC.model.build()
    for point in points:
        r, depth, steps = (
            point["model.mean_recurrence"],
            point["model.mean_backprop_depth"],
            point["training.total_steps"],
        )
        spent = flops_per_token(cfg, SPEC.data.seq_len, r, depth) * steps * SPEC.tokens_per_step
        one_step = flops_per_token(cfg, SPEC.data.seq_len, r, depth) * SPEC.tokens_per_step
        assert abs(spent - budget) <= one_step / 2 and depth == (r + 1) // 2
    assert [p["training.total_steps"] for p in points] == sorted(
        (p["training.total_steps"] for p in points), reverse=True
    )
    done = subprocess.run(
        [*parcae_cmd(), "plan", str(CONFIGS / "parcae-140m.yaml"), "--flops", "3e18", "--isoflop", "2,4"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    import yaml

    assert [p["model.mean_recurrence"] for p in yaml.safe_load(done.stdout)] == [2, 4]
    cmd = [*parcae_cmd(), "plan", str(CONFIGS / "parcae-140m.yaml"), "--isoflop", "2,x", "--flops", "1e18"]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode != 0 and "--isoflop" in bad.stderr
