"""`parcae submit | status | cancel` and, inside a batch job, `parcae slurm-job`."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.args import add_spec_args


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("submit", help="render the Slurm batch script from the spec and submit it with sbatch")
    add_spec_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a submitted run's Slurm state, last logged step and loss, newest checkpoint")
    p.add_argument("run", help="the run directory")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel a submitted run's Slurm job")
    p.add_argument("run", help="the run directory")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("slurm-job", help="(inside a batch job) start the ranks with srun; used by the batch script")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_slurm_job)


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.jobs.slurm import submit

    done = submit(args.spec, args.overrides, args.dry_run)
    if done.job_id is None:
        print(done.script, end="")
        return 0
    print(f"submitted job {done.job_id}: {done.path} (log {done.log})")
    print(done.job_id)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.jobs.slurm import status

    print("\n".join(status(args.run)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from pipeline.jobs.slurm import cancel

    print(f"cancelled job {cancel(args.run)}")
    return 0


def cmd_slurm_job(args: argparse.Namespace) -> int:
    from pipeline.jobs.slurm import slurm_job

    return slurm_job(args.run_dir)
