"""`parcae demo`: the README's first command, end to end on one CPU machine.

1. train a SentencePiece tokenizer on the embedded corpus (Python standard-library docstrings);
2. start a real S3 endpoint on loopback (moto's standalone server) and write the shards there;
3. train the tiny Parcae of configs/demo-tiny.yaml with DeepSpeed ZeRO-3 on 2 CPU ranks (gloo),
   streaming the shards from that endpoint, evaluating at several loop counts;
4. print the loss curve's ends, the validation loss per loop count, and how to open TensorBoard.

Everything lands under the work directory (default runs/demo), which the demo starts afresh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from parcae_errors import ParcaeError
from pipeline.training.distributed import free_port

DEMO_SPEC = Path(__file__).resolve().parents[2] / "configs" / "demo-tiny.yaml"
BUCKET = "parcae-demo"


def start_local_s3(log_path: Path | None = None) -> tuple[subprocess.Popen, str]:
    """A real S3 endpoint (moto's standalone server) on a free loopback port: (process, endpoint URL).
    The demo streams its shards from it; the test suite's S3 tests share it."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        raise ParcaeError("the demo needs moto's S3 server (moto_server); run `make setup` (installs the dev extra)")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    out = log_path.open("w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ParcaeError(f"the local S3 endpoint did not start on {endpoint}; see {log_path}") from None
            time.sleep(0.1)


Say = Callable[[str], None]


def run_demo(workdir: str, say: Say = lambda _: None) -> int:
    """The demo in ``workdir`` (started afresh); ``say`` gets its progress and results, line by line (the CLI
    prints them; training logs as any run does)."""
    from pipeline.jobs.launch import run_train

    root = Path(workdir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "demo"),
        ("AWS_SECRET_ACCESS_KEY", "demo"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    tokenizer = demo_tokenizer(root, say)
    s3, endpoint = start_local_s3(root / "s3-server.log")
    try:
        val_dir = demo_shards(root, tokenizer, endpoint, say)
        say("\n[3/4] training: tiny Parcae, DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), streaming from S3")
        run_dir = root / "run"
        overrides = [
            f"run_dir={run_dir}",
            f"tokenizer.path={tokenizer}",
            f"data.val_url={val_dir}",
            f"storage.endpoint_url={endpoint}",
        ]
        code = run_train(str(DEMO_SPEC), overrides)
        if code != 0:
            raise ParcaeError(f"training exited with {code}; see the log above")
    finally:
        s3.terminate()
        s3.wait(timeout=30)
    return demo_results(run_dir, say)


def demo_tokenizer(root: Path, say: Say) -> Path:
    """Step 1: a SentencePiece tokenizer trained on the embedded corpus; its model file."""
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    say("\n[1/4] tokenizer: SentencePiece BPE, vocab 2048, on the embedded corpus (standard-library docstrings)")
    card = train_tokenizer(
        iter_documents(CorpusSpec((BUILTIN,)), Problems()),
        TokenizerSettings(vocab_size=2048),
        root / "tokenizer" / "demo",
    )
    model = root / "tokenizer" / "demo.model"
    say(f"      {model}: trained on {card['sample']['documents_sampled']} documents")
    return model


def demo_shards(root: Path, tokenizer: Path, endpoint: str, say: Say) -> Path:
    """Step 2: the corpus as shards on the local S3 endpoint, the validation set copied to local disk (so
    `parcae eval` of the demo's run works after the endpoint is gone); the local validation directory."""
    import boto3

    from data_prep.corpus import BUILTIN
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.storage import S3Options
    from pipeline.jobs.tb import sync_s3

    say(f"\n[2/4] shards: rows of 65 tokens into s3://{BUCKET}/shards on the local S3 endpoint {endpoint}")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    summary = build_shards(
        [BUILTIN],
        str(tokenizer),
        f"s3://{BUCKET}/shards",
        ShardSettings(seq_len=64, shard_bytes=256_000, val_fraction=0.03, packing="bos-aligned"),
        workers=2,
        options=S3Options(endpoint),
        progress=False,
    )
    for split in ("train", "val"):
        t = summary[split]
        say(f"      {split}: {t['shards']} shards, {t['samples']} rows, {t['tokens']} tokens")
    at_start = summary["train"]["rows_at_document_start"]
    say(
        f"      packing bos-aligned: {at_start} of {summary['train']['samples']} rows start a document with <bos>, "
        "as CORE prompts and samples do"
    )
    val_dir = root / "shards" / "val"
    sync_s3(f"s3://{BUCKET}/shards/val", val_dir, S3Options(endpoint))
    say(f"      validation shards copied to {val_dir} (evaluation after the demo reads them)")
    return val_dir


def demo_results(run_dir: Path, say: Say) -> int:
    """Step 4: the loss curve's ends and the validation loss per loop count; refused if the loss did not fall."""
    say("\n[4/4] results")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("val_loss") for k in r)]
    first, last = train[0], train[-1]
    head = sum(r["loss"] for r in train[:10]) / min(10, len(train))
    tail = sum(r["loss"] for r in train[-10:]) / min(10, len(train))
    say(
        f"      training loss: step {first['step']} {first['loss']:.3f} -> step {last['step']} {last['loss']:.3f} "
        f"(mean of the first 10 steps {head:.3f}, of the last 10 {tail:.3f})"
    )
    if evals:
        final = evals[-1]
        say(f"      validation loss at step {final['step']} by test-time loop count:")
        for key, value in final.items():
            if key.startswith("val_loss_loops_"):
                say(f"        {int(key.rsplit('_', 1)[1]):>3} loops: {value:.4f}")
    tb = run_dir / "tensorboard"
    say(
        f"\nTensorBoard logs: {tb}\nView them with:  .venv/bin/parcae tb {run_dir} --port 6006   "
        "(the Custom Scalars tab first: docs/monitoring.md)"
    )
    say(f"Checkpoints: {run_dir / 'checkpoints'}; metrics per step: {run_dir / 'metrics.jsonl'}")
    if tail >= head - 1.0:
        raise ParcaeError(f"the loss did not fall clearly ({head:.3f} -> {tail:.3f}); something is wrong")
    return 0
