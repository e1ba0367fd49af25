"""`parcae train` on a mixture of two S3 sources (one concat-packed, one bos-aligned), 2 CPU ranks: a
SIGKILLed run resumes to the uninterrupted run's per-step losses; shares, tokens and per-source validation
are logged; a changed mixture is refused on resume."""

from __future__ import annotations

import json
import os
import signal

import pytest

from data_prep.shards import ShardSettings, build_shards
from tests.conftest import start_run, step_losses, train_cmd, wait_for_step

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_shards, builtin_docs, tokenizer, s3_server):
    """web: the tiny shards (concat); code: other documents, bos-aligned; both with validation, on S3."""
    root = tmp_path_factory.mktemp("mixture")
    (root / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_docs[2000:3500]))
    settings = ShardSettings(seq_len=32, shard_bytes=40_000, val_fraction=0.05, packing="bos-aligned")
    build_shards([str(root / "code.jsonl")], str(tokenizer), str(root / "code"), settings, workers=0)
    bucket = s3_server.new_bucket("mixture")
    client = s3_server.client()
    for name, local in (("web", tiny_shards), ("code", root / "code")):
        for path in local.rglob("*"):
            if path.is_file() and path.parent.name in ("train", "val"):
                client.upload_file(str(path), bucket, f"{name}/{path.parent.name}/{path.name}")
    return f"s3://{bucket}"


def mixture_cmd(sources, s3_server, run_dir, *extra, weights=(3, 1)):
    mix = [
        {"name": name, "url": f"{sources}/{name}/train", "weight": w, "val_url": f"{sources}/{name}/val"}
        for name, w in zip(("web", "code"), weights, strict=True)
    ]
    return train_cmd(
        "unused",
        run_dir,
        STEPS,
        "data.train_url=null",
        "data.val_url=null",
        f"data.sources={json.dumps(mix)}",
        f"storage.endpoint_url={s3_server.endpoint}",
        *extra,
    )


def test_killed_mixture_run_resumes_to_the_same_losses(tmp_path, sources, s3_server):
    reference = start_run(mixture_cmd(sources, s3_server, tmp_path / "ref"), tmp_path / "ref.log")
    assert reference.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    expected = step_losses(tmp_path / "ref")
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    shares = [r for r in records if "data/web/share" in r]
    assert shares and all(abs(r["data/web/share"] - 0.75) < 0.02 for r in shares)
    last = shares[-1]
    rows = STEPS * 16  # the tiny spec: 2 ranks x micro 8
    assert last["data/web/tokens"] + last["data/code/tokens"] == rows * 32
    assert last["data/web/tokens"] == rows * 3 // 4 * 32
    validation = [r for r in records if "val/code/loss_T4" in r]
    assert validation and {"val/web/loss_T1", "val/web/loss_T4", "val_loss_loops_4"} <= set(validation[-1])
    v = validation[-1]  # the headline: the sources' losses weighted as the mixture weighs them
    assert v["val_loss_loops_4"] == pytest.approx(0.75 * v["val/web/loss_T4"] + 0.25 * v["val/code/loss_T4"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ref" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"data/web/share", "data/code/tokens", "data/code/epochs", "val/code/loss_T4", "loss/val"} <= tags
    assert events.Scalars("data/code/tokens")[-1].value == last["data/code/tokens"]

    run_dir = tmp_path / "killed"
    proc = start_run(mixture_cmd(sources, s3_server, run_dir), tmp_path / "killed.log")
    wait_for_step(run_dir, proc, 12)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step-00000010"
    # another mixture on resume: refused by default, naming what changed
    changed = start_run(mixture_cmd(sources, s3_server, run_dir, weights=(1, 1)), tmp_path / "changed.log")
    assert changed.wait(timeout=300) != 0
    log = (tmp_path / "changed.log").read_text()
    assert "web.weight 3.0 -> 1.0" in log and "data.on_mixture_change: apply" in log and "Traceback" not in log
    resumed = start_run(mixture_cmd(sources, s3_server, run_dir), tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resuming at step 10" in (tmp_path / "resumed.log").read_text()
    after = step_losses(run_dir)
    for step in range(11, STEPS + 1):
        assert after[step] == expected[step], (step, after[step], expected[step])
