"""The sample eval bundle (pipeline/evaluation/sample_bundle.py) and a tiny model trained on its texts."""

from __future__ import annotations

from pathlib import Path

from model import ParcaeConfig
from pipeline.evaluation.sample_bundle import COLORS, NUMBERS, make_bundle

__all__ = ["COLORS", "NUMBERS", "TASKS_CFG", "make_bundle", "train_on_tasks"]

# the model the downstream and generation tests train on the bundle's texts (`tasks_model` in tests/conftest.py)
TASKS_CFG = ParcaeConfig(vocab_size=512, d_model=64, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=64)


def train_on_tasks(model, bundle: Path, tokenizer: Path, steps: int, loops: int = 2):
    """``model`` trained (AdamW, full batch) on the gold texts of every item of the bundle's CORE and
    Core-Extended tasks, as prompted with few-shot seed 1234 and cut to its context."""
    import torch

    from data_prep.tokenizer import BOS_ID, TextTokenizer
    from pipeline.evaluation.bundle import Bundle
    from pipeline.evaluation.downstream import Suite, prompt_items

    suite = Suite.load(Bundle(str(bundle)), ["core", "core-extended"], None)
    width = model.cfg.max_seq_len
    rows = [
        list(p.keys[p.gold or 0][0]) for p in prompt_items(suite, TextTokenizer(tokenizer).encode, BOS_ID, width, 1234)
    ]
    ids = torch.full((len(rows), width), BOS_ID, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, tokens in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        targets[r, : len(tokens) - 1] = torch.tensor(tokens[1:])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(ids, targets, loops=loops)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), loss.item()
