"""Shared fixtures. Tests mirror the package tree: tests/model, tests/pipeline, tests/data_prep."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"

# Everything runs on CPU here; keep DeepSpeed off any accelerator probing.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def repo() -> Path:
    return REPO


def parcae_cmd() -> list[str]:
    """The installed entry point, run the way a user runs it (a fresh interpreter)."""
    return [sys.executable, "-m", "pipeline"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A real S3 HTTP endpoint (moto's standalone server) on loopback, reached with boto3 like any S3."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._count = 0

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def new_bucket(self, name: str = "test") -> str:
        self._count += 1
        bucket = f"{name}-{self._count}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def s3_server():
    import shutil
    import subprocess
    import time
    import urllib.request

    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env_before = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.1)
    try:
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def builtin_docs() -> list[str]:
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents

    return [d.text for d in iter_documents(CorpusSpec((BUILTIN,)), Problems())]


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, builtin_docs) -> Path:
    """About 2,000 documents of the embedded corpus as JSON Lines (fast to read in every test)."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with path.open("w") as f:
        for text in builtin_docs[:2000]:
            f.write(json.dumps({"text": text, "id": len(text)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus_jsonl) -> Path:
    from data_prep.corpus import CorpusSpec, Problems, iter_documents
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "t"
    docs = iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())
    train_tokenizer(docs, TokenizerSettings(vocab_size=512, max_sample_chars=300_000), out)
    return Path(f"{out}.model")
