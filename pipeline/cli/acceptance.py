"""`parcae check-gpu`: the GPU acceptance command (pipeline/jobs/acceptance.py)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "check-gpu",
        help="on one GPU, no network: does the GPU path work, and how fast (training, memory, generation, CORE)",
    )
    p.add_argument("--out", default="runs/check-gpu", help="a new directory for the runs and the report")
    p.add_argument("--tiny", action="store_true", help="the same code on CPU with the tiny shape (under a minute)")
    p.add_argument("--steps", type=int, help="training steps of the main shape (default 30; --tiny 8)")
    p.add_argument("--seq-len", type=int, help="sequence length (default 2048; --tiny 64)")
    p.set_defaults(func=cmd_check_gpu)


def cmd_check_gpu(args: argparse.Namespace) -> int:
    from pipeline.jobs.acceptance import acceptance_plan, run_acceptance

    if args.steps is not None and args.steps < 4:
        raise SystemExit("error: --steps: at least 4 (a resume from the last-but-one checkpoint, timed steps)")
    report = run_acceptance(args.out, acceptance_plan(args.tiny, args.steps, args.seq_len), say=_say)
    failed = [name for name, ok in report["checks"].items() if not ok]
    print("checks: " + ("all passed" if not failed else "FAILED: " + ", ".join(failed)))
    return 1 if failed else 0


def _say(line: str) -> None:
    print(line, flush=True)
