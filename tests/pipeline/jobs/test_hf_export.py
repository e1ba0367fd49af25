"""`parcae export --format hf`: transformers loads the directory (remote code), gives our logits at 1 and at
several loop counts and our greedy tokens (generate() through its KV cache, one position per new token, as
without it; left-padded batches; beyond the context); lm-evaluation-harness scores it end to end on a local task
(nothing downloaded), with the log-likelihoods our model gives. This is the test that holds the remote-code copy
of the model (model/hf_template/modeling_parcae.py) to model/parcae.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ParcaeConfig, build_model, save_reference
from pipeline.jobs.hf_export import TEMPLATE
from tests.conftest import parcae_in_process
from tests.model.test_parcae import randomize

pytestmark = pytest.mark.slow

CFG = ParcaeConfig(vocab_size=512, d_model=64, n_head=2, n_prelude=1, n_core=2, n_coda=1, max_seq_len=64)
GPT = ParcaeConfig(arch="gpt", vocab_size=512, d_model=64, n_head=2, n_layers=3, max_seq_len=64)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def export(tmp_path: Path, cfg: ParcaeConfig, tokenizer: Path, name: str):
    model = randomize(build_model(cfg, seed=3), seed=4).eval()
    weights = save_reference(model, tmp_path / f"{name}.safetensors")
    out = tmp_path / f"{name}-hf"
    args = ["export", str(weights), "--format", "hf", "--out", str(out), "--tokenizer", str(tokenizer)]
    done = parcae_in_process(*args, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transformers loads it" in done.stdout
    return model, out


def test_the_remote_code_imports_only_torch_and_transformers():
    for name in ("configuration_parcae.py", "modeling_parcae.py"):
        tree = ast.parse((TEMPLATE / name).read_text())
        roots = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots <= {"math", "torch", "transformers"}, (name, roots)


@pytest.mark.parametrize("cfg", [CFG, GPT], ids=["parcae", "gpt"])
def test_transformers_gives_our_logits_and_greedy_tokens(tmp_path, tokenizer, cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, out = export(tmp_path, cfg, tokenizer, cfg.arch)
    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].startswith(
        "modeling_parcae"
    )
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for loops in [1, 3, 8] if cfg.looped else [None]:
        with torch.no_grad():
            theirs = hf(ids, loops=loops).logits
            kwargs = {"loops": loops, "h0": torch.zeros(2, 24, cfg.d_model)} if cfg.looped else {}
            ours = model(ids, **kwargs)[..., : cfg.vocab_size]
        assert float((theirs - ours).abs().max() / ours.abs().max()) < 1e-5, loops
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    prompt = tok("def f(x):", return_tensors="pt")["input_ids"]
    loops = 3 if cfg.looped else None
    seen: list[int] = []  # positions each forward computes: the prompt once, then one per new token
    hook = hf.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    generated = hf.generate(prompt, max_new_tokens=6, do_sample=False, loops=loops)  # through its KV cache
    hook.remove()
    assert seen == [prompt.shape[1], 1, 1, 1, 1, 1] or generated.shape[1] < prompt.shape[1] + 6, seen
    assert generated.tolist() == model.generate(prompt, 6, loops=loops).tolist()
    uncached = hf.generate(prompt, max_new_tokens=6, do_sample=False, loops=loops, use_cache=False)
    assert uncached.tolist() == generated.tolist()
    # a left-padded batch (attention_mask) gives each row what it gives alone, through the cache
    rows = [ids[0, :20], ids[1, :9]]
    batch = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for r, row in enumerate(rows):
        batch[r, 20 - len(row) :], mask[r, 20 - len(row) :] = row, 1
    out = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, loops=loops, pad_token_id=0)
    for r, row in enumerate(rows):
        alone = model.generate(row[None], 5, loops=loops, use_cache=False)
        assert out[r, 20:].tolist() == alone[0, len(row) :].tolist(), r
    # beyond the context the window slides without the cache, as our generation does
    long = hf.generate(prompt, max_new_tokens=70, min_new_tokens=70, do_sample=False, loops=loops)
    assert long.tolist() == model.generate(prompt, 70, loops=loops).tolist()


def test_lm_evaluation_harness_scores_the_export_with_our_log_likelihoods(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    model, out = export(tmp_path, CFG, tokenizer, "lm")
    docs = [
        {"context": "def f(x):\n    return", "choices": [" x", " banana", " 12"], "gold": 0},
        {"context": "The following", "choices": [" example", " zzzz"], "gold": 0},
        {"context": "import", "choices": [" os", " the"], "gold": 1},
        {"context": "Return the", "choices": [" value", " qqq", " of"], "gold": 2},
    ]
    task = tmp_path / "tasks"
    task.mkdir()
    (task / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (task / "parcae_local.yaml").write_text(
        "task: parcae_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    )
    loops = 2
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
        "--model_args", f"pretrained={out},trust_remote_code=True,loops={loops}",
        "--tasks", "parcae_local", "--include_path", str(task), "--device", "cpu", "--batch_size", "1",
        "--output_path", str(tmp_path / "results"), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **OFFLINE}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    accuracy = results["results"]["parcae_local"]["acc,none"]
    # by hand: the harness's tokenization (context, then the rest of context + continuation), our model
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    correct, by_hand = 0, []
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tok(doc["context"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logits = model(ids[:, :-1], loops=loops, h0=torch.zeros(1, ids.shape[1] - 1, CFG.d_model))
            logprobs = logits[0, :, : CFG.vocab_size].log_softmax(-1)
            targets = whole[len(context) :]
            positions = range(len(context) - 1, len(whole) - 1)
            scores.append(sum(float(logprobs[p, t]) for p, t in zip(positions, targets, strict=True)))
        by_hand.append(scores)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    assert accuracy == pytest.approx(correct / len(docs))
    samples = [
        json.loads(x)
        for f in (tmp_path / "results").rglob("samples_parcae_local*.jsonl")
        for x in f.read_text().splitlines()
    ]
    for sample in samples:
        theirs = [float(r[0][0]) for r in sample["resps"]]
        assert theirs == pytest.approx(by_hand[sample["doc_id"]], abs=1e-4)
