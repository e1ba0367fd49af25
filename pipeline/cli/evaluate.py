"""`parcae eval SOURCE`: loss, perplexity and bits per byte at test-time loop counts, with the fitted L(T)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.args import add_overrides


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="validation loss, perplexity and bits per byte at test-time loop counts, with the fitted "
        "L(T) = L_inf + k exp(-z T); table, JSON, PNG and TensorBoard",
    )
    p.add_argument("source", help="run directory, checkpoint directory, or .safetensors (ours or reference-format)")
    p.add_argument("--data", help="validation shards: directory or s3:// prefix (default: the run's data.val_url)")
    p.add_argument("--spec", help="job spec for the model (needed for reference-format weights) and storage")
    add_overrides(p)
    p.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    p.add_argument("--loops", type=int, nargs="+", help="test-time loop counts (default 1 2 4 8 16 32)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--max-batches", type=int, default=50, help="at most this many batches (default 50)")
    p.add_argument("--tokenizer", help="SentencePiece model for bits per byte (default: the manifest's)")
    p.add_argument("--out", help="output directory (default: RUN/eval/TAG, or WEIGHTS-eval/ next to a file)")
    p.add_argument("--tensorboard", help="TensorBoard log dir (default: the run's; 'none' to skip)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// data (default: the spec's, or AWS_ENDPOINT_URL)")
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
    from pipeline.jobs.evaluate import load_source, run_eval
    from pipeline.jobspec import load_spec

    given = load_spec(args.spec, args.overrides).spec if args.spec else None
    run_eval(
        load_source(args.source, given, args.tag),
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
    return 0
