"""Compile, precision and the chunked loss on this CPU, side by side in one run.

1. Matmul peak: dense square matmuls at 1024/2048/4096, fp32 and bf16, GFLOP/s (the best size).
2. Bare model, compiled (`ParcaeLM.compile_units`) against eager, the same batches and loop draws (mean
   recurrence 8, backprop depth 4, per-row counts): tokens/s and MFU against the fp32 peak, at the tiny
   config (d=64) and a wide one (d=512, 2/2/2 blocks, vocab 8192, 8 x 256 tokens); then where the compiled
   wide step's time goes (torch.profiler, by op family).
3. bf16-mixed (autocast, fp32 weights) against fp32, both compiled, wide config: tokens/s, and the training
   loss of --loss-steps steps (4 x 128 tokens) on the embedded corpus (the same rows and draws), from the
   --loss-seeds initialisations per precision (their spread is the noise).
4. Head + loss at vocab 32,768 (micro batch 8 x 2048, d=768): peak resident memory of its forward and
   backward, whole against chunked (each in a fresh process), and the time of a whole training step of a
   model with that head (d=512, 2/2/2, 4 x 1024 tokens), chunked against whole.
5. Compiled fp32 MFU and HFU at d=512 (`--only-mfu` widths), without and with per-loop activation
   checkpointing, against a matmul peak measured between the rounds of training steps.

Parts 2 and 3 run the model as `parcae train` does by default: with per-loop activation checkpointing, whose
recomputation MFU does not count (their MFU column is that MFU).

    .venv/bin/python bench/compile.py [--steps 10] [--loss-steps 200] [--skip-loss]
    .venv/bin/python bench/compile.py --only-memory | --only-mfu 512 1024 | --only-loss
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = {"vocab_size": 2048, "d_model": 64, "n_head": 2, "n_prelude": 1, "n_core": 1, "n_coda": 1}
WIDE = {"vocab_size": 8192, "d_model": 512, "n_head": 4, "n_prelude": 2, "n_core": 2, "n_coda": 2}


def peaks() -> dict[str, float]:
    from pipeline.training.peak import gemm_peak

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        out[str(dtype).removeprefix("torch.")] = max(gemm_peak(dtype, size, 1.0) for size in (1024, 2048, 4096))
    return out


def config(shape: dict, seq: int):
    from model import ParcaeConfig

    return ParcaeConfig(**shape, max_seq_len=seq, mean_recurrence=8, mean_backprop_depth=4)


def draws(cfg, micro: int, steps: int, vocab: int, seq: int):
    from model import loop_generator, sample_loop_counts

    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, vocab, (micro, seq + 1), generator=g),
            sample_loop_counts(micro, cfg.mean_recurrence, cfg.mean_backprop_depth, loop_generator(0, -1, s, 0)),
        )
        for s in range(steps)
    ]


def flops_per_token(cfg, seq: int, batches, recompute: bool = False) -> float:
    """`hardware_flops_per_token` (+ `recompute_flops_per_token` with ``recompute``) at the loop counts these
    batches actually drew: a few steps' mean recurrence is not the configured mean (and the sampler's mean
    backprop depth, E[min(T, k)], is below k), so the configured means would misstate MFU by several %."""
    from model import hardware_flops_per_token, recompute_flops_per_token

    no_grad = torch.cat([loops[0] for _, loops in batches]).double()
    grad = torch.cat([loops[1] for _, loops in batches]).double()
    means = {"mean_recurrence": float((no_grad + grad).mean()), "mean_backprop_depth": float(grad.mean())}
    flops = hardware_flops_per_token(cfg, seq, **means)
    return flops + (recompute_flops_per_token(cfg, seq, **means) if recompute else 0.0)


def train_rate(
    cfg, batches, compiled: bool, precision: str, warmup: int = 8, losses: list | None = None, seed: int = 0
) -> float:
    """Tokens/s of AdamW steps over ``batches`` after ``warmup`` steps (compiled: every variant compiled by the
    warm-up before the first step, as `parcae train` does); ``seed`` initialises the model. With ``losses``
    (a loss curve is wanted) the steps train as `parcae train` does: the learning rate warmed up over 20
    steps and the gradient norm clipped at 1.0 (without them this width diverges after ~50 steps)."""
    from model import build_model

    model = build_model(cfg, seed=seed)
    if compiled:
        model.compile_units()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            model.warm_up_compiled(batches[0][0].shape[1] - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, tokens = 0.0, 0
    for step, (rows, loops) in enumerate(batches):
        if step == warmup:
            start, tokens = time.perf_counter(), 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(rows[:, :-1], rows[:, 1:], loops=loops)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if losses is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.param_groups[0]["lr"] = optimizer.defaults["lr"] * min(1.0, (step + 1) / 20)
        optimizer.step()
        tokens += rows[:, 1:].numel()
        if losses is not None:
            losses.append(float(loss.detach()))
    return tokens / (time.perf_counter() - start)


def compiled_step(cfg, seq: int):
    """One fp32 AdamW step of a compiled model (every variant compiled now) on (rows, loops), as a function."""
    from model import build_model

    model = build_model(cfg, seed=0)
    model.compile_units()
    model.warm_up_compiled(seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(rows, loops) -> None:
        loss = model(rows[:, :-1], rows[:, 1:], loops=loops)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def profile_families(cfg, batches) -> list[tuple[str, float]]:
    """Share of the compiled step's self CPU time per op family (3 profiled steps after warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    step = compiled_step(cfg, batches[0][0].shape[1] - 1)
    for rows, loops in batches[:8]:
        step(rows, loops)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for rows, loops in batches[8:11]:
            step(rows, loops)
    families = {
        "matmul (mm, addmm, bmm, linear)": ("mm", "addmm", "bmm", "matmul", "linear"),
        "attention (sdpa)": ("scaled_dot_product", "attention", "flash"),
        "fused kernels (inductor)": ("cpp_fused", "compiled", "inductor", "graph"),
        "row selection (index, index_copy, nonzero)": ("index", "nonzero", "gather", "scatter", "where"),
        "optimizer (adamw)": ("adam", "_foreach", "lerp", "addcdiv", "sqrt"),
        "loss (cross entropy, log_softmax)": ("cross_entropy", "log_softmax", "nll_loss"),
        "copies and casts": ("copy", "to", "clone", "cat", "contiguous", "empty", "zeros", "fill"),
    }
    totals = {name: 0.0 for name in families} | {"other": 0.0}
    for event in prof.key_averages():
        name = event.key.lower()
        family = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        totals[family] += event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return sorted(((k, v / whole) for k, v in totals.items()), key=lambda kv: -kv[1])


def unfused(model) -> None:
    """The head as it was before it was fused: the whole batch's fp32 logits, then F.cross_entropy."""
    import types

    import torch.nn.functional as F

    def head(self, x, targets):
        logits = self.transformer.wte(self.transformer.ln_f(x), as_head=True).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    model._head = types.MethodType(head, model)


def head_memory(chunked: bool) -> dict[str, float]:
    """In this (fresh) process: the head and loss of micro batch 8 x 2048, d=768, vocab 32,768."""
    from model import ParcaeConfig, ParcaeLM

    cfg = ParcaeConfig(vocab_size=32768, d_model=768, n_head=6, n_prelude=1, n_core=1, n_coda=1, max_seq_len=2048)
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    model.to_empty(device="cpu")
    torch.nn.init.normal_(model.transformer.wte.weight, std=0.02)
    torch.nn.init.ones_(model.transformer.ln_f.weight)
    if not chunked:
        unfused(model)
    x = torch.randn(8, 2048, 768, requires_grad=True)
    targets = torch.randint(0, 32768, (8, 2048))
    import threading

    def rss() -> float:  # resident GiB now (the high-water mark of getrusage may predate the head)
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30

    base, peak, done = rss(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    loss = model._head(x, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return {"peak_gib": peak[0] - base, "seconds": seconds}


def step_time(chunked: bool, steps: int = 4) -> float:
    from model import build_model

    cfg = config({**WIDE, "vocab_size": 32768}, 1024)
    model = build_model(cfg, seed=0)
    if not chunked:
        unfused(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = draws(cfg, 4, steps + 1, 32768, 1024)
    for i, (rows, loops) in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        loss = model(rows[:, :-1], rows[:, 1:], loops=loops)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def corpus_batches(cfg, steps: int, micro: int, seq: int):
    """Rows of the embedded corpus (tokenizer and shards made here), shuffled, with the draws of `draws`."""
    import tempfile

    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.storage import S3Options
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer
    from pipeline.data.loader import rows_loader

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = iter_documents(CorpusSpec((BUILTIN,)), Problems())
        train_tokenizer(docs, TokenizerSettings(vocab_size=4096), root / "t")
        build_shards([BUILTIN], str(root / "t.model"), str(root / "s"), ShardSettings(seq_len=seq), workers=2)
        loader = rows_loader(
            str(root / "s" / "train"), S3Options(), rank=0, world_size=1, batch_size=micro, seq_len=seq
        )
        # the evaluation loader reads in document order; training shuffles: so do these rows (a fixed order,
        # the same for every run), or the curve follows the corpus's files rather than the learning
        every = torch.cat([b.clone() for _, b in zip(range(loader.batches_per_epoch(0)), loader, strict=False)])
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))
    rows = [every[order[(torch.arange(micro) + i * micro) % len(every)]] for i in range(steps)]
    loops = [d[1] for d in draws(cfg, micro, steps, 8, seq)]
    return list(zip(rows, loops, strict=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per variant (after 8 warm-up)")
    parser.add_argument("--loss-steps", type=int, default=200)
    parser.add_argument("--loss-seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="initialisations per precision")
    parser.add_argument("--skip-loss", action="store_true", help="part 3 without the loss comparison")
    parser.add_argument("--only-loss", action="store_true", help="only part 3's loss comparison")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--only-memory", action="store_true", help="part 4 only")
    parser.add_argument(
        "--only-mfu", type=int, nargs="+", metavar="D", help="only part 5, at these widths (2/2/2 blocks)"
    )
    args = parser.parse_args()
    if args.part:  # a fresh process for one memory measurement
        print(json.dumps(head_memory(args.part == "chunked")))
        return
    if args.only_memory:
        return memory_part()
    if args.only_mfu:
        return mfu_part(args.only_mfu)
    if args.only_loss:
        print("3. the loss, bf16-mixed vs fp32, compiled, wide d=512:")
        return loss_part(config(WIDE, 256), args.loss_steps, args.loss_seeds)
    peak = peaks()
    print(f"threads {torch.get_num_threads()}")
    print("1. matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
    print("2. bare model, compiled vs eager (the same batches and loop draws, mean recurrence 8, depth 4):")
    for label, shape, micro, seq in (("tiny d=64", TINY, 8, 128), ("wide d=512", WIDE, 8, 256)):
        cfg = config(shape, seq)
        batches = draws(cfg, micro, args.steps + 8, cfg.vocab_size, seq)
        flops = flops_per_token(cfg, seq, batches[8:])
        rates = {c: train_rate(cfg, batches, c, "fp32") for c in (False, True)}
        for compiled, rate in rates.items():
            mfu = flops * rate / peak["float32"]
            print(
                f"   {label:<11} {'compiled' if compiled else 'eager':<9} {rate:9.0f} tokens/s   MFU {mfu:.2f} (fp32)"
            )
        print(f"   {label:<11} compiled / eager {rates[True] / rates[False]:.2f}x")
    cfg = config(WIDE, 256)
    batches = draws(cfg, 8, 11, cfg.vocab_size, 256)
    print("   where the compiled wide step's time goes (self CPU time):")
    for family, share in profile_families(cfg, batches):
        print(f"     {family:<44} {100 * share:5.1f}%")
    print("3. bf16-mixed vs fp32, compiled, wide d=512:")
    batches = draws(cfg, 8, args.steps + 8, cfg.vocab_size, 256)
    fp32 = train_rate(cfg, batches, True, "fp32")
    bf16 = train_rate(cfg, batches, True, "bf16-mixed")
    print(f"   fp32 {fp32:.0f} tokens/s, bf16-mixed {bf16:.0f} tokens/s: {bf16 / fp32:.2f}x")
    if not args.skip_loss:
        loss_part(cfg, args.loss_steps, args.loss_seeds)
    memory_part()
    print("5. compiled fp32 MFU and HFU, without and with per-loop checkpointing:")
    mfu_part([512])


def loss_part(cfg, steps: int, seeds: list[int]) -> None:
    """The training loss of ``steps`` steps (4 x 128 tokens of the embedded corpus, the same rows and loop
    draws) in fp32 and bf16-mixed, compiled, from several initialisations each: the seeds' spread within a
    precision is the noise the difference between the precisions is held against."""
    import statistics

    rows = corpus_batches(cfg, steps, 4, 128)  # smaller steps: 200 of them in minutes
    last: dict[str, list[float]] = {"fp32": [], "bf16-mixed": []}
    for seed in seeds:
        for precision in last:
            curve: list[float] = []
            train_rate(cfg, rows, True, precision, warmup=0, losses=curve, seed=seed)
            last[precision].append(sum(curve[-20:]) / 20)
            marks = ", ".join(f"{sum(curve[i - 20 : i]) / 20:.3f}" for i in range(50, steps + 1, 50))
            print(f"   {precision:<10} init seed {seed}: mean loss of the 20 steps before 50, 100, ...: {marks}")
    for precision, values in last.items():
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"   {precision:<10} last-20 mean over the seeds {statistics.mean(values):.4f}, sd {spread:.4f}")
    pairs = [b - f for f, b in zip(last["fp32"], last["bf16-mixed"], strict=True)]
    error = statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan")
    print(f"   bf16-mixed - fp32, same seed: {statistics.mean(pairs):+.4f} (standard error {error:.4f})")


def mfu_part(widths: list[int], rounds: int = 3, steps: int = 3) -> None:
    """Compiled fp32 training MFU and HFU at each width (2/2/2 blocks, head_dim 128, 8 x 256 tokens), without
    activation checkpointing (the issue's condition, as its probe ran) and with per-loop checkpointing (the
    training default). The peak is measured between rounds of training steps (sustained 2048-square matmuls
    into a kept buffer, ~2 s a round), so both sides see the same machine; the best single call of
    `peaks()` (the older denominator, a maximum over short calls) is printed beside it."""
    import dataclasses

    best_call = peaks()["float32"]
    print(f"fp32 matmul peak, best single call of 1024/2048/4096 squares: {best_call / 1e9:.0f} GFLOP/s")
    micro, seq = 8, 256
    for d in widths:
        for checkpointing in (False, True):
            cfg = config({**WIDE, "d_model": d, "n_head": max(1, d // 128)}, seq)
            cfg = dataclasses.replace(cfg, activation_checkpointing=checkpointing)
            batches = draws(cfg, micro, 4 + rounds * steps, cfg.vocab_size, seq)
            rate, peak = interleaved_rate(cfg, batches, rounds, steps)
            model = flops_per_token(cfg, seq, batches[4:]) * rate
            executed = flops_per_token(cfg, seq, batches[4:], recompute=True) * rate
            print(
                f"   d={d} checkpointing {'on ' if checkpointing else 'off'}: {rate:.0f} tokens/s, sustained peak "
                f"{peak / 1e9:.0f} GFLOP/s: MFU {model / peak:.3f}, HFU {executed / peak:.3f} "
                f"(against the best call: MFU {model / best_call:.3f}, HFU {executed / best_call:.3f})"
            )


def interleaved_rate(cfg, batches, rounds: int, steps: int, seconds: float = 2.0) -> tuple[float, float]:
    """Compiled fp32 AdamW steps (every variant compiled and 4 steps run first) in ``rounds`` rounds of
    ``steps``, a sustained 2048-square matmul measurement after each: (tokens/s, matmul FLOP/s)."""
    step = compiled_step(cfg, batches[0][0].shape[1] - 1)
    for rows, loops in batches[:4]:
        step(rows, loops)
    a, b, out = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    train_s = tokens = gemm_s = gemm_flops = 0.0
    for r in range(rounds):
        start = time.perf_counter()
        for rows, loops in batches[4 + r * steps : 4 + (r + 1) * steps]:
            step(rows, loops)
            tokens += rows[:, 1:].numel()
        train_s += time.perf_counter() - start
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b, out=out)
            gemm_flops += 2 * 2048**3
        gemm_s += time.perf_counter() - start
    return tokens / train_s, gemm_flops / gemm_s


def memory_part() -> None:
    print("4. head + loss at vocab 32,768 (8 x 2048 positions, d=768), forward and backward, fresh processes:")
    measured = {}
    for part in ("whole", "chunked"):
        done = subprocess.run([sys.executable, __file__, f"--part={part}"], capture_output=True, text=True, check=True)
        measured[part] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"   {part:<8} peak +{measured[part]['peak_gib']:.2f} GiB, {measured[part]['seconds']:.2f} s")
    chunks = 8 * 2048 // (2**25 // 32768)
    memory = measured["whole"]["peak_gib"] / measured["chunked"]["peak_gib"]
    head = measured["chunked"]["seconds"] / measured["whole"]["seconds"]
    print(f"   memory whole / chunked {memory:.1f}x ({chunks} chunks); head time chunked / whole {head:.2f}x")
    whole, chunked = step_time(False), step_time(True)
    print(f"   training step, d=512 2/2/2, 4 x 1024, vocab 32,768: chunked / whole {chunked / whole:.2f}x")


if __name__ == "__main__":
    main()
