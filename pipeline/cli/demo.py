"""`parcae demo`: the README's first command, end to end on the embedded tiny spec."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded tiny spec (CPU, 2 ranks)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes data, logs and checkpoints")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.jobs.demo import run_demo

    return run_demo(args.workdir, say=lambda line: print(line, flush=True))
