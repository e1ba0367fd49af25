"""`parcae sweep run SPEC --grid KEY=V1,V2 ...` and `parcae sweep summary DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.cli.args import add_spec_args


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="expand a spec over a grid: run the points here or as a Slurm job array; summarise"
    )
    sweep_sub = p.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND", required=True)
    q = sweep_sub.add_parser("run", help="validate every point, then train them one after another (or --submit)")
    add_spec_args(q)
    q.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis; repeatable")
    q.add_argument("--points", help="YAML list of explicit points ({name: ..., KEY: VALUE, ...}), e.g. isoFLOP")
    q.add_argument("--name", help="sweep name (default: SPEC_NAME-sweep)")
    q.add_argument("--dir", help="sweep directory (default runs/sweeps/NAME)")
    q.add_argument("--submit", action="store_true", help="submit one Slurm job array instead of running here")
    q.add_argument("--dry-run", action="store_true", help="list the points (and the batch script with --submit)")
    q.set_defaults(func=cmd_sweep_run)
    q = sweep_sub.add_parser("summary", help="final/best validation loss, divergence, fitted curves: table and plots")
    q.add_argument("dir", help="the sweep directory")
    q.set_defaults(func=cmd_sweep_summary)


def cmd_sweep_run(args: argparse.Namespace) -> int:
    from pipeline.jobs import sweep

    points = sweep.read_points_file(args.points) if args.points else []
    grid = sweep.parse_grid(args.grid)
    directory, planned = sweep.plan_sweep(args.spec, args.overrides, grid, points, args.name, args.dir)
    print(f"sweep {directory.name}: {len(planned)} points in {directory}")
    for point in planned:
        print(f"  {point['name']:<40} {' '.join(sweep.as_overrides(point['values']))}")
    if args.submit and args.dry_run:
        print(sweep.array_script(directory, planned), end="")
        return 0
    if args.submit:
        job, path = sweep.submit_array(args.spec, directory, planned)
        print(f"submitted job array {job} ({len(planned)} tasks): {path}")
        print(job)
        return 0
    if args.dry_run:
        return 0
    failed = sweep.run_locally(args.spec, directory, planned, say=lambda line: print(line, flush=True))
    done = len(planned) - len(failed)
    print(f"done: {done} finished, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    print(f"summary: parcae sweep summary {directory}")
    return 0


def cmd_sweep_summary(args: argparse.Namespace) -> int:
    from pipeline.jobs.sweep_summary import summarize, summary_table

    directory = Path(args.dir)
    runs, keys = summarize(directory)
    print("\n".join(summary_table(runs, keys)))
    print(f"wrote {directory / 'summary.json'}, {directory / 'curves.png'}, {directory / 'training.png'}")
    return 0
