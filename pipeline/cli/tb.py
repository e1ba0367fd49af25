"""`parcae tb LOGDIR ...`: TensorBoard over runs' logs, local or s3://."""

from __future__ import annotations

import argparse
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("tb", help="serve TensorBoard over runs' logs (local directories or s3:// prefixes)")
    p.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="run directory, TensorBoard directory or s3:// prefix")
    p.add_argument("--port", type=int, default=6006, help="port (default 6006)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--endpoint-url", help="S3 endpoint for s3:// logs (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--cache", default=".parcae-tb-cache", help="local copy of s3:// logs (default .parcae-tb-cache)")
    p.add_argument("--sync-interval", type=float, default=30.0, help="seconds between S3 re-syncs (default 30)")
    p.set_defaults(func=cmd_tb)


def cmd_tb(args: argparse.Namespace) -> int:
    from pipeline.jobs.tb import serve

    return serve(
        args.logdirs,
        port=args.port,
        host=args.host,
        endpoint_url=args.endpoint_url,
        cache=args.cache,
        sync_interval=args.sync_interval,
        say=lambda line: print(line, flush=True),
    )
