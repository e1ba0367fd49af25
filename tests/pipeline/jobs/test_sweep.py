"""`parcae sweep`: grids expand into validated, named runs; a local sweep trains each point, skips
finished ones when run again, records failures and goes on; the summary names divergence and fits curves;
TensorBoard's HParams plugin compares the points."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from parcae_errors import ParcaeError
from pipeline.jobs.sweep import expand, parse_grid
from tests.conftest import CONFIGS, REPO, free_port, parcae_cmd, parcae_in_process
from tests.pipeline.jobs.test_eval_run import _serve


def parcae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*parcae_cmd(), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_grid_product_and_points_get_distinct_names():
    grid = parse_grid(["optimizer.lr=1e-3,0.01", "model.injection=diagonal,add,concat"])
    points = expand(grid, [])
    assert len(points) == 6 and points[0] == {"name": "lr1e-3_injection-diagonal", "values": grid_values(grid, 0, 0)}
    assert len({p["name"] for p in points}) == 6
    iso = expand([], [{"name": "small", "model.d_model": 64}, {"name": "big", "model.d_model": 128}])
    assert [p["name"] for p in iso] == ["small", "big"] and iso[1]["values"] == {"model.d_model": 128}
    both = expand(parse_grid(["optimizer.lr=0.1,0.2"]), [{"name": "a", "model.n_core": 1}])
    assert [p["name"] for p in both] == ["lr0.1_a", "lr0.2_a"]
    for bad, needle in (("lr", "KEY=V1,V2"), ("a.b=1,1", "repeated")):
        with pytest.raises(ParcaeError, match=needle):
            parse_grid([bad])
    with pytest.raises(ParcaeError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])


def grid_values(grid, *index):
    return {key: values[i] for (key, values), i in zip(grid, index, strict=True)}


def test_every_invalid_point_is_reported_before_anything_runs(tmp_path):
    result = parcae(
        "sweep", "run", str(CONFIGS / "demo-tiny.yaml"), "--grid", "optimizer.lr=1e-3,-1",
        "--grid", "model.mean_backprop_depth=2,9", "--dir", str(tmp_path / "s"),
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "3 of 4 sweep points are invalid" in result.stderr
    assert "point lr-1_mean-backprop-depth9" in result.stderr and "optimizer.lr" in result.stderr
    assert "model.mean_backprop_depth: must be <= model.mean_recurrence" in result.stderr
    assert not (tmp_path / "s").exists()  # nothing written


@pytest.mark.slow
def test_local_sweep_trains_skips_finished_points_and_summarises(tmp_path, tiny_shards):
    shards = tiny_shards
    directory = tmp_path / "sweep"
    common = [
        f"--set=data.train_url={shards / 'train'}", f"--set=data.val_url={shards / 'val'}", "--set=data.seq_len=32",
        "--set=cluster.procs_per_node=1", "--set=training.total_steps=6", "--set=logging.log_interval=3",
        "--set=eval.interval_steps=6", "--set=eval.loop_counts=[1, 2, 4]", "--set=eval.max_batches=2",
        "--set=tokenizer.path=null",  # the shards' own (demo-tiny names the demo's)
    ]  # fmt: skip
    # lr 1e-3 trains; lr 1e3 makes the loss blow up (the run stops itself once losses are non-finite, or ends high)
    args = ["sweep", "run", str(CONFIGS / "demo-tiny.yaml"), *common, "--grid", "optimizer.lr=1e-3,1e3"]
    first = parcae(*args, "--dir", str(directory))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "[1/2] lr1e-3: training" in first.stdout
    record = json.loads((directory / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == ["lr1e-3", "lr1e3"]
    again = parcae(*args, "--dir", str(directory))
    assert "lr1e-3: finished before, skipped" in again.stdout
    summary = parcae_in_process("sweep", "summary", str(directory))
    assert summary.returncode == 0, summary.stderr
    runs = {r["name"]: r for r in json.loads((directory / "summary.json").read_text())["runs"]}
    good, bad = runs["lr1e-3"], runs["lr1e3"]
    assert not good["diverged"] and good["steps"] == 6 and good["final_val_loss"] is not None
    assert good["curve"]["loops"] == [1, 2, 4] and good["curve"]["fit"] is not None
    assert 0 < good["max_spectral_radius"] < 1 and good["flops"] > 0 and good["mean_recurrence"] == 4
    assert bad["diverged"] and bad["diverged_because"], bad
    for png in ("curves.png", "training.png"):
        assert (directory / png).read_bytes()[:4] == b"\x89PNG"
    missing = parcae_in_process("sweep", "summary", str(tmp_path))
    assert missing.returncode != 0 and "not a sweep directory" in missing.stderr
    check_hparams(directory, tmp_path)


def check_hparams(directory, tmp_path) -> None:
    """`parcae tb` over the sweep directory: TensorBoard's HParams plugin compares the points by their
    hyperparameters and final metrics."""
    port = free_port()
    proc = _serve([str(directory)], port, tmp_path / "tb.log")
    query = {"experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
             "colParams": [], "startIndex": 0, "sliceSize": 10}  # fmt: skip
    try:
        deadline, groups = time.monotonic() + 60, []
        while len(groups) < 2 and time.monotonic() < deadline:
            try:
                groups = _post(f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups", query)["sessionGroups"]
            except OSError:
                time.sleep(0.5)
        lrs = sorted(g["hparams"]["optimizer.lr"] for g in groups)
        assert lrs == [1e-3, 1e3], groups
        good = next(g for g in groups if g["hparams"]["optimizer.lr"] == 1e-3)
        metrics = {m["name"]["tag"]: m["value"] for m in good["metricValues"]}
        assert 0 < metrics["hparams/val_loss"] < 10 and 0 < metrics["hparams/max_spectral_radius"] < 1, metrics
        assert good["hparams"]["model.injection"] == "diagonal" and good["hparams"]["model.mean_recurrence"] == 4
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
