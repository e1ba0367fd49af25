"""`parcae eval SOURCE`: loss, perplexity and bits per byte at test-time loop counts, with the fitted L(T);
downstream CORE and Core-Extended at the same loop counts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from parcae_errors import UsageError
from pipeline.cli.args import add_endpoint, add_overrides, loop_count


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte, and downstream CORE / Core-Extended, at test-time "
        "loop counts, with the fitted L(T) = L_inf + k exp(-z T); table, JSON, PNG and TensorBoard",
    )
    p.add_argument("source", help="run directory, checkpoint directory, or .safetensors (ours or reference-format)")
    p.add_argument("--data", help="validation shards: directory or s3:// prefix (default: the run's data.val_url)")
    p.add_argument("--spec", help="job spec for the model (needed for reference-format weights) and storage")
    add_overrides(p)
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument(
        "--tasks",
        nargs="+",
        choices=("val", "core", "core-extended"),
        default=["val"],
        help="val (default): validation loss; core / core-extended: the downstream suites of --bundle",
    )
    p.add_argument("--bundle", help="eval bundle for core/core-extended: a folder, its .zip, or an s3:// prefix")
    p.add_argument("--max-per-task", type=int, help="downstream: at most this many items per task (default: all)")
    p.add_argument(
        "--seeds", type=int, nargs="+", help="downstream: few-shot seeds; several give a spread (default 1234)"
    )
    p.add_argument("--batch-tokens", type=int, default=8192, help="downstream: tokens per forward (default 8192)")
    p.add_argument("--procs", type=int, default=1, help="ranks to start on this machine (downstream data-parallel)")
    p.add_argument(
        "--loops",
        type=loop_count,
        nargs="+",
        help="test-time loop counts (default 1 2 4 8 16 32; downstream 1 2 4 8 16)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=50, help="at most this many batches (default 50)")
    p.add_argument(
        "--tokenizer", help="tokenizer (.model or tokenizer.json) for bits per byte and prompts (default: the run's)"
    )
    p.add_argument("--out", help="output directory (default: RUN/eval/TAG, or WEIGHTS-eval/ next to a file)")
    p.add_argument("--tensorboard", help="TensorBoard log dir (default: the run's; 'none' to skip)")
    add_endpoint(p)
    p.add_argument(
        "--protocol",
        default="pipeline",
        help="pipeline (default): packed rows, h0 = 0, reproducible; paper: the reference's evaluation, one "
        "held-out document per row, like-init h0 averaged over --h0-seeds seeds with the spread",
    )
    p.add_argument("--documents", type=int, default=1000, help="paper protocol: documents to score (default 1000)")
    p.add_argument("--h0-seeds", type=int, default=3, help="paper protocol: like-init h0 seeds (default 3)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.jobs.downstream import downstream_table, eval_ranks, launch_ranks, run_downstream
    from pipeline.jobs.evaluate import load_source
    from pipeline.jobspec import load_spec

    suites = [t for t in dict.fromkeys(args.tasks) if t != "val"]
    if suites and not args.bundle:
        raise UsageError(f"--tasks {' '.join(suites)}: needs --bundle (an eval bundle folder, .zip or s3:// prefix)")
    code = launch_ranks(sys.argv[1:], args.procs)
    if code is not None:
        return code
    given = load_spec(args.spec, args.overrides).spec if args.spec else None
    with eval_ranks() as (rank, world_size, device):
        source = load_source(args.source, given, args.tag, args.endpoint_url)
        if suites:
            written = run_downstream(
                source,
                source_arg=str(args.source),
                bundle=args.bundle,
                suites=suites,
                loops=args.loops,
                max_per_task=args.max_per_task,
                seeds=args.seeds,
                tokenizer=args.tokenizer,
                out=args.out,
                tensorboard=args.tensorboard,
                endpoint_url=args.endpoint_url,
                batch_tokens=args.batch_tokens,
                rank=rank,
                world_size=world_size,
                device=device,
            )
            if written is not None:
                print("\n".join(downstream_table(written.report)))
                print(written.summary())
    if "val" in args.tasks and rank == 0:  # validation loss: on rank 0
        source.model.cpu()
        run_val(args, source)
    return 0


def run_val(args: argparse.Namespace, source) -> None:
    from pipeline.evaluation.report import print_table
    from pipeline.jobs.evaluate import run_eval

    written = run_eval(
        source,
        data=args.data,
        loops=args.loops,
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        tokenizer=args.tokenizer,
        out=args.out,
        tensorboard=args.tensorboard,
        endpoint_url=args.endpoint_url,
        source_name=str(args.source),
        protocol=args.protocol,
        documents=args.documents,
        h0_seeds=args.h0_seeds,
    )
    print_table(written.report)
    print(written.summary())
