"""The fixed-depth GPT baseline trains through `parcae train` like the looped model (it takes no loop counts:
its forward refuses them), validates, checkpoints, and generates from its run directory."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import CONFIGS, REPO, parcae_cmd, parcae_in_process, step_losses, tiny_run

pytestmark = pytest.mark.slow


def test_the_gpt_baseline_trains_validates_and_generates(tmp_path, tiny_shards, tokenizer):
    spec = yaml.safe_load((CONFIGS / "demo-tiny.yaml").read_text())
    spec["model"] = {"arch": "gpt", "vocab_size": 2048, "d_model": 64, "n_head": 2, "n_layers": 2, "max_seq_len": 128}
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump({**spec, "name": "gpt-tiny"}))
    run_dir = tmp_path / "run"
    overrides = tiny_run(tiny_shards, run_dir, 6, cluster__procs_per_node=1, eval__interval_steps=6)
    done = subprocess.run(
        [*parcae_cmd(), "train", str(path), *overrides, f"--set=tokenizer.path={tokenizer}"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    losses = step_losses(run_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 10 for v in losses.values())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "tokens_per_s" in r]
    assert train and all("loops_mean" not in r for r in train)  # no loop counts are sampled
    assert any(any(k.startswith("val") for k in r) for r in records), records[-1]
    generated = parcae_in_process("generate", str(run_dir), "--prompt", "The", "--max-new-tokens", "4", "--json")
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert json.loads(generated.stdout)["loops"] is None
