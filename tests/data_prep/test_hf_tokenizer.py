"""A Hugging Face tokenizer.json (byte-level BPE, as the paper's released models and most LMs use) through
the whole data path: pieces count their bytes, shards frame documents with its own BOS/EOS and say so in
the manifest, `parcae prep inspect` decodes them, and `parcae eval` scores bits per byte of the text."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_prep.tokenizer import TextTokenizer, TokenizerError
from tests.conftest import REPO, parcae_cmd

pytest.importorskip("tokenizers")

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def train_hf_tokenizer(texts: list[str], path: Path, specials: list[str] = SPECIALS) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, builtin_docs) -> Path:
    return train_hf_tokenizer(builtin_docs[:2000], tmp_path_factory.mktemp("hf") / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_shards(tmp_path_factory, corpus_jsonl, hf_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("hf-shards")
    cmd = [*parcae_cmd(), "prep", "shards", "--input", str(corpus_jsonl), "--tokenizer", str(hf_tokenizer)]
    cmd += ["--out", str(out), "--seq-len", "32", "--shard-size", "40kB", "--val-fraction", "0.05", "--workers", "2"]
    cmd += ["--packing", "concat"]  # documents run across rows, framed <|bos|> ... <|eos|> by the tokenizer
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def test_pieces_count_their_bytes_and_decode_losslessly(hf_tokenizer, builtin_docs):
    tok = TextTokenizer(hf_tokenizer)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id) == ("huggingface", 0, 1, 2)
    sizes, _, dummy_prefix = tok.piece_bytes()
    assert not dummy_prefix and sizes[0] == sizes[1] == sizes[2] == 0
    for text in builtin_docs[:40] + ["ünïcödé → ✓ 😀", "  two spaces\tand a tab\r\n", "漢字"]:
        ids = tok.encode([text])[0]
        assert sum(sizes[i] for i in ids) == len(text.encode("utf-8")), text
        assert tok.decode(ids) == text
        assert tok.documents([text])[0] == [0, *ids, 1]


def test_a_tokenizer_json_without_an_end_token_or_unreadable_is_named(tmp_path, builtin_docs):
    plain = train_hf_tokenizer(builtin_docs[:200], tmp_path / "plain.json", specials=["<unk>"])
    with pytest.raises(TokenizerError, match=r"plain.json: no end-of-document token \(one of <\|eos\|>"):
        TextTokenizer(plain)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json: not a Hugging Face tokenizer.json"):
        TextTokenizer(tmp_path / "bad.json")


def test_shards_frame_documents_with_the_tokenizers_own_specials(hf_shards, hf_tokenizer, builtin_docs):
    from data_prep.storage import S3Options
    from pipeline.data.loader import rows_loader
    from pipeline.evaluation.documents import documents_from_rows
    from pipeline.evaluation.token_bytes import TokenBytes, special_ids

    manifest = json.loads((hf_shards / "val" / "manifest.json").read_text())
    info = manifest["tokenizer"]
    described = (info["kind"], info["bos_id"], info["eos_id"], info["pad_id"], info["vocab_size"])
    assert described == ("huggingface", 0, 1, 2, 600)
    assert special_ids(manifest) == (0, 1)
    loader = rows_loader(str(hf_shards / "val"), S3Options(), rank=0, world_size=1, batch_size=4, seq_len=32)
    rows = (row for _, b in zip(range(loader.batches_per_epoch(0)), loader, strict=False) for row in b.numpy())
    docs = documents_from_rows(rows, 1, 20)
    tok, counter = TextTokenizer(hf_tokenizer), TokenBytes(str(hf_tokenizer), 640, eos=1)
    assert len(docs) == 20
    for doc in docs:
        assert doc[0] == 0 and not np.isin(doc[1:], [0, 1, 2]).any()  # cut at <|eos|>, which it leaves out
        text = tok.decode(doc[1:].tolist())
        assert text in builtin_docs[:2000] and counter.document_bytes(doc) == len(text.encode("utf-8"))
    inspect = subprocess.run(
        [*parcae_cmd(), "prep", "inspect", str(hf_shards / "val"), "--samples", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert inspect.returncode == 0 and "\n<|bos|>" in inspect.stdout, inspect.stderr


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_eval_scores_bits_per_byte_of_the_text(tmp_path, hf_shards):
    from model import ParcaeConfig, build_model, save_reference

    cfg = ParcaeConfig(vocab_size=600, d_model=64, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=64)
    weights = save_reference(build_model(cfg, seed=1), tmp_path / "w.safetensors")
    for protocol in ("pipeline", "paper"):
        out = tmp_path / protocol
        cmd = [*parcae_cmd(), "eval", str(weights), "--data", str(hf_shards / "val"), "--loops", "1", "2"]
        cmd += ["--max-batches", "2", "--protocol", protocol, "--documents", "8", "--h0-seeds", "1", "--out", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "eval.json").read_text())
        tokens, n_bytes = report["tokens"], report["bytes"]
        assert n_bytes / tokens > 1.5  # a 600-piece byte-level BPE: about 1.7 bytes a piece, specials none
        for r in report["results"]:
            assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2) * tokens / n_bytes, rel=1e-9)


def test_export_carries_the_tokenizer_json_and_generates_with_it(tmp_path, hf_tokenizer, builtin_docs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import ParcaeConfig, build_model
    from parcae_errors import ParcaeError
    from pipeline.jobs.hf_export import export_hf

    cfg = ParcaeConfig(vocab_size=600, d_model=32, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=32)
    model = build_model(cfg, seed=0).eval()
    out = export_hf(model, tmp_path / "hf", str(hf_tokenizer))
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    theirs = AutoTokenizer.from_pretrained(str(out))
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == tuple(SPECIALS)
    text = builtin_docs[3]
    assert theirs(text, add_special_tokens=False)["input_ids"] == TextTokenizer(hf_tokenizer).encode([text])[0]
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    prompt = theirs("def f(x):", return_tensors="pt")["input_ids"]
    generated = hf.generate(prompt, max_new_tokens=5, do_sample=False, loops=2)
    assert generated.tolist() == model.generate(prompt, 5, loops=2).tolist()
    assert theirs.decode(generated[0]).startswith("def f(x):")
    with pytest.raises(ParcaeError, match="--tokenizer .*missing.json: no such tokenizer"):
        export_hf(build_model(cfg, seed=0), tmp_path / "hf2", str(tmp_path / "missing.json"))
    assert not (tmp_path / "hf2").exists()  # checked before anything is written


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_downstream_eval_of_a_released_directory_with_its_tokenizer_json(tmp_path, hf_tokenizer):
    """A released directory that carries its tokenizer.json is scored with it: prompts start with its BOS."""
    import dataclasses
    import shutil

    from model import build_model
    from pipeline.evaluation.bundle import Bundle
    from pipeline.evaluation.downstream import Suite, prompt_items
    from pipeline.evaluation.text import prompt_start
    from tests.icl_bundles import make_bundle
    from tests.model.reference import write_released
    from tests.model.test_parcae import TINY, randomize

    text = TextTokenizer(hf_tokenizer)
    assert prompt_start(text) == text.bos_id == 0
    bundle = make_bundle(tmp_path / "bundle")
    prompted = prompt_items(Suite.load(Bundle(str(bundle)), ["core"], 4), text.encode, 0, 10_000, 1234)
    assert all(key[0][0] == 0 and key[0].count(0) == 1 for p in prompted for key in p.keys)
    cfg = dataclasses.replace(TINY, vocab_size=640)
    directory = write_released(tmp_path / "parcae-tiny", randomize(build_model(cfg, seed=2), seed=5))
    shutil.copyfile(hf_tokenizer, directory / "tokenizer.json")
    cmd = [*parcae_cmd(), "eval", str(directory), "--tasks", "core", "--bundle", str(bundle), "--loops", "1", "2"]
    result = subprocess.run([*cmd, "--max-per-task", "4"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "parcae-tiny-eval" / "downstream.json").read_text())
    assert report["tokenizer"] == str(directory / "tokenizer.json") and len(report["results"]) == 2
    # parcae generate with the directory's tokenizer.json: its BOS first, the model's greedy tokens
    import torch

    from model import load_pretrained

    cmd = [*parcae_cmd(), "generate", str(directory), "--prompt", "The river is", "--json", "--max-new-tokens", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout)
    ids = torch.tensor([[text.bos_id, *text.encode(["The river is"])[0]]])
    expected = load_pretrained(directory).generate(ids, 5, loops=row["loops"])[0, ids.shape[1] :].tolist()
    if text.eos_id in expected:
        expected = expected[: expected.index(text.eos_id)]
    assert row["tokens"] == expected
