"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse


def add_spec_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """SPEC (or ``--spec``) and repeatable ``--set a.b.c=value`` overrides."""
    if positional:
        parser.add_argument("spec", help="job spec YAML file")
    add_overrides(parser)


def add_endpoint(parser: argparse.ArgumentParser) -> None:
    """``--endpoint-url``, the same in every command that reaches S3 (`pipeline.jobspec.s3_options`)."""
    parser.add_argument(
        "--endpoint-url",
        help="S3 endpoint for s3:// locations (default: the spec's storage.endpoint_url, else AWS_ENDPOINT_URL_S3 "
        "or AWS_ENDPOINT_URL, else AWS)",
    )


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B.C=VALUE",
        help="override a spec value (YAML syntax), validated like the file; repeatable",
    )
