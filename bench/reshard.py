"""The cost of resuming a ZeRO-3 checkpoint on another world size: rewriting it for the new ranks.

`parcae train` of configs/demo-tiny.yaml widened to --d-model on the embedded corpus: 2 CPU ranks write a
checkpoint at step 2, then 1 rank (accumulation 2) resumes it, which rewrites the checkpoint for 1 rank
(`pipeline.training.reshard`). Printed: the parameters, the checkpoint's bytes per parameter, the rewrite's
time and rate beside the time the 2 ranks took to write the same checkpoint (DeepSpeed's save, measured in
the same run), and what that gives at the 1.3B shape (configs/parcae-1.3b.yaml's parameters, AdamW).

    .venv/bin/python bench/reshard.py [--d-model 512] [--optimizer adamw|muon]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdir import REPO, prepare_corpus
from model.config import count_params


def train(shards: Path, run: Path, steps: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "pipeline", "train", str(REPO / "configs" / "demo-tiny.yaml")]
    settings = [
        f"data.train_url={shards / 'train'}",
        f"data.val_url={shards / 'val'}",
        f"run_dir={run}",
        f"training.total_steps={steps}",
        "checkpoint.interval_steps=2",
        "tokenizer.path=null",
        *extra,
    ]
    out = subprocess.run([*cmd, *(f"--set={s}" for s in settings)], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return out.stderr + out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "parcae-bench-reshard")
    args = parser.parse_args()
    _, shards = prepare_corpus(args.work, seq_len=64, shard_size="500KB")
    model = [f"model.d_model={args.d_model}", "model.n_head=4", f"optimizer.name={args.optimizer}"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        two = train(shards, run, 2, *model)
        tag = run / "checkpoints" / "step-00000002"
        written = sum(f.stat().st_size for f in tag.glob("zero_pp_rank_*"))
        one = train(shards, run, 3, *model, "cluster.procs_per_node=1", "training.gradient_accumulation_steps=2")
    from pipeline.jobspec import load_spec

    spec = load_spec(REPO / "configs" / "demo-tiny.yaml", ["data.train_url=unused", *model]).spec
    params = count_params(spec.model.build())["total"]
    rewrite = re.search(r"rewritten from 2 rank\(s\) for 1 in ([\d.]+) s \(([\d.]+) MB", one)
    saved = re.search(r"checkpoint .*step-00000002 written in ([\d.]+) s", two)
    if rewrite is None:
        raise SystemExit("no rewrite logged:\n" + one[-3000:])
    seconds, megabytes = float(rewrite.group(1)), float(rewrite.group(2))
    print(f"checkpoint of 2 ranks: {written / 1e6:.1f} MB; rewritten for 1 rank: {megabytes:.1f} MB in {seconds:.2f} s")
    print(f"rewrite rate: {megabytes / seconds:.0f} MB/s on one rank")
    if saved:
        print(f"DeepSpeed's save of the same checkpoint (2 ranks): {float(saved.group(1)):.2f} s; "
              f"rewrite / save: {seconds / float(saved.group(1)):.1f}x")  # fmt: skip
    per_param = written / params
    total = 1.3e9 * per_param
    print(f"{params} parameters, {per_param:.1f} bytes per parameter in the checkpoint")
    print(f"1.3B estimate: {total / 1e9:.1f} GB more disk (the rewritten copy); "
          f"{total / 1e6 / (megabytes / seconds) / 60:.1f} min on 1 rank, about 1/N of it on N ranks")  # fmt: skip


if __name__ == "__main__":
    main()
