"""What a loop costs at inference, at tiny scale on CPU: a Parcae model at T = 1, 2, 4, 8 loops
against the GPT baseline with the same unique layers (same parameter count, bar the injection and C) and
one with twice the layers; then what the bounded caches and adaptive depth cost in quality.

Three models are trained with `parcae train` on the embedded corpus (1 CPU rank, same data, steps, lr
and seed; tokenizer and shards are prepared in WORKDIR and reused when rerun, finished runs too):
Parcae d=128, prelude/core/coda 1/2/1, mean recurrence 4, backprop depth 2; GPT with 4 layers; GPT with 8.
Then, side by side in this process: prefill latency of a PROMPT-token prompt (batch 1), greedy decode
tokens/s of NEW tokens through the KV cache, the cache's bytes per token, and the validation loss (full
forward over the val rows, h_0 = 0). For the Parcae model at T = 4 and 8: bounded caches (k slots per core
layer) and adaptive depth (KL thresholds, at most T loops): greedy-token agreement with the exact cache
over the val prompts, and the loss of the val text read one token at a time through the cache after a
PROMPT-token prefix (`model.generation.score_cached`).

    .venv/bin/python bench/inference.py [--workdir runs/inference] [--steps 400] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from workdir import REPO, parcae, prepare_corpus

sys.path.insert(0, str(REPO))


PARCAE = {"arch": "parcae", "n_prelude": 1, "n_core": 2, "n_coda": 1, "mean_recurrence": 4, "mean_backprop_depth": 2}
MODELS = {
    "parcae 1/2/1": PARCAE,
    "gpt 4 layers": {"arch": "gpt", "n_layers": 4},
    "gpt 8 layers": {"arch": "gpt", "n_layers": 8},
}


def prepare(work: Path, steps: int) -> dict[str, Path]:
    tok, shards = prepare_corpus(work, seq_len=256)
    common = [
        f"tokenizer.path={tok}",
        f"data.train_url={shards / 'train'}",
        f"data.val_url={shards / 'val'}",
        "data.seq_len=256",
        "cluster.procs_per_node=1",
        f"training.total_steps={steps}",
        "logging.log_interval=50",
        f"eval.interval_steps={steps}",
        f"checkpoint.interval_steps={steps}",
        "checkpoint.keep_last=1",
    ]
    base = yaml.safe_load((REPO / "configs" / "demo-tiny.yaml").read_text())
    runs = {}
    for name, shape in MODELS.items():
        run = work / "runs" / name.replace(" ", "-").replace("/", "")
        if not (run / "checkpoints" / "LATEST").is_file():  # trained before: reused
            spec = work / f"{run.name}.yaml"
            model = {"vocab_size": 2048, "d_model": 128, "n_head": 2, "max_seq_len": 256, **shape}
            spec.write_text(yaml.safe_dump({**base, "name": run.name, "model": model}))
            parcae("train", str(spec), *[f"--set={o}" for o in [*common, f"run_dir={run}"]])
        runs[name] = run
    return runs


def val_rows(shards: Path, n: int) -> torch.Tensor:
    from data_prep.storage import S3Options
    from pipeline.data.loader import rows_loader

    loader = rows_loader(str(shards / "val"), S3Options.from_env(None), rank=0, world_size=1, batch_size=8, seq_len=256)
    rows = [row for _, batch in zip(range(loader.batches_per_epoch(0)), loader, strict=False) for row in batch]
    return torch.stack(rows[:n]).long()


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_seconds(model, prompt: torch.Tensor, new: int, loops: int | None) -> float:
    """Time of the new tokens after the first (the prefill and the first token are not counted)."""
    steps = model.stream(prompt, new, loops=loops)
    next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return time.perf_counter() - start


@torch.no_grad()
def val_loss(model, rows: torch.Tensor, loops: int | None) -> float:
    x, y = rows[:, :-1], rows[:, 1:]
    kwargs = {"loops": loops, "h0": torch.zeros(*x.shape, model.cfg.d_model)} if model.cfg.looped else {}
    return float(model(x, y, **kwargs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/inference")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--val-rows", type=int, default=32)
    args = parser.parse_args()
    from model.cache import KVCache
    from model.generation import score_cached
    from pipeline.jobs.evaluate import load_source

    work = (REPO / args.workdir).resolve()
    runs = prepare(work, args.steps)
    rows = val_rows(work / "shards", args.val_rows)
    prompt = rows[:1, : args.prompt]
    print(
        f"\n{args.steps} training steps each; {len(rows)} val rows of 256 tokens; a {args.prompt}-token prompt, "
        f"{args.new} new greedy tokens, batch 1, median of {args.rounds}; threads {torch.get_num_threads()}\n"
    )
    print("| model | params | T | prefill ms | decode tokens/s | cache bytes/token | val loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    looped = None
    for name, run in runs.items():
        model = load_source(str(run), None, None).model.eval()
        cfg = model.cfg
        for loops in (1, 2, 4, 8) if cfg.looped else (None,):

            def prefill(model=model, loops=loops):
                cache = KVCache(torch.ones(1, args.prompt + args.new, dtype=torch.bool))
                model.forward_cached(prompt, cache, loops)
                return cache

            prefill_s = timed(prefill, args.rounds)
            decode = (args.new - 1) / statistics.median(
                decode_seconds(model, prompt, args.new, loops) for _ in range(args.rounds)
            )
            per_token = prefill().nbytes() / (args.prompt + args.new)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(
                f"| {name} | {params:.2f}M | {loops or '-'} | {prefill_s * 1e3:.1f} | "
                f"{decode:.0f} | {per_token:.0f} | {val_loss(model, rows, loops):.3f} |"
            )
        if cfg.looped:
            looped = model
    assert looped is not None
    model, prompts, text = looped, rows[:8, : args.prompt], rows[:8]
    print("\nParcae through the cache: bounded caches and adaptive depth against the exact cache")
    print("| T (max) | cache | mean loops | token agreement | loss read through the cache | tokens/s (batch 8) |")
    print("|---:|---|---:|---:|---:|---:|")
    for loops in (4, 8):
        exact = model.generate(prompts, args.new, loops=loops)[:, args.prompt :]
        variants = [("exact", {}), *[(f"{k} slot(s)", {"core_slots": k}) for k in (1, 2)]]
        variants += [(f"adaptive KL<{kl:g}", {"adaptive": kl}) for kl in (1e-2, 1e-3, 1e-4)]
        for label, kwargs in variants:
            start = time.perf_counter()
            out = model.generate(prompts, args.new, loops=loops, **kwargs)[:, args.prompt :]
            rate = prompts.shape[0] * args.new / (time.perf_counter() - start)
            agreement = float((out == exact).float().mean())
            losses, used = score_cached(model, text, args.prompt, loops, **kwargs)
            mean_loops = float(used[:, 1:].float().mean())
            print(
                f"| {loops} | {label} | {mean_loops:.2f} | {agreement:.3f} | {float(losses.mean()):.4f} | {rate:.0f} |"
            )


if __name__ == "__main__":
    main()
