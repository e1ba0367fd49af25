"""`parcae eval`: loss, perplexity and bits per byte at test-time loop counts from saved weights or a run's
checkpoint; reproducible, with the fitted curve, a PNG and TensorBoard events read back by TensorBoard."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from data_prep.tokenizer import EOS_ID, load_tokenizer
from model import ParcaeConfig, build_model, save_reference
from model.weights import reference_state_dict
from pipeline.evaluation.token_bytes import TokenBytes
from tests.conftest import parcae_in_process, parcae_refuses

CFG = ParcaeConfig(vocab_size=512, d_model=64, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=64)


@pytest.fixture(scope="module")
def val_shards(tiny_shards) -> Path:
    return tiny_shards / "val"


def run(*args: str) -> subprocess.CompletedProcess:
    return parcae_in_process(*args)


def event_scalars(directory: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return scalars, tags["images"]


def test_bytes_per_token_add_up_to_the_text(tokenizer, builtin_docs):
    counter = TokenBytes(str(tokenizer), 512)
    sp = load_tokenizer(tokenizer)
    for text in builtin_docs[:50] + ["  two leading spaces", "tab\there", "ünïcödé → ✓"]:
        ids = sp.encode(text)
        row = np.array([[EOS_ID, *ids, EOS_ID]])  # a document as packed: after the previous one's <eos>
        assert counter.count(row) == len(text.encode("utf-8")), text


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_eval_of_saved_weights_is_reproducible_and_consistent(tmp_path, val_shards):
    weights = save_reference(build_model(CFG, seed=1), tmp_path / "w.safetensors")
    args = ["eval", str(weights), "--data", str(val_shards), "--loops", "1", "2", "4", "8", "--max-batches", "3"]
    first = run(*args, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    assert "bits/byte" in first.stdout and "fit L(T)" in first.stdout
    second = run(*args, "--out", str(tmp_path / "b"), "--tensorboard", "none")
    assert second.returncode == 0, second.stderr
    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    b = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert a["results"] == b["results"] and a["fit"] == b["fit"]  # h0 = 0, fixed rows: bit for bit
    assert [r["loops"] for r in a["results"]] == [1, 2, 4, 8]
    assert a["rows"] == 24 and a["tokens"] == 24 * 32
    for r in a["results"]:
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * a["tokens"] / a["bytes"], rel=1e-12)
    assert (tmp_path / "a" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    scalars, images = event_scalars(tmp_path / "a" / "tensorboard")
    assert scalars["eval/loss_loops_4"] == [(0, pytest.approx(a["results"][2]["loss"], rel=1e-6))]
    assert [s for s, _ in scalars["eval_curve_step_0/loss_vs_loops"]] == [1, 2, 4, 8]
    assert "eval/fit_l_inf" in scalars and images == ["eval/loss_vs_loops"]
    assert not (tmp_path / "b" / "tensorboard").exists()


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_reference_weights_need_the_spec(tmp_path, val_shards):
    model = build_model(CFG, seed=2)
    save_file({k: v.contiguous() for k, v in reference_state_dict(model).items()}, str(tmp_path / "ref.safetensors"))
    no_spec = parcae_refuses("eval", str(tmp_path / "ref.safetensors"), "--data", str(val_shards))
    assert no_spec.returncode != 0 and "pass --spec" in no_spec.stderr and "Traceback" not in no_spec.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: ref\nmodel: {vocab_size: 512, d_model: 64, n_head: 2, n_prelude: 1, n_core: 1, n_coda: 1, "
        "max_seq_len: 64}\ndata: {train_url: unused, seq_len: 32}\ntraining: {micro_batch_size: 1, total_steps: 1}\n"
    )
    ok = run(
        "eval",
        str(tmp_path / "ref.safetensors"),
        "--spec",
        str(spec),
        "--data",
        str(val_shards),
        "--loops",
        "1",
        "3",
        "--max-batches",
        "1",
        "--tensorboard",
        "none",
    )
    assert ok.returncode == 0, ok.stderr
    assert "no fit: the curve has 3 parameters" in ok.stdout


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_bad_inputs_are_named(tmp_path, val_shards):
    weights = save_reference(build_model(CFG), tmp_path / "w.safetensors")
    cases = {
        ("--data", str(tmp_path / "nowhere")): "nowhere",
        ("--data", str(val_shards), "--loops", "0"): "--loops",
        ("--data", str(val_shards), "--tokenizer", str(tmp_path / "t.model")): "--tokenizer",
        (): "pass --data",
    }
    for extra, needle in cases.items():
        result = parcae_refuses("eval", str(weights), *extra)
        assert result.returncode != 0 and needle in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
    missing = parcae_refuses("eval", str(tmp_path / "none.safetensors"), "--data", str(val_shards))
    assert missing.returncode != 0 and "none.safetensors: no such file" in missing.stderr


def test_gpt_baseline_has_one_row_and_no_fit(tmp_path, val_shards):
    cfg = ParcaeConfig(arch="gpt", vocab_size=512, d_model=64, n_head=2, n_layers=2, max_seq_len=64)
    weights = save_reference(build_model(cfg), tmp_path / "gpt.safetensors")
    result = run("eval", str(weights), "--data", str(val_shards), "--max-batches", "1", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert [r["loops"] for r in report["results"]] == [None] and report["fit"] is None


def test_documents_come_back_whole_from_packed_rows(tokenizer, builtin_docs, tiny_shards):
    """Rows cut from the token stream, read in order and cut at <eos>, give the val documents back; each
    becomes one row (<bos> as context, every document token a target), and its bytes are its text's."""
    from data_prep.storage import S3Options
    from data_prep.tokenizer import BOS_ID
    from pipeline.data.loader import rows_loader
    from pipeline.evaluation.documents import IGNORE, document_batches, documents_from_rows

    loader = rows_loader(str(tiny_shards / "val"), S3Options(), rank=0, world_size=1, batch_size=4, seq_len=32)
    rows = (row for _, b in zip(range(loader.batches_per_epoch(0)), loader, strict=False) for row in b.numpy())
    docs = documents_from_rows(rows, EOS_ID, 20)
    sp = load_tokenizer(tokenizer)
    texts = {sp.decode(d.tolist()) for d in docs}
    assert len(docs) == 20 and texts <= set(builtin_docs[:2000])
    counter = TokenBytes(str(tokenizer), 512)
    for doc in docs:
        assert counter.document_bytes(doc) == len(sp.decode(doc.tolist()).encode("utf-8"))
    batches = document_batches(docs, 8, 24, BOS_ID)
    inputs, targets = batches[0]
    first = docs[min(range(len(docs)), key=lambda i: (-min(len(docs[i]), 24), i))]  # longest first, then in order
    assert inputs[0, 0] == BOS_ID and torch.equal(targets[0, : min(len(first), 24)], torch.tensor(first[:24]))
    assert torch.equal(inputs[0, 1 : min(len(first), 24)], torch.tensor(first[: min(len(first), 24) - 1]))
    assert sum(int((t != IGNORE).sum()) for _, t in batches) == sum(min(len(d), 24) for d in docs)


def test_a_mixture_run_is_evaluated_on_its_sources_validation_set():
    """Without --data, `parcae eval` of a mixture run (no data.val_url) scores the first source's val_url
    (it said "no validation data")."""
    from pipeline.jobs.evaluate import default_validation
    from pipeline.jobspec import load_spec
    from tests.conftest import CONFIGS

    sources = "[{name: web, url: s3://b/web, weight: 3}, {name: code, url: s3://b/code, weight: 1, val_url: s3://b/cv}]"
    overrides = ["data.train_url=null", "data.val_url=null", f"data.sources={sources}"]
    spec = load_spec(CONFIGS / "demo-tiny.yaml", overrides).spec
    assert default_validation(spec) == "s3://b/cv"
    plain = load_spec(CONFIGS / "demo-tiny.yaml").spec
    assert default_validation(plain) == plain.data.val_url
