"""The streaming loader: disjoint deterministic shares, equal batch counts, S3, bad shards (resume: test_mixture)."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from data_prep.shards import ShardSettings, build_shards
from data_prep.storage import S3Options
from pipeline.data.loader import ShardLoader, _prefetched
from pipeline.data.manifests import DataError


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, corpus_jsonl, tokenizer):
    out = tmp_path_factory.mktemp("shards")
    build_shards(
        [str(corpus_jsonl)], str(tokenizer), str(out), ShardSettings(seq_len=32, shard_bytes=60_000), workers=0
    )
    return out


def loader(url, rank=0, world=1, batch=4, **kw):
    kw.setdefault("prefetch", 0)
    return ShardLoader(
        str(url),
        rank=rank,
        world_size=world,
        micro_batch_size=batch,
        seq_len=32,
        seed=7,
        shuffle_buffer=kw.pop("shuffle_buffer", 16),
        **kw,
    )


def take(it, n):
    return [b.clone() for b in itertools.islice(it, n)]


def rows_of(batches):
    return {tuple(r.tolist()) for b in batches for r in b}


def test_ranks_read_disjoint_shards_and_equal_batch_counts(shard_dir):
    loaders = [loader(shard_dir / "train", rank=r, world=2) for r in range(2)]
    assert set(loaders[0].rank_shards(0)).isdisjoint(loaders[1].rank_shards(0))
    per_epoch = loaders[0].batches_per_epoch(0)
    assert per_epoch == loaders[1].batches_per_epoch(0) > 0
    epochs = [take(iter(ld), per_epoch) for ld in loaders]
    assert rows_of(epochs[0]).isdisjoint(rows_of(epochs[1]))
    assert all(b.shape == (4, 33) and b.dtype.is_floating_point is False for b in epochs[0])


def test_deterministic_and_reshuffled_each_epoch(shard_dir):
    a, b = loader(shard_dir / "train"), loader(shard_dir / "train")
    n = a.batches_per_epoch(0)
    first, again = take(iter(a), 2 * n), take(iter(b), 2 * n)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert a.shard_order(0) != a.shard_order(1)
    # every epoch sees the same rows in another order (but for the few left over after the last full batch)
    one, two = rows_of(first[:n]), rows_of(first[n:])
    assert len(one & two) >= len(one) - 3
    assert not all(np.array_equal(x, y) for x, y in zip(first[:n], first[n:], strict=True))


def test_streams_from_s3(s3_server, shard_dir):
    bucket = s3_server.new_bucket("loader")
    client = s3_server.client()
    for path in (shard_dir / "train").iterdir():
        client.upload_file(str(path), bucket, f"ds/train/{path.name}")
    local = take(iter(loader(shard_dir / "train")), 10)
    remote = take(iter(loader(f"s3://{bucket}/ds/train", options=S3Options(s3_server.endpoint))), 10)
    assert all(np.array_equal(x, y) for x, y in zip(local, remote, strict=True))


def test_errors_name_the_shard_set(tmp_path, shard_dir):
    with pytest.raises(DataError, match="seq_len 32 .* data.seq_len is 64"):
        ShardLoader(
            str(shard_dir / "train"), rank=0, world_size=1, micro_batch_size=4, seq_len=64, seed=0, shuffle_buffer=0
        )
    with pytest.raises(Exception, match="no manifest"):
        loader(tmp_path)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in (shard_dir / "train").iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    (damaged / "shard-000000.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=r"shard-000000.tar: corrupt"):
        take(iter(loader(damaged, shuffle=False)), 1000)
    # a flipped byte leaves a valid tar with wrong tokens: the manifest's sha256 catches it before any row is used
    good = (shard_dir / "train" / "shard-000000.tar").read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    (damaged / "shard-000000.tar").write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"shard-000000.tar: corrupt: .* sha256 differs from the manifest"):
        take(iter(loader(damaged, shuffle=False)), 1000)
    skipping = loader(damaged, shuffle=False, on_bad_shard="skip")
    take(iter(skipping), 5)
    assert skipping.skipped_shards == [str(damaged / "shard-000000.tar")]


def test_skipping_bad_shards_is_bounded_and_said_once_per_shard(tmp_path, shard_dir, caplog):
    """data.on_bad_shard: skip with every shard bad stops at the end of the first epoch, naming them (it
    read the same bad shards forever); past data.max_bad_shard_share it stops too; a shard skipped again in
    a later epoch is not warned about again."""
    import logging

    bad = tmp_path / "bad"
    bad.mkdir()
    names = sorted(p.name for p in (shard_dir / "train").glob("*.tar"))
    for path in (shard_dir / "train").iterdir():
        (bad / path.name).write_bytes(b"garbage" if path.suffix == ".tar" else path.read_bytes())
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match="every shard this rank reads was skipped"):
        next(loader(bad, on_bad_shard="skip", max_bad_shard_share=1.0).rows_from(0))
    assert caplog.text.count("skipping shard") == len(names)
    with pytest.raises(DataError, match=rf"2 of its {len(names)} shards are bad, more than data.max_bad_shard_share"):
        next(loader(bad, on_bad_shard="skip", max_bad_shard_share=0.0).rows_from(0))
    one = tmp_path / "one"
    one.mkdir()
    for path in (shard_dir / "train").iterdir():
        (one / path.name).write_bytes(path.read_bytes())
    (one / names[0]).write_bytes(b"garbage")
    caplog.clear()
    reader = loader(one, on_bad_shard="skip", max_bad_shard_share=0.0)  # one bad shard may always be skipped
    with caplog.at_level(logging.WARNING):
        rows = list(itertools.islice(reader.rows_from(0), 3 * reader.rows_per_epoch(0)))  # three epochs
    assert len(rows) == 3 * reader.rows_per_epoch(0) and caplog.text.count("skipping shard") == 1


def test_token_ids_at_or_above_the_models_vocabulary_name_the_shard(shard_dir):
    """Shards of a 512-token tokenizer read for a model of vocab_size 300 (a manifest that hides it): the
    loader names the shard and the id before a row reaches the model (on a GPU: a device-side assert)."""
    with pytest.raises(DataError, match=r"shard-000000.tar: token id \d+ is not below the model's vocab_size 300"):
        take(iter(loader(shard_dir / "train", shuffle=False, vocab_size=300)), 5)
    assert len(take(iter(loader(shard_dir / "train", shuffle=False, vocab_size=512)), 5)) == 5


def test_after_a_stop_signal_closing_the_read_ahead_does_not_wait_for_a_stuck_reader():
    """A rank whose step failed after a stop signal (its peer left while waiting for data) closes its loader
    on the way out while the reader thread is still inside a request to a dead endpoint: it must not wait for
    that read (up to 30 s, past the launcher's 15-s grace: the rank was killed before it could say why).
    Found as a flake of test_faults.py::test_a_stop_signal_ends_a_wait_for_data."""
    stuck, interrupt = threading.Event(), threading.Event()

    def source():
        yield 1
        stuck.wait(60)  # the next read hangs, as botocore's retries against a dead endpoint do
        yield 2

    batches = _prefetched(source(), 1, interrupt, "the data sources")
    assert next(batches) == 1
    interrupt.set()  # the signal came; this wait did not end by it (the step failed elsewhere)
    started = time.monotonic()
    batches.close()
    waited = time.monotonic() - started
    stuck.set()
    assert waited < 5, f"closing waited {waited:.1f} s for the stuck reader"
