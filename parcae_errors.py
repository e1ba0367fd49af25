"""The project's one error root, importable by every package (`model`, `data_prep`, `pipeline`).

Every error a user can act on is a `ParcaeError`: its message names the field, file or shard and what
would be accepted, and ``exit_code`` is what the command line exits with. Each area subclasses it
(`data_prep.errors.PrepError`, `model.weights.WeightsError`, `pipeline.jobspec.SpecError`,
`pipeline.data.manifests.DataError`, ...), and `parcae` catches this one class, prints the message and exits
with its code: never a traceback, never a rewrap of one project error into another.

This module imports nothing, so the layering rules (model/ imports torch and itself only, data_prep/
neither model/ nor pipeline/) hold with it.
"""

from __future__ import annotations

# `parcae train` exits with this after a warning signal or preemption: checkpoint written, run it again
# (EX_TEMPFAIL). The Slurm wrapper turns it into a requeue.
REQUEUE_EXIT_CODE = 75


class ParcaeError(Exception):
    """A problem the user can fix; the message says where and what would be accepted."""

    exit_code = 1


class UsageError(ParcaeError):
    """A command-line argument or configuration value that cannot work (exit code 2, like argparse)."""

    exit_code = 2


class ReportedElsewhere(ParcaeError):
    """An error another process has already reported (rank 0, or the launcher): this process exits with
    the same code and prints nothing, so the user reads the message once."""

    def __init__(self, exit_code: int):
        super().__init__("")
        self.exit_code = exit_code
