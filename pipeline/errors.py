"""The pipeline's small exception hierarchy. Every error a user can act on is a `ParcaeError`.

The CLI turns a `ParcaeError` into its message and the error's exit code, never a traceback.
"""

from __future__ import annotations

# `parcae train` exits with this after a warning signal or preemption: checkpoint written, run it again
# (EX_TEMPFAIL). The Slurm wrapper turns it into a requeue.
REQUEUE_EXIT_CODE = 75


class ParcaeError(Exception):
    """A problem the user can fix; the message says where and what would be accepted."""

    exit_code = 1


class SpecError(ParcaeError):
    """An invalid job spec. ``problems`` holds one line per problem, each starting with a dotted path."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: invalid job spec ({count}):\n" + "\n".join(f"  {p}" for p in problems))


class ConfigError(ParcaeError):
    """A bad DeepSpeed base config or other configuration file (not the job spec)."""

    exit_code = 2
