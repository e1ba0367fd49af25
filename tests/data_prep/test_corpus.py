"""Corpus readers: formats, compression, globs, and problems counted with file and line."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from data_prep.corpus import BUILTIN, CorpusError, CorpusSpec, Problems, iter_documents, resolve_sources


def read(sources, policy="skip", **kw):
    problems = Problems(policy=policy)
    docs = list(iter_documents(CorpusSpec(tuple(str(s) for s in sources), **kw), problems))
    return docs, problems


def test_jsonl_plain_gz_zst_with_problems_counted(tmp_path):
    lines = [
        json.dumps({"text": "first doc"}),
        "{not json",
        json.dumps({"text": "   "}),
        json.dumps({"body": "x"}),
        json.dumps({"text": "second doc"}),
    ]
    payload = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(payload)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    docs, problems = read([tmp_path / "*.jsonl*"])
    assert [d.text for d in docs] == ["first doc", "second doc"] * 3
    assert docs[1].where == f"{tmp_path / 'a.jsonl'}:5"
    assert problems.counts == {"bad JSON lines": 3, "empty documents": 3, "records without text": 3}
    assert problems.examples["bad JSON lines"][0].startswith(f"{tmp_path / 'a.jsonl'}:2: ")
    assert problems.report()[0] == "3 bad JSON lines"


def test_policy_stop_names_the_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(CorpusError, match=r"a.jsonl:2: .*bad JSON lines"):
        read([tmp_path / "a.jsonl"], policy="stop")


def test_text_modes_and_custom_field(tmp_path):
    (tmp_path / "t.txt").write_text("para one\nline two\n\n\npara two\n")
    assert [d.text for d in read([tmp_path / "t.txt"])[0]] == ["para one\nline two\n\n\npara two\n"]
    assert [d.text for d in read([tmp_path / "t.txt"], txt_mode="line")[0]] == ["para one", "line two", "para two"]
    assert [d.text for d in read([tmp_path / "t.txt"], txt_mode="paragraph")[0]] == ["para one\nline two", "para two"]
    (tmp_path / "d.jsonl").write_text('{"content": "hello"}\n')
    assert [d.text for d in read([tmp_path / "d.jsonl"], text_field="content")[0]] == ["hello"]


def test_parquet_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["a", None, "b", "", "c"], "url": ["u"] * 5})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    docs, problems = read([tmp_path / "x.parquet"])
    assert [d.text for d in docs] == ["a", "b", "c"] and docs[2].where.endswith(":row 5")
    assert problems.counts == {"empty documents": 2}
    docs, problems = read([tmp_path / "x.parquet"], text_field="body")
    assert docs == [] and "no column 'body' (columns: text, url)" in problems.examples["unreadable files"][0]


def test_unreadable_and_missing_inputs(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs, problems = read([tmp_path / "bad.jsonl.gz", tmp_path / "latin.txt"])
    assert docs == [] and problems.counts == {"unreadable files": 1, "undecodable lines": 1}
    with pytest.raises(CorpusError, match="matches no file"):
        resolve_sources(CorpusSpec((str(tmp_path / "none*.jsonl"),)))


def test_builtin_corpus_is_deterministic_and_nonempty(builtin_docs):
    assert len(builtin_docs) > 5000 and sum(map(len, builtin_docs)) > 1_000_000
    again = [d.text for d in iter_documents(CorpusSpec((BUILTIN,)), Problems())]
    assert again == builtin_docs


def test_s3_prefix_source(s3_server, tmp_path):
    from data_prep.storage import S3Options

    bucket = s3_server.new_bucket("corpus")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="raw/b.jsonl", Body=b'{"text": "two"}\n{"text": "three"}\n')
    client.put_object(Bucket=bucket, Key="raw/a.jsonl.gz", Body=gzip.compress(b'{"text": "one"}\n'))
    client.put_object(Bucket=bucket, Key="raw/readme.md5", Body=b"ignored")
    problems = Problems()
    docs = list(iter_documents(CorpusSpec((f"s3://{bucket}/raw",)), problems, S3Options(s3_server.endpoint)))
    assert [d.text for d in docs] == ["one", "two", "three"]
    assert docs[0].where == f"s3://{bucket}/raw/a.jsonl.gz:1"
