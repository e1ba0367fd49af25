"""Data mixtures: shares by weight, the same for any rank count, limits, exact resume, changed mixtures."""

from __future__ import annotations

import collections
import itertools
import json

import pytest

from data_prep.shards import ShardSettings, build_shards
from data_prep.storage import S3Options
from pipeline.data.manifests import DataError
from pipeline.data.mixture import MixSchedule, train_loader
from pipeline.jobspec import DataSpec


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory, builtin_docs, tokenizer):
    """Two shard sets of disjoint documents (a: 1,500 documents, b: 500), 32-token rows, several shards."""
    root = tmp_path_factory.mktemp("mix")
    for name, docs in (("a", builtin_docs[:1500]), ("b", builtin_docs[1500:2000])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        settings = ShardSettings(seq_len=32, shard_bytes=30_000, val_fraction=0.0)
        build_shards([str(root / f"{name}.jsonl")], str(tokenizer), str(root / name), settings, workers=0)
    return root


def spec(root, weights=(3, 1), **extra):
    sources = [{"name": n, "url": str(root / n / "train"), "weight": w} for n, w in zip("ab", weights, strict=False)]
    for key, value in extra.items():
        name, _, field = key.partition("__")
        next(s for s in sources if s["name"] == name)[field] = value
    return DataSpec(sources=sources, seq_len=32, shuffle_buffer=16, prefetch_batches=0)


def loaders(data, world=1, micro=4, accumulation=1, seed=5):
    return [
        train_loader(
            data,
            S3Options(),
            rank=r,
            world_size=world,
            micro_batch_size=micro,
            accumulation=accumulation,
            seed=seed,
        )
        for r in range(world)
    ]


def rows_of_set(path):
    from data_prep.inspect import iter_samples, read_manifest
    from data_prep.storage import open_store

    store = open_store(str(path))
    out = collections.Counter()  # the corpus repeats a few docstrings: rows can repeat too
    for shard in read_manifest(store)["shards"]:
        with store.open(shard["name"]) as f:
            out.update(tuple(t.tolist()) for _, t, _ in iter_samples(f, shard["name"]))
    return out


def steps(loader_list, n, accumulation=1):
    """n steps of rows: per step, every rank's micro batches in rank order."""
    its = [iter(ld) for ld in loader_list]
    out = []
    for _ in range(n):
        step = []
        for _ in range(accumulation):
            for it in its:
                step += [tuple(r.tolist()) for r in next(it).tokens]
        out.append(step)
    return out


def test_shares_follow_the_weights_identically_across_runs_and_rank_counts(two_sources):
    a_rows = rows_of_set(two_sources / "a" / "train")
    b_rows = rows_of_set(two_sources / "b" / "train")
    assert not set(a_rows) & set(b_rows)
    # 2,000 rows: 125 steps of 16 rows, on 1 rank (micro 8, accumulation 2) and on 2 (micro 8)
    one = steps(loaders(spec(two_sources), world=1, micro=8, accumulation=2), 125, accumulation=2)
    again = steps(loaders(spec(two_sources), world=1, micro=8, accumulation=2), 125, accumulation=2)
    two = steps(loaders(spec(two_sources), world=2, micro=8), 125)
    assert one == again
    shares = []
    for run in (one, two):
        rows = [r for step in run for r in step]
        assert len(rows) == 2000 and all(r in a_rows or r in b_rows for r in rows)
        shares.append([sum(r in a_rows for r in step) for step in run])  # rows of a in every step
    assert shares[0] == shares[1]  # the same sources in every step, whatever the rank count
    assert sum(shares[0]) == 1500  # 0.75 of 2,000: the carried fractions make it exact
    assert set(shares[0]) <= {12, 13}
    # every rank reads rows of its own: within the first epoch no row is used more often than it exists
    rows = collections.Counter(r for step in two for r in step)
    assert sum(a_rows.values()) > 1500 and sum(b_rows.values()) > 500
    assert all(count <= a_rows[r] + b_rows[r] for r, count in rows.items())


def by_position(loader_list, micro_batches):
    """``micro_batches`` micro batches of every rank, as {position in the run: row}."""
    out = {}
    for batches in zip(*[itertools.islice(iter(ld), micro_batches) for ld in loader_list], strict=True):
        for batch in batches:
            out.update({p: tuple(row.tolist()) for p, row in zip(batch.positions, batch.tokens, strict=True)})
    return out


def resumed(data, state, world, micro, accumulation):
    out = loaders(data, world=world, micro=micro, accumulation=accumulation)
    for loader in out:
        loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint keeps it
    return out


@pytest.mark.parametrize("prefetch", [0, 2])
def test_another_world_size_continues_at_the_same_row_of_every_source(two_sources, prefetch):
    """2 ranks of 2 rows accumulating 2 (a global batch of 8) stop after 21 micro batches (inside a step),
    go on as 1 rank of 8 rows, then as 4 ranks of 1 row accumulating 2, then as 2 ranks again: every
    position of the run holds the row the uninterrupted run has there (so the depth draws, a function of
    the positions, are the same too), each rank reading the streams its rows are in."""
    data = spec(two_sources).model_copy(update={"prefetch_batches": prefetch})
    uninterrupted = by_position(loaders(data, world=2, micro=2, accumulation=2), 200)  # 100 steps
    first = loaders(data, world=2, micro=2, accumulation=2)
    seen = by_position(first, 21)
    state = first[0].state_dict()
    assert state["schedule"]["step"] == 10 and state["rows"] == 4 and state["streams"] == 2
    one = resumed(data, state, world=1, micro=8, accumulation=1)  # its first micro batch spans two steps
    seen.update(by_position(one, 30))
    four = resumed(data, one[0].state_dict(), world=4, micro=1, accumulation=2)
    seen.update(by_position(four, 40))
    again = resumed(data, four[0].state_dict(), world=2, micro=2, accumulation=2)
    seen.update(by_position(again, (800 - 84 - 30 * 8 - 40 * 4) // 4))
    assert sorted(seen) == list(range(800)) and seen == uninterrupted
    assert four[0].state_dict()["stream_rows"] == 2  # the layout of the run that started the data
    # the per-source shares and every row used: no row skipped or repeated within the first pass
    a_rows = rows_of_set(two_sources / "a" / "train")
    assert sum(r in a_rows for r in seen.values()) == 600


def test_a_checkpoint_of_the_earlier_format_resumes_on_its_world_size(two_sources):
    """A checkpoint written before positions were counted in rows (micro batches of the writing run) resumes at
    the same row; on another world size each stream continues where it was."""
    data = spec(two_sources)
    reference = by_position(loaders(data, world=2, micro=2, accumulation=2), 40)
    first = loaders(data, world=2, micro=2, accumulation=2)
    head = by_position(first, 11)
    new = first[0].state_dict()
    old = {"format": "parcae-mixture/1", "schedule": new["schedule"], "micro": 1, "world_size": 2}
    old.update(sources=new["sources"], skipped_shards=[])
    tail = by_position(resumed(data, old, world=2, micro=2, accumulation=2), 29)
    assert {**head, **tail} == reference


def test_the_schedule_is_within_one_row_of_the_weights():
    schedule = MixSchedule(["x", "y", "z"], [0.5, 0.3, 0.2], [None] * 3, seed=1, streams=4, stream_rows=3,
                           global_batch=24)  # fmt: skip
    counts, state = collections.Counter(), schedule.initial_state()
    for step in range(1, 200):
        counts.update(schedule.plan(state))
        for i, w in enumerate([0.5, 0.3, 0.2]):
            assert abs(counts[i] - step * 24 * w) < 1
    assert state["used"]["x"] and sum(state["used"]["x"]) == counts[0]


def test_a_source_with_max_epochs_stops_and_the_others_take_its_rows(two_sources):
    """b (500 documents) at half the rows, one pass: it stops, a fills the steps, and no row of b repeats."""
    data = spec(two_sources, weights=(1, 1), b__max_epochs=1)
    (loader,) = loaders(data, micro=8)
    b_rows = rows_of_set(two_sources / "b" / "train")
    capacity = loader.streams[1].rows_in_epochs(1)
    run = steps([loader], 3 * capacity // 8)
    from_b = [r for step in run for r in step if r in b_rows]
    assert len(from_b) <= capacity and all(n <= b_rows[r] for r, n in collections.Counter(from_b).items())
    assert len(from_b) > capacity - 8  # it ran until the step that would have needed more
    assert "b" in loader.position["schedule"]["stopped"]
    assert all(r not in b_rows for r in run[-1])
    metrics = loader.metrics()
    assert metrics["data/b/share"] < 0.5 < metrics["data/a/share"]
    assert metrics["data/b/tokens"] == len(from_b) * 32
    # every source limited: the mixture ends with an error naming them
    data = spec(two_sources, weights=(1, 1), a__max_epochs=1, b__max_epochs=1)
    with pytest.raises(DataError, match=r"every source of the mixture has reached its max_epochs .*\(a, b\)"):
        steps(loaders(data, micro=8), 10_000)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_inside_a_step_continues_with_the_same_rows(two_sources, prefetch):
    data = spec(two_sources).model_copy(update={"prefetch_batches": prefetch})
    reference = [b.tokens for b in itertools.islice(iter(loaders(data, micro=4, accumulation=3)[0]), 40)]
    (first,) = loaders(data, micro=4, accumulation=3)
    it = iter(first)
    head = [b.tokens for b in itertools.islice(it, 17)]  # 5 steps and 2 micro batches of the 6th
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    assert state["rows"] == 8 and state["schedule"]["step"] == 5
    (resumed,) = loaders(data, micro=4, accumulation=3)
    resumed.load_state_dict(state)
    tail = [b.tokens for b in itertools.islice(iter(resumed), 23)]
    assert all((x == y).all() for x, y in zip(head + tail, reference, strict=True))


def test_a_changed_mixture_is_refused_or_applied_from_the_resumed_step(two_sources):
    (first,) = loaders(spec(two_sources), micro=8)
    list(itertools.islice(iter(first), 10))
    state = json.loads(json.dumps(first.state_dict()))
    (changed,) = loaders(spec(two_sources, weights=(1, 1)), micro=8)
    with pytest.raises(DataError, match=r"changed since the checkpoint at step 10: a.weight 3.0 -> 1.0"):
        changed.load_state_dict(state)
    data = spec(two_sources, weights=(1, 1)).model_copy(update={"on_mixture_change": "apply"})
    (applied,) = loaders(data, micro=8)
    applied.load_state_dict(state)
    assert applied.rows_used() == first.rows_used()  # each source continues where it was
    b_rows = rows_of_set(two_sources / "b" / "train")
    run = steps([applied], 50)
    assert sum(r in b_rows for step in run for r in step) == 200  # half of 400 rows from here on


def test_a_checkpoint_of_the_one_source_loader_resumes(two_sources):
    data = DataSpec(train_url=str(two_sources / "a" / "train"), seq_len=32, shuffle_buffer=16, prefetch_batches=0)
    (loader,) = loaders(data, micro=4)
    loader.load_state_dict({"epoch": 1, "batches": 3, "skipped_shards": []})
    assert loader.rows_used() == {"train": loader.streams[0].rows_in_epochs(1) + 12}
    assert next(iter(loader)).tokens.shape == (4, 33)


def test_sources_that_cannot_mix_are_refused_by_name(tmp_path, two_sources, corpus_jsonl, tokenizer):
    from data_prep.corpus import CorpusSpec, Problems, iter_documents
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    docs = iter_documents(CorpusSpec((str(corpus_jsonl),)), Problems())
    other = train_tokenizer(docs, TokenizerSettings(vocab_size=400, max_sample_chars=100_000), tmp_path / "other")
    assert other["vocab_size"] == 400
    settings = ShardSettings(seq_len=32, shard_bytes=30_000, val_fraction=0.0)
    build_shards([str(corpus_jsonl)], str(tmp_path / "other.model"), str(tmp_path / "c"), settings, workers=0)
    data = DataSpec(
        sources=[
            {"name": "a", "url": str(two_sources / "a" / "train"), "weight": 1},
            {"name": "c", "url": str(tmp_path / "c" / "train"), "weight": 1},
        ],
        seq_len=32,
    )
    with pytest.raises(DataError, match=r"data source 'c' .* another tokenizer .* than source 'a'"):
        loaders(data)
    long_rows = DataSpec(sources=[{"name": "a", "url": str(two_sources / "a" / "train"), "weight": 1}], seq_len=64)
    with pytest.raises(DataError, match=r"data source 'a': .*seq_len 32 .* data.seq_len is 64"):
        loaders(long_rows)
    missing = DataSpec(sources=[{"name": "gone", "url": str(tmp_path / "nothing"), "weight": 1}], seq_len=32)
    with pytest.raises(DataError, match=r"data source 'gone': .*no manifest"):
        loaders(missing)


def test_validate_lists_the_sources_and_refuses_a_mixture_that_runs_out(tmp_path, two_sources):
    import subprocess

    from tests.conftest import CONFIGS, REPO, parcae_cmd

    mix = [
        {"name": "a", "url": str(two_sources / "a" / "train"), "weight": 3, "max_epochs": 1},
        {"name": "b", "url": str(two_sources / "b" / "train"), "weight": 1, "max_epochs": 2},
    ]
    base = [*parcae_cmd(), "validate", str(CONFIGS / "demo-tiny.yaml"), "--set", "data.train_url=null"]
    base += ["--set", "tokenizer.path=null"]
    base += ["--set", "data.val_url=null", "--set", "data.seq_len=32", "--set", f"data.sources={json.dumps(mix)}"]
    ok = subprocess.run([*base, "--set", "training.total_steps=10"], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "a: " in ok.stdout and "weight 3 (75.0% of the rows), max_epochs 1" in ok.stdout
    assert "packing concat" in ok.stdout
    out = subprocess.run([*base, "--set", "training.total_steps=100000"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.sources: every source has max_epochs (a x 1, b x 2)" in out.stderr


def test_a_source_without_a_limit_repeats_with_a_new_shard_order(two_sources):
    (loader,) = loaders(spec(two_sources, weights=(1, 1)), micro=8)
    b_rows = rows_of_set(two_sources / "b" / "train")
    per_epoch = loader.streams[1].rows_per_epoch(0)
    run = steps([loader], 3 * per_epoch // 8)  # b's half of the rows: about 1.5 passes over it
    from_b = [r for step in run for r in step if r in b_rows]
    assert len(from_b) > per_epoch and "b" not in loader.position["schedule"]["stopped"]
    first, second = from_b[:per_epoch], from_b[per_epoch:]
    assert all(n <= b_rows[r] for r, n in collections.Counter(first).items())  # one pass: no row twice
    assert set(second) <= set(first) and second != first[: len(second)]  # the second pass, reshuffled
    assert 1.0 < loader.metrics()["data/b/epochs"] < 2.0
