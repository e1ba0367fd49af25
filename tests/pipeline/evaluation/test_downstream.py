"""Downstream scoring (CORE / Core-Extended): prompts and spans of the three task types, cropping, a tiny
model trained on the task texts against a random one, a cross-check with plain unbatched forwards, scores
aggregated by hand, bundles read from a folder, a zip and s3://, and bad bundles named."""

from __future__ import annotations

import json
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.tokenizer import BOS_ID, TextTokenizer
from model import ParcaeConfig, build_model, load_pretrained
from pipeline.evaluation.bundle import Bundle, BundleError
from pipeline.evaluation.downstream import (
    Suite,
    crop,
    evaluate_downstream,
    fewshot,
    forward_at,
    prompt_items,
    render,
    spans,
)
from tests.icl_bundles import COLORS, NUMBERS
from tests.icl_bundles import TASKS_CFG as CFG


@pytest.fixture(scope="module")
def bundle(tasks_model) -> Path:
    return tasks_model[0]


@pytest.fixture(scope="module")
def suite(bundle) -> Suite:
    return Suite.load(Bundle(str(bundle)), ["core", "core-extended"], None)


@pytest.fixture(scope="module")
def text(tokenizer) -> TextTokenizer:
    return TextTokenizer(tokenizer)


def score(model, suite, text, loops=(2,), seeds=(1234,), **kwargs):
    with torch.no_grad():
        return evaluate_downstream(
            forward_at(model.eval(), CFG.d_model),
            suite,
            encode=text.encode,
            prefix=BOS_ID,
            pad=BOS_ID,
            max_len=CFG.max_seq_len,
            loop_counts=list(loops) if loops else None,
            seeds=list(seeds),
            keep_items=True,
            **kwargs,
        )


@pytest.fixture(scope="module")
def trained(tasks_model):
    """A tiny model trained on the gold texts of every item (as prompted with seed 1234's few-shot)."""
    loss = float((tasks_model[1].parent / "loss.txt").read_text())
    assert loss < 0.3, loss
    return load_pretrained(tasks_model[1]).eval()


def test_prompts_of_each_task_type(suite, bundle):
    colors, pets, counting = (next(t for t in suite.tasks if t.label == n) for n in ("colors", "pets", "counting"))
    items = suite.items["colors"]
    shots = fewshot(items, 0, 3, 1234)
    others = [j for j in range(len(items)) if j != 0]
    assert shots == [items[j] for j in random.Random(1234).sample(others, 3)] and items[0] not in shots
    prompts = render(colors, items[0], shots)
    head = "".join(f"{s['query']} => {COLORS[s['gold']]}\n\n" for s in shots)
    assert prompts == [f"{head}{items[0]['query']} => {c}" for c in COLORS]
    pet = suite.items["pets"][3]
    ex = suite.items["pets"][5]
    assert render(pets, pet, [ex]) == [
        f"{ex['context_options'][ex['gold']]} {ex['continuation']}\n\n{option} {pet['continuation']}"
        for option in pet["context_options"]
    ]
    count, ex = suite.items["counting"][0], suite.items["counting"][1]
    without, with_ = render(counting, count, [ex])
    head = f"{ex['context'].strip()} {ex['continuation']}\n\n"
    assert without == f"{head}{count['context'].strip()}"  # the trailing delimiter is stripped
    assert with_ == f"{head}{count['context'].strip()} {count['continuation']}"
    # the items were shuffled once with the fixed seed; the cut takes the first ones
    cut = Suite.load(Bundle(str(bundle)), ["core"], 5)
    assert cut.items["colors"] == suite.items["colors"][:5]


def test_continuation_spans_of_each_type(suite, text):
    assert spans("multiple_choice", [[2, 5, 6, 7], [2, 5, 6, 8, 9]]) == [([2, 5, 6, 7], 3, 4), ([2, 5, 6, 8, 9], 3, 5)]
    assert spans("schema", [[2, 4, 8, 9], [2, 5, 6, 8, 9]]) == [([2, 4, 8, 9], 2, 4), ([2, 5, 6, 8, 9], 3, 5)]
    assert spans("language_modeling", [[2, 5, 6], [2, 5, 6, 7, 8]]) == [([2, 5, 6, 7, 8], 3, 5)]
    assert spans("multiple_choice", [[2, 5], [2, 5, 6]]) == [([2, 5], 1, 2), ([2, 5, 6], 1, 3)]  # never empty
    prompted = {p.task: p for p in prompt_items(suite, text.encode, BOS_ID, 10_000, 1234) if p.index == 0}
    for (tokens, start, end), choice in zip(prompted["colors"].keys, COLORS, strict=True):
        assert text.decode(list(tokens[start:end])).strip() == choice and end == len(tokens)
    for tokens, start, end in prompted["pets"].keys:
        assert text.decode(list(tokens[start:end])).strip() == suite.items["pets"][0]["continuation"]
    (tokens, start, end) = prompted["counting"].keys[0]
    assert text.decode(list(tokens[start:end])) == suite.items["counting"][0]["continuation"]
    assert tokens[0] == BOS_ID


def test_prompts_longer_than_the_context_keep_their_last_tokens(suite, text):
    assert crop(list(range(10)), 7, 10, 6) == ([4, 5, 6, 7, 8, 9], 3, 6, True)
    assert crop(list(range(10)), 2, 10, 6) == ([4, 5, 6, 7, 8, 9], 1, 6, True)
    long = [p for p in prompt_items(suite, text.encode, BOS_ID, CFG.max_seq_len, 1234) if p.task == "counting_long"]
    assert long and all(p.cropped for p in long)
    for p in long:
        (tokens, start, end) = p.keys[0]
        assert len(tokens) == CFG.max_seq_len and end == len(tokens)
        assert text.decode(list(tokens[start:end])) == suite.items["counting_long"][p.index]["continuation"]


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_a_model_trained_on_the_tasks_scores_far_above_a_random_one(trained, suite, text):
    good = score(trained, suite, text)["results"][0]
    bad = score(build_model(CFG, seed=3), suite, text)["results"][0]
    assert good["core"] > 0.6 and bad["core"] < 0.25, (good["core"], bad["core"])
    assert good["core_extended"] > 0.6 and good["tasks"]["colors"]["accuracy"] > 0.8
    assert good["tasks"]["counting_long"]["accuracy"] > 0.5  # scored on its cropped prompts


def test_scores_by_hand_and_a_cross_check_with_plain_forwards(trained, suite, text):
    report = score(trained, suite, text, loops=(1, 2), seeds=(1234, 7), batch_tokens=200)
    cropped = [p for p in prompt_items(suite, text.encode, BOS_ID, CFG.max_seq_len, 1234) if p.cropped]
    assert report["cropped_items"] == len(cropped) >= len(suite.items["counting_long"])
    for result in report["results"]:
        per_seed = {}
        for seed, items in result["items"].items():
            centered = {}
            for task in suite.tasks:
                hits = [r["correct"] for r in items if r["task"] == task.label]
                assert len(hits) == len(suite.items[task.label])
                accuracy = sum(hits) / len(hits)
                centered[task.label] = (accuracy - task.random_baseline) / (1 - task.random_baseline)
            per_seed[seed] = centered
        core = [statistics.fmean(c[t] for t in ("colors", "pets", "counting")) for c in per_seed.values()]
        assert result["core"] == pytest.approx(statistics.fmean(core), abs=1e-12)
        assert result["core_std"] == pytest.approx(statistics.stdev(core), abs=1e-12)
        extended = [statistics.fmean(c.values()) for c in per_seed.values()]
        assert result["core_extended"] == pytest.approx(statistics.fmean(extended), abs=1e-12)
        assert result["tasks"]["colors"]["centered"] == pytest.approx(
            statistics.fmean(c["colors"] for c in per_seed.values()), abs=1e-12
        )
    # plain forwards, one unpadded sequence at a time, at the same loop count and h0 = 0
    result = report["results"][1]
    picked = {(r["task"], r["index"]): r for r in result["items"][1234]}
    checked = 0
    for p in prompt_items(suite, text.encode, BOS_ID, CFG.max_seq_len, 1234):
        if p.task not in ("colors", "pets") or p.index % 4:
            continue
        losses = []
        for tokens, start, end in p.keys:
            ids = torch.tensor([tokens])
            with torch.no_grad():
                logits = trained(ids, loops=2, h0=torch.zeros(1, len(tokens), CFG.d_model))
            losses.append(float(F.cross_entropy(logits[0, start - 1 : end - 1], ids[0, start:end])))
        ours = picked[(p.task, p.index)]
        assert ours["pred"] == losses.index(min(losses)) and ours["losses"] == pytest.approx(losses, abs=1e-4)
        checked += 1
    assert checked >= 6


def test_a_bundle_reads_the_same_from_a_zip_and_from_s3(bundle, suite, s3_server, tmp_path):
    zipped = shutil.make_archive(str(tmp_path / "eval_bundle"), "zip", bundle.parent, bundle.name)
    from_zip = Suite.load(Bundle(zipped), ["core", "core-extended"], None)
    assert from_zip.items == suite.items and from_zip.tasks == suite.tasks
    bucket = s3_server.new_bucket("bundles")
    client = s3_server.client()
    for path in bundle.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"dclm/{path.relative_to(bundle)}")
    from data_prep.storage import S3Options

    options = S3Options.from_env(s3_server.endpoint)
    from_s3 = Suite.load(Bundle(f"s3://{bucket}/dclm", options), ["core", "core-extended"], None)
    assert from_s3.items == suite.items and from_s3.aggregates == suite.aggregates
    with pytest.raises(BundleError, match=rf"s3://{bucket}/nothing/core.yaml: no such file"):
        Suite.load(Bundle(f"s3://{bucket}/nothing", options), ["core"], None)


def broken(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(bundle, copy)
    return copy


def test_bad_bundles_are_named_with_the_file_and_field(bundle, tmp_path):
    copy = broken(bundle, tmp_path)
    (copy / "eval_meta_data.csv").unlink()
    with pytest.raises(BundleError, match=r"broken/eval_meta_data.csv: no such file in the bundle"):
        Suite.load(Bundle(str(copy)), ["core"], None)
    shutil.rmtree(copy)

    copy = broken(bundle, tmp_path)
    path = copy / "eval_data" / "commonsense" / "pets.jsonl"
    lines = path.read_text().splitlines()
    item = json.loads(lines[2])
    del item["continuation"]
    lines[2] = json.dumps(item)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleError, match=r"pets.jsonl line 3: missing 'continuation'"):
        Suite.load(Bundle(str(copy)), ["core"], None)
    shutil.rmtree(copy)

    copy = broken(bundle, tmp_path)
    core = (copy / "core.yaml").read_text().replace("icl_task_type: schema", "icl_task_type: generation")
    (copy / "core.yaml").write_text(core)
    with pytest.raises(BundleError, match=r"core.yaml: icl_tasks\[1\] \(pets\): icl_task_type 'generation' is not one"):
        Suite.load(Bundle(str(copy)), ["core"], None)
    shutil.rmtree(copy)

    copy = broken(bundle, tmp_path)
    csv = (copy / "eval_meta_data.csv").read_text().splitlines()
    (copy / "eval_meta_data.csv").write_text("\n".join(line for line in csv if ",counting," not in line) + "\n")
    with pytest.raises(BundleError, match=r"eval_meta_data.csv: no 'Random baseline' for the task 'counting'"):
        Suite.load(Bundle(str(copy)), ["core"], None)
    (copy / "core_extended.yaml").unlink()
    with pytest.raises(BundleError, match=r"core_extended.yaml: no such file; Core-Extended needs"):
        Suite.load(Bundle(str(copy)), ["core-extended"], None)
    with pytest.raises(BundleError, match=r"--bundle .*nowhere: no such directory or .zip"):
        Bundle(str(tmp_path / "nowhere"))
    assert NUMBERS  # the counting items come from it


def test_the_gpt_baseline_is_scored_once_without_loops(suite, text):
    gpt = build_model(ParcaeConfig(arch="gpt", vocab_size=512, d_model=64, n_head=2, n_layers=2, max_seq_len=64))
    report = score(gpt, suite, text, loops=None)
    (result,) = report["results"]
    assert result["loops"] is None and {"core", "core_extended"} <= result.keys() and "core_std" not in result


def test_prompts_start_the_way_the_training_shards_start_documents(text):
    """A model trained on concat shards of our tokenizer never saw <bos>: every document there follows
    <eos>, so its prompts start with <eos>; bos-aligned shards, a tokenizer.json that frames documents
    with its own BOS, and weights without shards (the reference's protocol) start with BOS."""
    from pipeline.evaluation.text import document_start

    ours = {"kind": "sentencepiece", "bos_id": None, "eos_id": 3}
    concat = document_start(text, {"tokenizer": ours, "packing": {"kind": "concat"}})
    assert concat.id == 3 and "no <bos>" in concat.why
    older = document_start(text, {"tokenizer": ours})  # shard sets from before packing was recorded: concat
    assert older == concat
    aligned = document_start(text, {"tokenizer": ours, "packing": {"kind": "bos-aligned", "bos_id": 2}})
    assert aligned.id == 2 and "bos-aligned" in aligned.why
    hf = {"kind": "huggingface", "bos_id": 0, "eos_id": 1}
    assert document_start(text, {"tokenizer": hf, "packing": {"kind": "concat"}}).id == 0
    released = document_start(text, None)
    assert released.id == BOS_ID and "no shard set" in released.why
