"""`parcae train SPEC`: pretrain (ranks on this machine, or one rank under Slurm/torchrun)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.args import add_spec_args


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain: launches its ranks on this machine, or runs as one rank under "
        "Slurm/torchrun; resumes from the run's newest checkpoint",
    )
    add_spec_args(p)
    p.add_argument(
        "--resume-from",
        metavar="TAG",
        help="resume from this checkpoint (e.g. step-00001000) instead of the newest, e.g. when the newest is "
        "damaged; the newer ones are moved aside into checkpoints/superseded-<time>/, not written over",
    )
    p.add_argument(
        "--restart",
        action="store_true",
        help="start at step 0 although the run has checkpoints: they are moved aside into "
        "checkpoints/superseded-<time>/, nothing is deleted (without it such a start is refused)",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.jobs.launch import run_train

    return run_train(args.spec, args.overrides, args.resume_from, args.restart)
