"""`parcae prep submit`: the one prep command that needs Slurm (the rest live in data_prep/cli.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parsers(prep_commands: Any) -> None:
    p = prep_commands.add_parser(
        "submit", help="submit a plan's units as one Slurm job array (`prep run` per task), then the merge"
    )
    p.add_argument("out", help="the plan's output location (holds plan.json, from `parcae prep plan`)")
    p.add_argument("--tasks", type=int, required=True, help="array tasks sharing the units (at most one per unit)")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes per task (default 2)")
    p.add_argument("--tokenizer", help="the plan's tokenizer file as the nodes see it (default: its path)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", dest="time_limit", help="Slurm --time of each task, e.g. 4:00:00")
    p.add_argument("--cpus-per-task", type=int, help="default: --workers")
    p.add_argument("--no-requeue", action="store_true", help="do not let Slurm requeue a preempted task")
    p.add_argument("--setup-line", action="append", default=[], help="a shell line run first (repeatable)")
    p.add_argument("--log-dir", default="prep-logs", help="where the tasks' logs go (local, shared; prep-logs)")
    p.add_argument("--endpoint-url", help="S3 endpoint for the tasks (default: their AWS_ENDPOINT_URL*)")
    p.add_argument("--region")
    p.add_argument("--dry-run", action="store_true", help="print the two batch scripts, submit nothing")
    p.set_defaults(func=cmd_submit)


def cmd_submit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data_prep.storage import S3Options
    from parcae_errors import UsageError
    from pipeline.jobs.prep_slurm import submit_prep
    from pipeline.jobspec import ClusterSpec

    if args.tasks < 1:
        raise UsageError(f"--tasks {args.tasks}: expected at least 1")
    try:
        cluster = ClusterSpec(
            partition=args.partition,
            account=args.account,
            qos=args.qos,
            time_limit=args.time_limit,
            cpus_per_task=args.cpus_per_task,
            requeue=not args.no_requeue,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = {"time_limit": "time"}.get(str(first["loc"][0]), str(first["loc"][0])).replace("_", "-")
        value = first.get("input")
        raise UsageError(f"--{flag} {value}: {first['msg']} (e.g. 90, 4:00:00 or 1-00:00:00)") from None
    done = submit_prep(
        args.out,
        args.tasks,
        workers=args.workers,
        options=S3Options.from_env(args.endpoint_url, args.region),
        endpoint_url=args.endpoint_url,
        region=args.region,
        tokenizer=args.tokenizer,
        cluster=cluster,
        log_dir=args.log_dir,
        setup_lines=args.setup_line,
        dry_run=args.dry_run,
    )
    for note in done.notes:
        print(note, file=sys.stderr)
    if done.array_id is None:
        print(done.scripts, end="")
        return 0
    print(
        f"submitted {done.tasks} prep tasks as job array {done.array_id} (logs {done.logs}/{done.array_id}_<task>.out) "
        f"and the merge as job {done.merge_id} after them; follow with `parcae prep status {args.out}`"
    )
    print(f"{done.array_id} {done.merge_id}")
    return 0
