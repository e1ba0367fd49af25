"""Downstream scoring speed, and what the periodic downstream evaluation costs a training run.

1. Items per second of `evaluate_downstream` on configs/demo-tiny.yaml's model (d=64, 1/1/1 layers,
   context 128) over a small bundle in DCLM's layout (tests/icl_bundles.py: multiple choice with 3 shots,
   schema with 2, language modelling with 1 and 8), at the spec's loop counts 1 2 4 8, h_0 = 0, one
   process: batched (the default 8,192 tokens per forward) against one row per forward, alternating rounds,
   the median of each.
2. The share of training time: `parcae train` of demo-tiny on 2 ranks (ZeRO-3, gloo) with eval.downstream
   scoring the bundle's CORE and Core-Extended every --interval steps; from the run's own numbers (the
   median step time, the logged `downstream/seconds` per item) the share the defaults would take:
   interval_steps 5,000 and max_per_task 100 over CORE's 22 tasks (2,200 items).

    .venv/bin/python bench/downstream.py [--rounds 3] [--steps 40] [--interval 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_INTERVAL, DEFAULT_ITEMS = 5000, 22 * 100


def items_per_second(bundle: Path, tokenizer: Path, rounds: int) -> dict[str, float]:
    from data_prep.tokenizer import TextTokenizer
    from model import build_model
    from pipeline.evaluation.bundle import Bundle
    from pipeline.evaluation.downstream import Suite, evaluate_downstream, forward_at
    from pipeline.evaluation.text import prompt_start
    from pipeline.jobspec import load_spec

    spec = load_spec(REPO / "configs" / "demo-tiny.yaml").spec
    model = build_model(spec.model.build(), seed=0).eval()
    suite = Suite.load(Bundle(str(bundle)), ["core", "core-extended"], None)
    text = TextTokenizer(tokenizer)
    start = prompt_start(text)
    n_items = sum(len(v) for v in suite.items.values())
    loops = list(spec.eval.loop_counts)
    times: dict[str, list[float]] = {"batched": [], "one row per forward": []}
    for _ in range(rounds):
        for name, budget in (("batched", 8192), ("one row per forward", 1)):
            t0 = time.perf_counter()
            with torch.no_grad():
                evaluate_downstream(
                    forward_at(model, model.cfg.d_model),
                    suite,
                    encode=text.encode,
                    prefix=start,
                    pad=start,
                    max_len=model.cfg.max_seq_len,
                    loop_counts=loops,
                    batch_tokens=budget,
                )
            times[name].append(time.perf_counter() - t0)
    return {name: n_items * len(loops) / statistics.median(t) for name, t in times.items()} | {
        "items": n_items,
        "loop_counts": len(loops),
    }


def training_share(root: Path, bundle: Path, tokenizer: Path, args: argparse.Namespace) -> dict[str, float]:
    run_dir = root / "run"
    sets = [
        f"data.train_url={root / 's' / 'train'}",
        f"data.val_url={root / 's' / 'val'}",
        f"tokenizer.path={tokenizer}",
        f"run_dir={run_dir}",
        f"training.total_steps={args.steps}",
        "logging.log_interval=1",
        f"eval.interval_steps={10 * args.steps}",
        f"eval.downstream.bundle={bundle}",
        "eval.downstream.tasks=[core, core-extended]",
        f"eval.downstream.interval_steps={args.interval}",
        f"checkpoint.interval_steps={10 * args.steps}",
    ]
    cmd = [sys.executable, "-m", "pipeline", "train", str(REPO / "configs" / "demo-tiny.yaml")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([*cmd, *[f"--set={s}" for s in sets]], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"training failed\n{done.stderr[-3000:]}")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > 5]
    evals = [r["downstream/seconds"] for r in records if "downstream/seconds" in r]
    return {"step_s": statistics.median(steps), "eval_s": statistics.median(evals), "evals": len(evals)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=20)
    args = parser.parse_args()
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer
    from tests.icl_bundles import make_bundle

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_tokenizer(
            iter_documents(CorpusSpec((BUILTIN,)), Problems()), TokenizerSettings(vocab_size=2048), root / "t"
        )
        tokenizer = root / "t.model"
        settings = ShardSettings(seq_len=64, shard_bytes=200_000, val_fraction=0.03)
        build_shards([BUILTIN], str(tokenizer), str(root / "s"), settings, workers=2, progress=False)
        bundle = make_bundle(root / "eval_bundle")
        speed = items_per_second(bundle, tokenizer, args.rounds)
        share = training_share(root, bundle, tokenizer, args)
    n, loops = speed["items"], speed["loop_counts"]
    print(f"1. scoring {n} items at {loops} loop counts, one process (items x loop counts per second, median):")
    for name in ("batched", "one row per forward"):
        print(f"   {name:<22} {speed[name]:8.1f} items/s")
    print(f"   batched / one row per forward: {speed['batched'] / speed['one row per forward']:.2f}x")
    per_item = share["eval_s"] / n  # every loop count of one item, on 2 ranks
    eval_default = per_item * DEFAULT_ITEMS
    train_default = share["step_s"] * DEFAULT_INTERVAL
    print(
        f"2. parcae train, 2 ranks: median step {1000 * share['step_s']:.1f} ms; a downstream eval of {n} items at "
        f"{loops} loop counts {share['eval_s']:.2f} s ({1000 * per_item:.1f} ms per item), {share['evals']} evals"
    )
    print(
        f"   at the defaults (every {DEFAULT_INTERVAL} steps, {DEFAULT_ITEMS} items): {eval_default:.1f} s of eval per "
        f"{train_default:.0f} s of training = {100 * eval_default / (eval_default + train_default):.1f}% of the time"
    )


if __name__ == "__main__":
    main()
