"""Precision of the loop state: everything bf16 against the reference's bf16 mixed precision (fp32 weights
under autocast: bf16 matmuls, fp32 residual stream, e and h), both against fp32, on a trained tiny model.

Trains a tiny Parcae in fp32 on the embedded corpus, then, on validation rows with h_0 = 0:
  - the drift of the final state h_T and of the logits from fp32's, for T = 1 .. 32 (relative L2 error);
  - the validation loss at T = 1, 4, 16, 32 in each precision;
  - the training step time (forward, backward, optimizer) of each precision, measured in alternating rounds
    in this one process (these machines are noisy), as ratios to fp32.

    .venv/bin/python bench/precision.py [--steps 300] [--d-model 128]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

LOOPS = [1, 2, 4, 8, 16, 32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timing-rounds", type=int, default=5)
    args = parser.parse_args()
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.storage import S3Options
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer
    from model import ParcaeConfig, build_model, sample_loop_counts, seeded_generator
    from pipeline.data.loader import rows_loader

    cfg = ParcaeConfig(
        vocab_size=2048, d_model=args.d_model, n_head=2, n_prelude=2, n_core=2, n_coda=2,
        max_seq_len=args.seq_len, mean_recurrence=4, mean_backprop_depth=2, h0_init="zeros",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_tokenizer(
            iter_documents(CorpusSpec((BUILTIN,)), Problems()), TokenizerSettings(vocab_size=2048), root / "t"
        )
        build_shards(
            [BUILTIN], str(root / "t.model"), str(root / "s"),
            ShardSettings(seq_len=args.seq_len, shard_bytes=400_000, val_fraction=0.02), workers=2, progress=False,
        )  # fmt: skip
        train = rows_loader(
            str(root / "s" / "train"), S3Options(), rank=0, world_size=1, batch_size=args.batch, seq_len=args.seq_len
        )
        val = rows_loader(
            str(root / "s" / "val"), S3Options(), rank=0, world_size=1, batch_size=8, seq_len=args.seq_len
        )
        batches = [b for _, b in zip(range(args.steps), itertools.cycle(iter(train)), strict=False)]
        val_batches = [b for _, b in zip(range(8), val, strict=False)]

    model = build_model(cfg, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.0)
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        loops = sample_loop_counts(args.batch, 4, 2, seeded_generator("loops", 0, 0, step, 0))
        loss = model(batch[:, :-1], batch[:, 1:], loops=loops)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    seconds = time.perf_counter() - started
    print(f"trained d={args.d_model}, 2/2/2 layers, {args.steps} steps in {seconds:.0f} s, last loss {loss.item():.3f}")
    model.eval()
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    variants = {
        "fp32": (model, nullcontext),
        "bf16 mixed (autocast, fp32 state)": (model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        "everything bf16": (bf16_model, nullcontext),
    }

    def final_state_and_logits(m, ctx, x: torch.Tensor, loops: int):
        captured = []
        hook = m.transformer.recurrence.register_forward_hook(lambda _m, _i, out: captured.append(out))
        with torch.no_grad(), ctx():
            logits = m(x, loops=loops)
        hook.remove()
        return captured[-1].float(), logits.float()

    x = torch.cat([b[:, :-1] for b in val_batches[:2]])
    print("\ndrift from fp32 (relative L2 error) of h_T / of the logits, validation rows, h_0 = 0:")
    print(f"  {'T':>3}  " + "  ".join(f"{name:>36}" for name in list(variants)[1:]))
    reference = {t: final_state_and_logits(model, nullcontext, x, t) for t in LOOPS}
    for t in LOOPS:
        cells = []
        for m, ctx in list(variants.values())[1:]:
            h, logits = final_state_and_logits(m, ctx, x, t)
            rh = float((h - reference[t][0]).norm() / reference[t][0].norm())
            rl = float((logits - reference[t][1]).norm() / reference[t][1].norm())
            cells.append(f"{rh:17.2e} / {rl:.2e}")
        print(f"  {t:>3}  " + "  ".join(f"{c:>36}" for c in cells))

    print("\nvalidation loss (nats/token) by test-time loops:")
    print(f"  {'precision':<36}" + "".join(f"{'T=' + str(t):>10}" for t in (1, 4, 16, 32)))
    for name, (m, ctx) in variants.items():
        row = []
        for t in (1, 4, 16, 32):
            with torch.no_grad(), ctx():
                losses = [float(m(b[:, :-1], b[:, 1:], loops=t)) for b in val_batches]
            row.append(sum(losses) / len(losses))
        print(f"  {name:<36}" + "".join(f"{v:10.4f}" for v in row))

    shape = f"batch {args.batch} x {args.seq_len}, mean recurrence 4, backprop 2"
    print(f"\ntraining step time ({shape}), alternating rounds:")
    step_models = {
        "fp32": (copy.deepcopy(model).train(), nullcontext),
        "bf16 mixed (autocast, fp32 state)": (
            copy.deepcopy(model).train(),
            lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        ),
        "everything bf16": (copy.deepcopy(model).to(torch.bfloat16).train(), nullcontext),
    }
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in step_models.items()}
    times: dict[str, list[float]] = {k: [] for k in step_models}
    for round_ in range(args.timing_rounds + 1):
        for name, (m, ctx) in step_models.items():
            start = time.perf_counter()
            for i in range(5):
                batch = batches[(round_ * 5 + i) % len(batches)]
                loops = sample_loop_counts(args.batch, 4, 2, seeded_generator("loops", 1, 0, i, 0))
                with ctx():
                    loss = m(batch[:, :-1], batch[:, 1:], loops=loops)
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) / 5)
    base = statistics.median(times["fp32"])
    for name, ts in times.items():
        print(f"  {name:<36} {1000 * statistics.median(ts):8.1f} ms/step   {statistics.median(ts) / base:5.2f}x fp32")
    print(f"threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
