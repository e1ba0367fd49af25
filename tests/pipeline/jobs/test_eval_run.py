"""On a real (tiny, 2-rank ZeRO-3) training run: `parcae eval` of the run directory reads its sharded
checkpoint and writes into the run's TensorBoard; `parcae tb` serves the run's logs, local and from the
S3 endpoint, through a real TensorBoard server whose HTTP API returns the logged scalars."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, free_port, parcae_cmd, parcae_in_process, tiny_run
from tests.pipeline.jobs.test_eval import event_scalars

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("eval-run")
    intervals = {"checkpoint__interval_steps": 6, "eval__interval_steps": 6, "logging__log_interval": 3}
    # a secret in the spec (an endpoint nothing reads: the shards are local) that TensorBoard must not show
    secret = {"storage__endpoint_url": "http://ci:${PARCAE_TEST_SECRET_KEY}@127.0.0.1:9"}
    overrides = tiny_run(tiny_shards, root / "run", 12, eval__loop_counts="[1, 2, 4]", **intervals, **secret)
    cmd = [*parcae_cmd(), "train", str(CONFIGS / "demo-tiny.yaml"), *overrides]
    os.environ["PARCAE_TEST_SECRET_KEY"] = "hunter2-not-for-tensorboard"  # every later command reads the spec
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    yield root / "run"
    os.environ.pop("PARCAE_TEST_SECRET_KEY", None)


def test_eval_of_a_run_directory(trained_run):
    args = ["eval", str(trained_run), "--loops", "1", "2", "4", "8", "--max-batches", "4"]
    first = parcae_in_process(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((trained_run / "eval" / "step-00000012" / "eval.json").read_text())
    assert report["step"] == 12 and report["data"].endswith("val") and report["fit"] is not None
    again = parcae_in_process(*args, "--out", str(trained_run / "again"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((trained_run / "again" / "eval.json").read_text())["results"] == report["results"]
    scalars, images = event_scalars(trained_run / "tensorboard")
    assert "loss/train" in scalars and "scaling/val_loss_T4" in scalars  # the run's own events, and ours beside
    assert (12, pytest.approx(report["results"][2]["loss"], rel=1e-6)) in scalars["eval/loss_loops_4"]
    assert "eval/loss_vs_loops" in images
    # the trainer's own periodic validation at 3 loop counts: the fitted L_inf and the plot, at steps 6 and 12
    assert [step for step, _ in scalars["scaling/fit_l_inf"]] == [6, 12] and "scaling/loss_vs_loops" in images
    # the consolidated checkpoint is the exported model (whose losses test_train_resume checks against the run's)
    exported = trained_run / "exported.safetensors"
    done = parcae_in_process("export", str(trained_run / "checkpoints"), "--out", str(exported))
    assert done.returncode == 0
    data = ["--data", report["data"], "--out", str(trained_run / "from-file"), "--tensorboard", "none"]
    from_file = parcae_in_process("eval", str(exported), *args[2:], *data)
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    assert json.loads((trained_run / "from-file" / "eval.json").read_text())["results"] == report["results"]


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _serve(args: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ}
    return subprocess.Popen(
        [*parcae_cmd(), "tb", *args, "--port", str(port), "--sync-interval", "1"],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # as a background job of a non-interactive shell starts it: SIGINT ignored (it must stop anyway)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )


def _scalars_over_http(port: int, run_prefix: str, tag: str, deadline: float) -> list:
    """The scalars of ``tag`` of the run named ``run_prefix`` (or a run under it, NAME/SUB)."""
    base = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            tags = _get(f"{base}/data/plugin/scalars/tags")
            runs = [r for r in tags if (r == run_prefix or r.startswith(run_prefix + "/")) and tag in tags[r]]
            if runs:
                query = urllib.parse.urlencode({"run": runs[0], "tag": tag})
                return _get(f"{base}/data/plugin/scalars/scalars?{query}")
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no {tag} for {run_prefix} from TensorBoard on port {port}")


def check_dashboards(base: str) -> None:
    """The custom-scalars layout (charts by purpose, each over the right tags) and the run's spec as text,
    through TensorBoard's own HTTP API."""
    layout = _get(f"{base}/data/plugin/custom_scalars/layout")
    categories = [c["title"] for c in layout["category"]]
    assert categories[:3] == ["loss", "test-time scaling", "loop health"], categories
    charts = {chart["title"]: chart["multiline"]["tag"] for c in layout["category"] for chart in c["chart"]}
    assert charts["validation loss at each loop count T, and the fitted L_inf"] == [
        r"scaling/val_loss_T\d+$",
        r"scaling/fit_l_inf$",
    ]
    assert charts["spectral radius of A_bar (stable below 1)"] == ["loops/spectral_radius$", "loops/stability_limit$"]
    run = next(r for r in _get(f"{base}/data/plugin/text/tags") if r.startswith("demo-tiny"))
    query = urllib.parse.urlencode({"run": run, "tag": "run/spec/text_summary"})  # torch's add_text suffix
    spec_text = _get(f"{base}/data/plugin/text/text?{query}")[0]["text"]
    assert "mean_recurrence" in spec_text and "http://ci:${PARCAE_TEST_SECRET_KEY}@127.0.0.1:9" in spec_text
    assert "hunter2" not in spec_text
    query = urllib.parse.urlencode({"run": run, "tag": "run/deepspeed_config/text_summary"})
    assert "zero_optimization" in _get(f"{base}/data/plugin/text/text?{query}")[0]["text"]


def test_tensorboard_serves_a_run_locally_and_from_s3(trained_run, tmp_path, s3_server):
    local = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in local if "loss" in r}
    bucket = s3_server.new_bucket("tblogs")
    client = s3_server.client()
    for path in (trained_run / "tensorboard").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"runs/demo/{path.relative_to(trained_run / 'tensorboard')}")
    port = free_port()
    env_url = s3_server.endpoint
    proc = _serve(
        [str(trained_run), f"s3://{bucket}/runs/demo", "--endpoint-url", env_url, "--cache", str(tmp_path / "cache")],
        port,
        tmp_path / "tb.log",
    )
    try:
        deadline = time.monotonic() + 90
        served = _scalars_over_http(port, "demo-tiny", "loss/train", deadline)  # labelled by the spec's name
        assert "demo-tiny" in _get(f"http://127.0.0.1:{port}/data/runs")  # the name itself, not "demo-tiny/."
        assert {int(step): value for _, step, value in served} == pytest.approx(losses, rel=1e-6)
        from_s3 = _scalars_over_http(port, "demo", "loss/train", deadline)
        assert {int(step): value for _, step, value in from_s3} == pytest.approx(losses, rel=1e-6)
        assert f"http://127.0.0.1:{port}" in (tmp_path / "tb.log").read_text()
        check_dashboards(f"http://127.0.0.1:{port}")
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    log = (tmp_path / "tb.log").read_text()
    assert code == 0 and "TensorBoard stopped" in log
    assert "INFO tensorboard" not in log and log.count(f"http://127.0.0.1:{port}") == 1  # quiet, the URL once
    assert "werkzeug" not in log and "GET /data" not in log, log[-2000:]  # no request lines without -v


def test_the_dashboards_render_in_a_browser(trained_run, tmp_path, chromium):
    """Headless chromium opens TensorBoard's custom-scalars page: the charts by purpose are on it (checked
    through the rendered page, shadow DOM included); the screenshot is left in the test's folder for people."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = _serve([str(trained_run)], port, tmp_path / "tb.log")
    try:
        _scalars_over_http(port, "demo-tiny", "loss/train", time.monotonic() + 60)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/#custom_scalars")
            for title in ("test-time scaling", "loop health", "spectral radius of A_bar (stable below 1)"):
                page.get_by_text(title, exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(2_000)  # the charts draw their lines
            page.screenshot(path=str(tmp_path / "custom_scalars.png"), full_page=True)
            browser.close()
        assert (tmp_path / "custom_scalars.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def test_tb_refuses_what_it_cannot_serve(tmp_path, s3_server):
    missing = subprocess.run([*parcae_cmd(), "tb", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode != 0 and "nothing: no such directory" in missing.stderr
    bucket = s3_server.new_bucket("empty-logs")
    empty = subprocess.run(
        [*parcae_cmd(), "tb", f"s3://{bucket}/x", "--endpoint-url", s3_server.endpoint, "--cache", str(tmp_path / "c")],
        capture_output=True,
        text=True,
    )
    assert empty.returncode != 0 and "no TensorBoard event files" in empty.stderr


def test_paper_protocol_of_a_run_directory(trained_run, tmp_path):
    """The reference's evaluation: held-out documents one per row, like-init h0 over seeds, the spread."""
    args = ["eval", str(trained_run), "--loops", "1", "2", "4", "--protocol", "paper", "--documents", "40"]
    result = parcae_in_process(*args, "--h0-seeds", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["protocol"]["name"] == "paper" and "40 documents" in report["protocol"]["rows"]
    assert report["rows"] == 40 and "protocol paper" in result.stdout and "± over h0 seeds" in result.stdout
    for row in report["results"]:
        assert len(set(row["loss_per_seed"])) == 3 and row["loss_std"] > 0
        assert abs(sum(row["loss_per_seed"]) / 3 - row["loss"]) < 1e-9
    parcae_in_process(*args, "--h0-seeds", "3", "--out", str(tmp_path / "b"))
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["results"] == report["results"]  # seeded
