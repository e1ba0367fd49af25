from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
from data_prep.tokenizer import TokenizerSettings, train_tokenizer


@pytest.fixture(scope="session")
def builtin_docs() -> list[str]:
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
    out = tmp_path_factory.mktemp("tok") / "t"
    docs = iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())
    train_tokenizer(docs, TokenizerSettings(vocab_size=512, max_sample_chars=300_000), out)
    return Path(f"{out}.model")
