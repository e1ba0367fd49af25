"""The one entry point: ``parcae <command>`` (also ``python -m pipeline``).

Each module of this package adds its commands' parsers (`add_parsers`) and holds their ``cmd_*``
functions, which unpack the arguments once and call the library with plain values. Commands import
what they need when they run, so ``parcae --help`` stays fast and importing this package has no side
effects. Logging is configured once, in `main`, and filtered to rank 0 unless asked otherwise; every
project error (`parcae_errors.ParcaeError`) is caught once, here, and printed without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from data_prep.cli import add_prep_parser
from parcae_errors import ParcaeError, ReportedElsewhere
from pipeline.cli import acceptance, demo, evaluate, generate, plan, prep, slurm, sweep, tb, train, validate, weights
from pipeline.jobspec.secrets import redact


class _RedactingFormatter(logging.Formatter):
    """Every log line passes through `redact`: no secret reaches a log, whatever a message interpolates."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _RankFilter(logging.Filter):
    """Tags records with the rank; drops them on ranks other than 0 unless every rank logs."""

    def __init__(self, rank: int, all_ranks: bool):
        super().__init__()
        self.rank, self.all_ranks = rank, all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.all_ranks or self.rank == 0


CHATTY_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer", "werkzeug")  # their INFO: not the user's business


def configure_logging(verbose: bool = False, all_ranks: bool = False) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RankFilter(rank, all_ranks))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.DEBUG if verbose else logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parcae",
        description="Pretraining pipeline for Parcae stable looped language models.",
    )
    parser.add_argument("--version", action="version", version=f"parcae {_version()}")
    _logging_flags(parser, argparse.SUPPRESS)
    parser.set_defaults(verbose=False, all_ranks=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    validate.add_parsers(sub)
    prep.add_parsers(add_prep_parser(sub))
    train.add_parsers(sub)
    slurm.add_parsers(sub)
    weights.add_parsers(sub)
    evaluate.add_parsers(sub)
    generate.add_parsers(sub)
    plan.add_parsers(sub)
    sweep.add_parsers(sub)
    tb.add_parsers(sub)
    demo.add_parsers(sub)
    acceptance.add_parsers(sub)
    _everywhere(parser)
    return parser


def _logging_flags(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument(
        "--all-ranks", action="store_true", default=default, help="log from every rank, not only rank 0"
    )


def _everywhere(parser: argparse.ArgumentParser) -> None:
    """-v and --all-ranks after any command too (``parcae train SPEC -v``), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _logging_flags(child, argparse.SUPPRESS)
                _everywhere(child)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("parcae-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    distributed = sys.modules.get("pipeline.training.distributed")  # imported by every rank process
    if distributed is not None:
        distributed.exit_rank(code)  # a rank process leaves here, without the interpreter's teardown
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, all_ranks=args.all_ranks)
    try:
        return int(args.func(args) or 0)
    except ReportedElsewhere as exc:
        return exc.exit_code
    except ParcaeError as exc:
        if _stopped_for_a_peer():  # a rank the launcher stopped because another failed: that one said why
            return exc.exit_code
        print(redact(f"error: {exc}"), file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(redact(note), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `parcae ... | head`: the reader is gone; nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from pipeline.training.distributed import collective_timeout, lost_a_peer, peer_loss_summary

        if timed_out := collective_timeout(exc):
            print(f"error: {timed_out}", file=sys.stderr)
            return 1
        if lost_a_peer(exc) or _stopped_for_a_peer():  # another rank failed and said why: stop quietly
            logging.getLogger(__name__).info("stopped: another rank is gone (%s)", peer_loss_summary(exc))
            logging.getLogger(__name__).debug("what this rank met: %s", exc)
            return 1
        # a bug, not a user mistake: the traceback, with secrets hidden
        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        return 1


def _stopped_for_a_peer() -> bool:
    distributed = sys.modules.get("pipeline.training.distributed")  # loaded in every rank, not imported here
    return distributed is not None and distributed.stopped_for_a_peer()


if __name__ == "__main__":
    sys.exit(main())
