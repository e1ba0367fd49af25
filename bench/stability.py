"""The paper's stability finding at tiny scale on CPU: Parcae (diagonal injection), additive and concat
injection across five learning rates, as one `parcae sweep`; prints the sweep summary (which runs
converge, final losses, the largest spectral radius seen).

Tokenizer and shards of the embedded corpus are prepared in WORKDIR (kept, reused when rerun); the
sweep is WORKDIR/sweep (finished points are skipped when rerun).

    python bench/stability.py [--workdir runs/stability] [--steps 150] [--lrs 1e-3,3e-3,1e-2,3e-2,1e-1]
        [--set optimizer.grad_clip=0 ...]
"""

from __future__ import annotations

import argparse

from workdir import REPO, parcae, prepare_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/stability")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2,3e-2,1e-1")
    parser.add_argument("--injections", default="diagonal,add,concat")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="more spec overrides (all runs)")
    args = parser.parse_args()
    work = (REPO / args.workdir).resolve()
    _, shards = prepare_corpus(work, seq_len=128)
    common = [
        f"data.train_url={shards / 'train'}",
        f"data.val_url={shards / 'val'}",
        "data.seq_len=128",
        "model.d_model=128",
        "model.n_core=2",
        "cluster.procs_per_node=1",
        f"training.total_steps={args.steps}",
        "logging.log_interval=10",
        f"eval.interval_steps={args.steps}",
        "eval.loop_counts=[1, 2, 4, 8, 16]",
        f"checkpoint.interval_steps={args.steps}",
        "checkpoint.keep_last=1",
        *args.extra,
    ]
    parcae(
        "sweep", "run", str(REPO / "configs" / "demo-tiny.yaml"), *[f"--set={o}" for o in common],
        "--grid", f"model.injection={args.injections}", "--grid", f"optimizer.lr={args.lrs}",
        "--name", "stability", "--dir", str(work / "sweep"),
    )  # fmt: skip
    parcae("sweep", "summary", str(work / "sweep"))


if __name__ == "__main__":
    main()
