"""Argument helpers shared by the commands."""

from __future__ import annotations

import argparse


def add_spec_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    """SPEC (or ``--spec``) and repeatable ``--set a.b.c=value`` overrides."""
    if positional:
        parser.add_argument("spec", help="job spec YAML file")
    add_overrides(parser)


def loop_count(text: str) -> int:
    """A test-time loop count: 1 to MAX_LOOPS (1024), as the spec's loop counts."""
    from model.config import MAX_LOOPS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a loop count, an integer from 1 to {MAX_LOOPS}") from None
    if not 1 <= value <= MAX_LOOPS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a loop count from 1 to {MAX_LOOPS}")
    return value


def add_force(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--force", action="store_true", help=f"replace {what} at --out (refused without it)")


def refuse_existing(out: str, force: bool) -> None:
    """An output that would replace something already there is refused, naming it, unless ``force``."""
    from pathlib import Path

    from parcae_errors import UsageError

    path = Path(out)
    if force or not path.exists():
        return
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir())
        if not inside:
            return
        shown = ", ".join(inside[:5]) + (f" and {len(inside) - 5} more" if len(inside) > 5 else "")
        raise UsageError(f"--out {out}: a directory that is not empty ({shown}); pass --force to write into it")
    raise UsageError(f"--out {out}: exists; pass --force to replace it, or name another path")


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
