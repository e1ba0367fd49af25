"""The memory plan (`parcae validate --memory`) against measured peaks of real `parcae train` ranks.

Each point trains the demo spec (widened, on the embedded corpus) for 2 steps under ZeRO-3 with
``logging.profile_memory_steps=2``: every rank records its allocations with torch.profiler and writes
its peak live bytes over those steps (RUN/memory/rank<R>.json). The plan is computed for the same spec
on CPU (fp32). Buckets are set small (2M values) so the comparison is about the model's own memory,
not DeepSpeed's fixed 200 MB reduce bucket. Target: every estimate within 15% of the
measurement. Then the plan of every shipped config on 80 GB devices.

    python bench/memory_plan.py [--work runs/memory-bench] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdir import REPO, parcae, prepare_corpus
from pipeline.jobspec import load_spec
from pipeline.training.memory import knobs, plan_memory

SEQ_LEN = 256
D128 = ["model.d_model=128"]
D256 = ["model.d_model=256", "model.n_head=4"]
DEPTH4 = ["model.mean_recurrence=8", "model.mean_backprop_depth=4"]
NO_CKPT = ["model.activation_checkpointing=false"]
GPT = ["model.d_model=128", "model.n_head=2", "model.n_layers=4", "model.vocab_size=2048", "cluster.nodes=1"]
GPT += ["training.global_batch_size=16", "training.gradient_accumulation_steps=1", "training.total_tokens=null"]
GPT += ["storage.endpoint_url=null"]
BUCKETS_AS_SHIPPED = ["zero.reduce_bucket_size=50000000", "zero.prefetch_bucket_size=50000000"]
POINTS = [  # (name, ranks, overrides[, config]): the demo spec unless a config is named
    ("d128 depth 1", 1, [*D128, "model.mean_backprop_depth=1"]),
    ("d128 depth 2", 1, [*D128, "model.mean_backprop_depth=2"]),
    ("d128 depth 4", 1, [*D128, *DEPTH4]),
    ("d128 depth 4, no ckpt", 1, [*D128, *DEPTH4, *NO_CKPT]),
    ("d256 depth 2", 1, [*D256, "model.mean_backprop_depth=2"]),
    ("d256 depth 2", 2, [*D256, "model.mean_backprop_depth=2"]),
    ("d256 depth 4", 2, [*D256, *DEPTH4]),
    ("d256 depth 4, no ckpt", 2, [*D256, *DEPTH4, *NO_CKPT]),
    ("d256 depth 2, muon", 2, [*D256, "model.mean_backprop_depth=2", "optimizer.name=muon"]),
    ("d256 depth 2, bf16", 2, [*D256, "model.mean_backprop_depth=2", "training.precision=bf16"]),
    ("d128 vocab 32k, chunked", 1, [*D128, "model.vocab_size=32768"]),  # 2 loss chunks of 1,024 rows
    ("gpt d128, 4 layers", 2, GPT, "gpt-140m.yaml"),
    ("d128 shipped buckets", 2, [*D128, *BUCKETS_AS_SHIPPED]),
]
COMMON = [
    f"data.seq_len={SEQ_LEN}",
    f"model.max_seq_len={SEQ_LEN}",
    "training.micro_batch_size=8",
    "training.total_steps=2",
    "training.device=cpu",
    "zero.reduce_bucket_size=2000000",
    "zero.prefetch_bucket_size=2000000",
    "logging.profile_memory_steps=2",
    "eval.interval_steps=1000",
    "checkpoint.interval_steps=1000",
]
MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/memory-bench")
    parser.add_argument("--quick", action="store_true", help="the first two points only")
    args = parser.parse_args()
    work = (REPO / args.work).resolve()
    tokenizer, shards = prepare_corpus(work, SEQ_LEN, shard_size="1MB")  # shards for 2 ranks
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"{'point':<24} {'ranks':>5} {'plan MiB':>9} {'measured':>9} {'ratio':>6}  plan's peak phase, largest parts")
    worst = 0.0
    for name, ranks, overrides, *config in POINTS[:2] if args.quick else POINTS:
        config_path = REPO / "configs" / (config[0] if config else "demo-tiny.yaml")
        run = work / (f"{ranks}r-" + "".join(c if c.isalnum() else "-" for c in name))
        sets = [*COMMON, *([] if config else ["model.n_core=2"]), *overrides, f"cluster.procs_per_node={ranks}"]
        sets += [f"run_dir={run}", f"tokenizer.path={tokenizer}", f"data.train_url={shards}/train"]
        sets.append(f"data.val_url={shards}/val")
        measured_files = sorted((run / "memory").glob("rank*.json"))
        if len(measured_files) != ranks:
            parcae("train", str(config_path), *[f"--set={s}" for s in sets])
            measured_files = sorted((run / "memory").glob("rank*.json"))
        measured = max(json.loads(f.read_text())["step_peak_bytes"] for f in measured_files)
        plan = plan_memory(load_spec(config_path, sets).spec)
        phase = plan.phases[plan.peak_phase]
        parts = {**plan.static, **phase}
        top = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        largest = ", ".join(f"{k.split(' (')[0]} {v / MiB:.1f}" for k, v in top)
        ratio = plan.peak_bytes / measured
        worst = max(worst, abs(ratio - 1))
        print(f"{name:<24} {ranks:>5} {plan.peak_bytes / MiB:>9.1f} {measured / MiB:>9.1f} {ratio:>6.2f}  "
              f"{plan.peak_phase}: {largest}")  # fmt: skip
    print(f"largest deviation of the plan from the measurement: {worst:.1%} (target <= 15%)")
    print()
    print("shipped configs on 80 GiB devices (A100/H100 80GB; a GPU run's plan: bf16-mixed unless the spec says so)")
    print(f"{'config':<22} {'ranks':>6} {'peak GiB':>9} {'fits':>5}  peak phase; what to turn when it does not fit")
    device = 80 * 2**30
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("demo"):
            continue
        spec = load_spec(path, ["tokenizer.path=x"]).spec
        plan = plan_memory(spec, "cuda")
        advice = knobs(plan, spec, device)
        fits = "yes" if plan.peak_bytes <= device else "NO"
        row = f"{path.stem:<22} {spec.world_size:>6} {plan.peak_bytes / 2**30:>9.2f} {fits:>5}  {plan.peak_phase}"
        print(row + (f"; {advice[0]}" if advice else ""))


if __name__ == "__main__":
    main()
