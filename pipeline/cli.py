"""The one entry point: ``parcae <command>`` (also ``python -m pipeline``).

Commands import what they need when they run, so ``parcae --help`` stays fast and importing this
module has no side effects. Logging is configured once, in `main`, and filtered to rank 0 unless
asked otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from data_prep.cli import add_prep_parser
from data_prep.errors import PrepError
from pipeline.errors import ParcaeError


class _RankFilter(logging.Filter):
    """Tags records with the rank; drops them on ranks other than 0 unless every rank logs."""

    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0


def configure_logging(verbose: bool = False, all_ranks: bool = False) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RankFilter(rank, all_ranks))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="job spec YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B.C=VALUE",
        help="override a spec value (YAML syntax), validated like the file; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parcae",
        description="Pretraining pipeline for Parcae stable looped language models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--all-ranks", action="store_true", help="log from every rank, not only rank 0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check a job spec; print every problem, or a resolved summary")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--show-spec", action="store_true", help="also print the resolved spec (secrets hidden)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of job specs (for editor completion)")
    p.set_defaults(func=cmd_schema)

    add_prep_parser(sub)

    p = sub.add_parser(
        "train",
        help="pretrain: launches its ranks on this machine, or runs as one rank under "
        "Slurm/torchrun; resumes from the run's newest checkpoint",
    )
    _add_spec_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("submit", help="render the Slurm batch script from the spec and submit it with sbatch")
    _add_spec_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit nothing")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="a submitted run's Slurm state, last logged step and loss, newest checkpoint")
    p.add_argument("run", help="the run directory")
    p.set_defaults(func=lambda a: _slurm("status", a.run))

    p = sub.add_parser("cancel", help="cancel a submitted run's Slurm job")
    p.add_argument("run", help="the run directory")
    p.set_defaults(func=lambda a: _slurm("cancel", a.run))

    p = sub.add_parser("slurm-job", help="(inside a batch job) start the ranks with srun; used by the batch script")
    p.add_argument("run_dir")
    p.set_defaults(func=lambda a: _slurm("slurm_job", a.run_dir))

    p = sub.add_parser(
        "import",
        help="check reference-format weights (e.g. released Parcae safetensors) against a spec's model and "
        "write them with the model config, ready to load",
    )
    p.add_argument("weights", help="safetensors file in the reference naming")
    p.add_argument("--spec", required=True, help="job spec whose model section describes the weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B.C=VALUE")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--loops", type=int, default=4, help="loop count of the smoke forward (default 4)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export",
        help="consolidate a run's sharded DeepSpeed checkpoint into one fp32 safetensors file in the reference naming",
    )
    p.add_argument("checkpoint_dir", help="the run's checkpoint.dir (e.g. runs/NAME/checkpoints)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--tag", help="which checkpoint (default: the newest complete one, named by LATEST)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte at test-time loop counts, with the fitted "
        "L(T) = L_inf + k exp(-z T); table, JSON, PNG and TensorBoard",
    )
    p.add_argument("source", help="run directory, checkpoint directory, or .safetensors (ours or reference-format)")
    p.add_argument("--data", help="validation shards: directory or s3:// prefix (default: the run's data.val_url)")
    p.add_argument("--spec", help="job spec for the model (needed for reference-format weights) and storage")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B.C=VALUE")
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--loops", type=int, nargs="+", help="test-time loop counts (default 1 2 4 8 16 32)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=50, help="at most this many batches (default 50)")
    p.add_argument("--tokenizer", help="SentencePiece model for bits per byte (default: the manifest's)")
    p.add_argument("--out", help="output directory (default: RUN/eval/TAG, or WEIGHTS-eval/ next to a file)")
    p.add_argument("--tensorboard", help="TensorBoard log dir (default: the run's; 'none' to skip)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// data (default: the spec's, or AWS_ENDPOINT_URL)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "plan",
        help="compute-optimal mean recurrence and tokens for a FLOP or GPU-hour budget (power laws C^0.40, C^0.78)",
    )
    _add_spec_args(p)
    p.add_argument("--flops", type=float, help="training compute budget in FLOPs")
    p.add_argument("--gpu-hours", type=float, help="budget in device-hours (times peak FLOP/s and MFU)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device (default: the spec's, or 989e12)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--loops-exponent", type=float, default=0.40, help="recurrence ~ C^a (default 0.40, the paper's)")
    p.add_argument("--tokens-exponent", type=float, default=0.78, help="tokens ~ C^b (default 0.78, the paper's)")
    p.add_argument("--anchor-flops", type=float, help="reference compute (default: the spec's own)")
    p.add_argument("--anchor-recurrence", type=float, help="optimal mean recurrence at the reference compute")
    p.add_argument("--anchor-tokens", type=float, help="optimal tokens at the reference compute")
    p.add_argument("--from-sweep", help="refit both exponents from a sweep directory's summary.json")
    p.add_argument(
        "--isoflop",
        metavar="R1,R2,...",
        help="print `parcae sweep run --points` YAML: one point per mean recurrence, each spending --flops",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "sweep", help="expand a spec over a grid: run the points here or as a Slurm job array; summarise"
    )
    sweep_sub = p.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND", required=True)
    q = sweep_sub.add_parser("run", help="validate every point, then train them one after another (or --submit)")
    _add_spec_args(q)
    q.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis; repeatable")
    q.add_argument("--points", help="YAML list of explicit points ({name: ..., KEY: VALUE, ...}), e.g. isoFLOP")
    q.add_argument("--name", help="sweep name (default: SPEC_NAME-sweep)")
    q.add_argument("--dir", help="sweep directory (default runs/sweeps/NAME)")
    q.add_argument("--submit", action="store_true", help="submit one Slurm job array instead of running here")
    q.add_argument("--dry-run", action="store_true", help="list the points (and the batch script with --submit)")
    q.set_defaults(func=cmd_sweep)
    q = sweep_sub.add_parser("summary", help="final/best validation loss, divergence, fitted curves: table and plots")
    q.add_argument("dir", help="the sweep directory")
    q.set_defaults(func=cmd_sweep_summary)

    p = sub.add_parser("tb", help="serve TensorBoard over runs' logs (local directories or s3:// prefixes)")
    p.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="run directory, TensorBoard directory or s3:// prefix")
    p.add_argument("--port", type=int, default=6006, help="port (default 6006)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// logs (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--cache", default=".parcae-tb-cache", help="local copy of s3:// logs (default .parcae-tb-cache)")
    p.add_argument("--sync-interval", type=float, default=30.0, help="seconds between S3 re-syncs (default 30)")
    p.set_defaults(func=cmd_tb)

    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded tiny spec (CPU, 2 ranks)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes data, logs and checkpoints")
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.spec_io import load_spec
    from pipeline.summary import spec_summary

    loaded = load_spec(args.spec, args.overrides)
    summary = spec_summary(loaded.spec)
    if args.json:
        print(loaded.redact(json.dumps(summary, indent=2)))
    else:
        print(f"{args.spec}: valid")
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            print(loaded.redact(f"  {key:<{width}}  {value}"))
    if args.show_spec:
        print(loaded.to_yaml(), end="")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.spec import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.slurm import submit

    return submit(args.spec, args.overrides, args.dry_run)


def _slurm(name: str, arg: str) -> int:
    from pipeline import slurm

    return getattr(slurm, name)(arg)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import run_train

    return run_train(args.spec, args.overrides)


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.weights_io import import_weights

    return import_weights(args.weights, args.spec, args.overrides, args.out, args.loops)


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.weights_io import export_checkpoint

    return export_checkpoint(args.checkpoint_dir, args.out, args.tag)


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate import run_eval

    return run_eval(args)


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import run_plan

    return run_plan(args)


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import run_sweep

    return run_sweep(args)


def cmd_sweep_summary(args: argparse.Namespace) -> int:
    from pipeline.sweep import summarize

    return summarize(args)


def cmd_tb(args: argparse.Namespace) -> int:
    from pipeline.tb import run_tb

    return run_tb(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(args.workdir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, all_ranks=args.all_ranks)
    try:
        return int(args.func(args) or 0)
    except (ParcaeError, PrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
