"""Shards: deterministic bytes, exact token accounting, a hash-chosen validation split, the manifest."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from data_prep.corpus import CorpusSpec, Problems, iter_documents
from data_prep.inspect import iter_samples, verify
from data_prep.shards import ShardSettings, _text_hash, build_shards
from data_prep.tokenizer import EOS_ID, load_tokenizer
from tests.conftest import REPO, parcae_cmd

SETTINGS = ShardSettings(seq_len=64, shard_bytes=200_000, val_fraction=0.05)


def shard_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def samples(split_dir):
    manifest = json.loads((split_dir / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        with (split_dir / shard["name"]).open("rb") as f:
            out += [(tokens, bounds) for _, tokens, bounds in iter_samples(f, shard["name"])]
    return manifest, out


def test_deterministic_and_independent_of_worker_count(tmp_path, corpus_jsonl, tokenizer):
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "a"), SETTINGS, workers=2)
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "b"), SETTINGS, workers=0)
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert len(a) > 3 and a == b


def test_token_accounting_is_exact(tmp_path, corpus_jsonl, tokenizer):
    summary = build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "o"), SETTINGS, workers=2)
    sp = load_tokenizer(tokenizer)
    docs = [d.text for d in iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())]
    produced = sum(len(ids) + 1 for ids in sp.encode(docs))  # + <eos> per document
    in_shards = summary["train"]["tokens"] + summary["val"]["tokens"]
    remainder = summary["train"]["remainder_tokens_dropped"] + summary["val"]["remainder_tokens_dropped"]
    assert in_shards + remainder == produced
    assert summary["train"]["documents"] + summary["val"]["documents"] == len(docs)
    for split in ("train", "val"):
        manifest, rows = samples(tmp_path / "o" / split)
        assert manifest["totals"]["tokens"] == sum(len(t) for t, _ in rows) == len(rows) * 65
        assert manifest["totals"]["remainder_tokens_dropped"] < 65


def test_rows_hold_the_documents_in_order_with_their_boundaries(tmp_path, corpus_jsonl, tokenizer):
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "o"), SETTINGS, workers=1)
    sp = load_tokenizer(tokenizer)
    manifest, rows = samples(tmp_path / "o" / "train")
    assert manifest["dtype"] == "uint16" and rows[0][0].dtype == np.uint16 and len(rows[0][0]) == 65
    stream = np.concatenate([t for t, _ in rows]).astype(np.int64)
    starts = np.concatenate([b + 65 * i for i, (_, b) in enumerate(rows)])
    ends = np.flatnonzero(stream == EOS_ID)
    assert starts[0] == 0 and np.array_equal(starts[1:], ends[: len(starts) - 1] + 1)
    first = sp.decode(stream[: ends[0]].tolist())
    docs = [d.text for d in iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())]
    assert first in docs


def test_validation_split_is_chosen_by_document_hash_not_position(tmp_path, builtin_docs, tokenizer):
    docs = list(dict.fromkeys(builtin_docs[:600]))
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    threshold = int(0.2 * (1 << 64))
    sp = load_tokenizer(tokenizer)
    for name, order in (("in_order", docs), ("shuffled", shuffled)):
        with (tmp_path / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in order)
        settings = ShardSettings(seq_len=16, shard_bytes=1 << 20, val_fraction=0.2)
        build_shards([str(tmp_path / f"{name}.jsonl")], str(tokenizer), str(tmp_path / name), settings, workers=0)
        manifest, rows = samples(tmp_path / name / "val")
        expected = [d for d in order if _text_hash(d) < threshold]
        assert manifest["totals"]["documents"] == len(expected)
        text = sp.decode(np.concatenate([t for t, _ in rows]).astype(np.int64).tolist())
        assert all(d in text for d in expected[:-1])  # the last may lose its tail with the dropped final row
    assert 0.1 < len(expected) / len(docs) < 0.3


def test_manifest_contents(tmp_path, corpus_jsonl, tokenizer):
    build_shards(
        [str(corpus_jsonl)],
        str(tokenizer),
        str(tmp_path / "o"),
        SETTINGS,
        workers=0,
        command=["parcae", "prep", "shards"],
    )
    manifest = json.loads((tmp_path / "o" / "train" / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tokenizer.read_bytes()).hexdigest()
    assert manifest["seq_len"] == 64 and manifest["row_len"] == 65 and manifest["command"][:2] == ["parcae", "prep"]
    for shard in manifest["shards"]:
        data = (tmp_path / "o" / "train" / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["totals"]["samples"]
    assert verify(str(tmp_path / "o" / "train")) == []


def test_local_verify_names_missing_corrupt_and_extra(tmp_path, corpus_jsonl, tokenizer):
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "o"), SETTINGS, workers=0)
    train = tmp_path / "o" / "train"
    (train / "shard-000000.tar").unlink()
    data = bytearray((train / "shard-000001.tar").read_bytes())
    data[1000] ^= 0xFF
    (train / "shard-000001.tar").write_bytes(bytes(data))
    (train / "stray.tar").write_bytes(b"x")
    problems = verify(str(train))
    assert problems[0] == f"missing: {train / 'shard-000000.tar'}"
    assert problems[1].startswith(f"corrupt: {train / 'shard-000001.tar'} sha256")
    assert problems[2] == f"extra: {train / 'stray.tar'} is not in the manifest"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard-size", "big"], "'big' is not a size"),
        (["--val-fraction", "1.5"], "expected a fraction in [0, 1)"),
        (["--seq-len", "0"], "expected an integer >= 1"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, tokenizer, args, message):
    cmd = [*parcae_cmd(), "prep", "shards", "--tokenizer", str(tokenizer), "--out", str(tmp_path / "o"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_cli_errors_name_the_file(tmp_path, corpus_jsonl):
    cmd = [
        *parcae_cmd(),
        "prep",
        "shards",
        "--input",
        str(corpus_jsonl),
        "--tokenizer",
        str(tmp_path / "no.model"),
        "--out",
        str(tmp_path / "o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and "no.model: no such tokenizer model" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name, size", [("0000000001.tokens.npy", 4226), ("a", 0), ("x" * 100, 123456789)])
def test_tar_headers_are_what_tarfile_writes(name, size):
    import tarfile

    from data_prep.shards import _ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    assert _ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_webdataset_reads_the_shards(tmp_path, corpus_jsonl, tokenizer):
    import webdataset as wds

    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "o"), SETTINGS, workers=0)
    manifest, rows = samples(tmp_path / "o" / "train")
    urls = [str(tmp_path / "o" / "train" / s["name"]) for s in manifest["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    seen = [(s["tokens.npy"], s["bounds.npy"]) for s in dataset]
    assert len(seen) == len(rows)
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(seen, rows, strict=True))


BOS_ALIGNED = ShardSettings(seq_len=64, shard_bytes=200_000, val_fraction=0.05, packing="bos-aligned", pack_buffer=64)


def test_bos_aligned_rows_start_at_documents_and_account_for_every_token(tmp_path, corpus_jsonl, tokenizer):
    """Every row starts with <bos> at a document start; a document is whole in one row unless cropped
    (then its head fills the end of a row and its tail is gone); shards + cropped + dropped = produced."""
    from data_prep.inspect import summary
    from data_prep.tokenizer import BOS_ID

    out = tmp_path / "o"
    totals = build_shards([str(corpus_jsonl)], str(tokenizer), str(out), BOS_ALIGNED, workers=2)
    sp = load_tokenizer(tokenizer)
    docs = [d.text for d in iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())]
    framed = {}  # every document as packed: <bos> ids <eos>
    for text, ids in zip(docs, sp.encode(docs), strict=True):
        framed.setdefault(_text_hash(text), []).append([BOS_ID, *ids, EOS_ID])
    produced = sum(len(f) for group in framed.values() for f in group)
    split_totals = [totals["train"], totals["val"]]
    assert sum(t["tokens"] + t["cropped_tokens"] + t["remainder_tokens_dropped"] for t in split_totals) == produced
    assert sum(t["documents"] for t in split_totals) == len(docs)
    whole = {tuple(f) for group in framed.values() for f in group}
    for split in ("train", "val"):
        manifest, rows = samples(out / split)
        assert manifest["packing"] == {"kind": "bos-aligned", "bos_id": BOS_ID, "buffer_documents": 64}
        cropped = 0
        for tokens, bounds in rows:
            tokens = tokens.astype(np.int64).tolist()
            assert tokens[0] == BOS_ID and bounds[0] == 0
            assert [i for i, t in enumerate(tokens) if t == BOS_ID] == bounds.tolist()
            pieces = [tokens[a:b] for a, b in zip(bounds.tolist(), [*bounds.tolist()[1:], len(tokens)], strict=True)]
            for piece in pieces[:-1]:
                assert tuple(piece) in whole  # whole documents, never split
            if tuple(pieces[-1]) not in whole:  # only the row's last piece may be a cropped head
                assert pieces[-1][-1] != EOS_ID or len(pieces[-1]) == 1
                cropped += 1
        assert cropped == manifest["totals"]["cropped_documents"]
        assert manifest["totals"]["rows_at_document_start"] == len(rows)
        assert summary(str(out / split))["rows_at_document_start"] == len(rows)
    assert totals["train"]["cropped_documents"] > 0  # docstrings longer than a 65-token row are cropped
    # the paper's evaluation protocol reads whole documents only: a cropped head is not glued to the next row
    from pipeline.evaluation.documents import documents_from_rows

    _, rows = samples(out / "val")
    documents = documents_from_rows((t.astype(np.int64) for t, _ in rows), EOS_ID, 10_000, bos_aligned=True)
    assert documents and all((*d.tolist(), EOS_ID) in whole for d in documents)


def test_bos_aligned_is_deterministic_and_resumes(tmp_path, corpus_jsonl, tokenizer):
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "a"), BOS_ALIGNED, workers=2)
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "b"), BOS_ALIGNED, workers=0)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    with pytest.raises(Exception, match='packing: was null, now "concat"|settings.pack'):  # a changed packing
        build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "a"), SETTINGS, workers=0)


def test_inspect_summarises_sources_side_by_side(tmp_path, corpus_jsonl, tokenizer):
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "c"), SETTINGS, workers=0)
    build_shards([str(corpus_jsonl)], str(tokenizer), str(tmp_path / "b"), BOS_ALIGNED, workers=0)
    concat = json.loads((tmp_path / "c" / "train" / "manifest.json").read_text())
    # a manifest from before packing was recorded: the count comes from the shards
    old = {k: v for k, v in concat.items() if k != "packing"}
    old["totals"] = {k: v for k, v in concat["totals"].items() if k != "rows_at_document_start"}
    (tmp_path / "c" / "train" / "manifest.json").write_text(json.dumps(old))
    result = subprocess.run(
        [*parcae_cmd(), "prep", "inspect", str(tmp_path / "c" / "train"), str(tmp_path / "b" / "train")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2  # one line per source, no samples
    at_start = concat["totals"]["rows_at_document_start"]
    assert "packing concat" in lines[0] and f"{at_start} rows (" in lines[0] and "counted from the shards" in lines[0]
    assert 0 < at_start < concat["totals"]["samples"] / 2
    assert "packing bos-aligned" in lines[1] and "(100.0%) start at a document boundary" in lines[1]
    assert "tokens cropped from" in lines[1]


def test_a_crash_near_the_end_tokenizes_only_the_unfinished_shards_again(tmp_path, corpus_jsonl, tokenizer):
    """SIGKILL while the next-to-last train shard fills: the rerun restores the packers
    from resume.npz and tokenizes only the input after the last shard boundary; the shards are the same bytes."""
    import textwrap

    # plain text, a document per paragraph: chunks of 5,000 characters (JSON Lines come in 1 MB read blocks)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(json.loads(line)["text"] for line in corpus_jsonl.read_text().splitlines()))
    settings = ShardSettings(
        seq_len=32, shard_bytes=200_000, val_fraction=0.05, chunk_chars=5_000, txt_mode="paragraph"
    )
    ref = build_shards([str(corpus)], str(tokenizer), str(tmp_path / "ref"), settings, workers=0)
    total = ref["train"]["shards"]
    assert total >= 5 and ref["tokens_encoded"] == ref["train"]["tokens_produced"] + ref["val"]["tokens_produced"]
    code = textwrap.dedent(f"""
        import os
        from data_prep import resume, shards
        from data_prep.shards import ShardSettings, build_shards
        save, add, armed = resume.save, shards.ShardBuilder.add, []
        def saving(store, fingerprint, chunks, builder, *rest):
            save(store, fingerprint, chunks, builder, *rest)
            if builder.splits["train"].shard_index == {total - 2}:
                armed.append(0)  # the last two train shards fill from here on
        def adding(self, split, tokens, lengths):
            if armed:  # the next chunk: dies inside the next-to-last shard
                os.kill(os.getpid(), 9)  # SIGKILL
            add(self, split, tokens, lengths)
        resume.save, shards.ShardBuilder.add = saving, adding
        settings = ShardSettings(seq_len=32, shard_bytes=200_000, val_fraction=0.05, chunk_chars=5_000,
                                 txt_mode="paragraph")
        build_shards([{str(corpus)!r}], {str(tokenizer)!r}, {str(tmp_path / "out")!r}, settings, workers=0)
    """)
    died = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    assert (tmp_path / "out" / "resume.npz").exists() and not (tmp_path / "out" / "train" / "manifest.json").exists()
    again = build_shards([str(corpus)], str(tokenizer), str(tmp_path / "out"), settings, workers=0)
    shards = json.loads((tmp_path / "ref" / "train" / "manifest.json").read_text())["shards"]
    last_two = shards[-1]["tokens"] + shards[-2]["tokens"]
    assert again["resumed_after_chunks"] > 0
    assert again["tokens_encoded"] <= last_two + 5_000  # the unfinished shards' documents (+ a chunk) at most
    assert again["tokens_encoded"] < ref["tokens_encoded"] / (total - 1)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "ref")
    for split in ("train", "val"):
        a = json.loads((tmp_path / "ref" / split / "manifest.json").read_text())
        b = json.loads((tmp_path / "out" / split / "manifest.json").read_text())
        assert a == b
    assert not (tmp_path / "out" / "resume.npz").exists()


def test_the_cli_packs_bos_aligned_by_default_and_concat_on_request(tmp_path, builtin_docs, tokenizer):
    """`prep shards` packs as the reference and nanochat do unless told otherwise: every row starts a
    document with <bos>, the token CORE prompts start with."""
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_docs[:200]))
    base = [*parcae_cmd(), "prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer), "--seq-len", "64"]
    for extra, kind in (([], "bos-aligned"), (["--packing", "concat"], "concat")):
        out = tmp_path / kind
        done = subprocess.run([*base, "--out", str(out), *extra], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        manifest = json.loads((out / "train" / "manifest.json").read_text())
        assert manifest["packing"]["kind"] == kind
        # docstrings in rows of 64 tokens: most of bos-aligned's tokens are cropped, and it says so, with the fix
        warned = "warning: bos-aligned packing cropped" in done.stderr and "--packing concat keeps all" in done.stderr
        assert warned == (kind == "bos-aligned"), done.stderr
    _, rows = samples(tmp_path / "bos-aligned" / "train")
    assert {int(tokens[0]) for tokens, _ in rows} == {2}  # <bos>


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_a_truncated_progress_or_resume_file_is_named_not_a_traceback(tmp_path, builtin_docs, tokenizer):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_docs[:100]))
    out = tmp_path / "out"
    cmd = [*parcae_cmd(), "prep", "shards", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120).returncode == 0
    (out / "resume.npz").write_bytes(b"PK\x03\x04 cut off")  # a resume state cut off mid-write: from the top
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 0 and "resume.npz: unreadable (truncated?)" in again.stderr, again.stderr[-2000:]
    progress = out / "progress.json"
    progress.write_bytes(progress.read_bytes()[:40])
    cut = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cut.returncode == 1 and "Traceback" not in cut.stderr, cut.stderr[-2000:]
    assert f"{progress}: not valid JSON" in cut.stderr and "remove it to start over here" in cut.stderr
