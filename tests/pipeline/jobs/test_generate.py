"""`parcae generate`: the tokens `ParcaeLM.generate` gives for the prompt's ids, streamed or as JSON, with and
without the cache; a batch of prompts; bad input named. (A tokenizer.json: tests/data_prep/test_hf_tokenizer.py.)"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from data_prep.tokenizer import BOS_ID, TextTokenizer
from model import ParcaeConfig, build_model, load_pretrained, save_reference
from tests.conftest import parcae_in_process, parcae_refuses
from tests.icl_bundles import TASKS_CFG as CFG


def run(*args: str) -> subprocess.CompletedProcess:
    return parcae_in_process("generate", *args)


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_generate_gives_the_models_tokens(tmp_path, tokenizer, tasks_model):
    weights = tasks_model[1]  # trained on the sample bundle's texts: it completes its prompts
    text = TextTokenizer(tokenizer)
    prompts = ["The apple is =>", "one two three"]
    args = [str(weights), "--tokenizer", str(tokenizer), "--max-new-tokens", "6", "--loops", "3"]
    streamed = run(*args, "--prompt", prompts[0])
    assert streamed.returncode == 0, streamed.stderr
    model = load_pretrained(weights)
    ids = torch.tensor([[BOS_ID, *text.encode([prompts[0]])[0]]])
    expected = model.generate(ids, 6, loops=3)[0, ids.shape[1] :].tolist()
    if text.eos_id in expected:
        expected = expected[: expected.index(text.eos_id)]
    whole = text.decode([*ids[0, 1:].tolist(), *expected])
    assert streamed.stdout.rstrip("\n") == whole and "tokens/s; 3 loops, KV cache" in streamed.stderr
    uncached = run(*args, "--prompt", prompts[0], "--no-cache")
    assert uncached.stdout == streamed.stdout and "no cache" in uncached.stderr
    batch = run(*args, "--prompt", prompts[0], "--prompt", prompts[1], "--json")
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts and rows[0]["tokens"] == expected and rows[0]["loops"] == 3
    assert whole == text.decode(ids[0, 1:].tolist()) + rows[0]["completion"]
    # adaptive depth with an infinite threshold stops every token after its second loop (the first new token
    # comes from the prefill, at --loops); one cache slot per core layer
    adaptive = run(*args, "--prompt", prompts[0], "--adaptive", "1e30", "--cache-slots", "1", "--json")
    row = json.loads(adaptive.stdout)
    assert row["adaptive"] == 1e30 and row["cache_slots"] == 1 and row["loops"] == 3, adaptive.stderr
    assert len(row["tokens"]) < 2 or row["mean_loops"] == 2.0
    file = tmp_path / "prompts.txt"
    file.write_text(f"{prompts[1]}\n\n{prompts[0]}\n")
    from_file = run(*args, "--prompt-file", str(file), "--json")
    assert [json.loads(line)["prompt"] for line in from_file.stdout.splitlines()] == prompts[::-1]


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_generate_names_what_is_wrong(tmp_path, tokenizer):
    weights = save_reference(build_model(CFG, seed=0), tmp_path / "w.safetensors")

    def refused(model: str, *args: str) -> subprocess.CompletedProcess:
        return parcae_refuses("generate", model, "--tokenizer", str(tokenizer), *args)

    nothing = refused(str(weights))
    assert nothing.returncode == 2 and "give --prompt TEXT" in nothing.stderr and "Traceback" not in nothing.stderr
    zero = refused(str(weights), "--prompt", "a", "--max-new-tokens", "0")
    assert zero.returncode == 2 and "--max-new-tokens: at least 1" in zero.stderr
    slots = refused(str(weights), "--prompt", "a", "--cache-slots", "2", "--no-cache")
    assert slots.returncode == 2 and "--cache-slots works on the KV cache: leave out --no-cache" in slots.stderr
    gpt = save_reference(
        build_model(ParcaeConfig(arch="gpt", vocab_size=512, d_model=64, n_head=2, n_layers=2)),
        tmp_path / "g.safetensors",
    )
    loops = refused(str(gpt), "--prompt", "a", "--loops", "2")
    assert loops.returncode == 2 and "the GPT baseline has no loops" in loops.stderr
    long = refused(str(weights), "--prompt", "a b", "--prompt", "one " * 40)
    assert long.returncode == 2 and "exceeds the model's context (64)" in long.stderr, long.stderr
