"""CPU seconds per test, the runs it starts included: a pytest plugin, off unless named.

    PARCAE_TEST_CPU=/tmp/cpu.jsonl .venv/bin/python -m pytest -p tests.cpu_per_test -n 2 --dist loadgroup

Each worker appends one JSON line per test (its own CPU time and that of every child process it waited for:
the `parcae` runs, their ranks, compilers) to the file, and the run ends with the costliest 25. Wall time
(``--durations``) says which tests a worker waited on; this says which ones the 2 cores were spent on.
Processes a test leaves running (session servers) count when they end, not for the test.
"""

from __future__ import annotations

import json
import os
import resource
import time

import pytest


def _cpu() -> tuple[float, float]:
    """(this worker's own CPU seconds, its own and its waited-for children's)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    mine = own.ru_utime + own.ru_stime
    return mine, mine + children.ru_utime + children.ru_stime


def _path() -> str:
    path = os.environ.get("PARCAE_TEST_CPU")
    if not path:
        raise pytest.UsageError("-p tests.cpu_per_test: set PARCAE_TEST_CPU to the JSON Lines file to write")
    return path


def pytest_configure(config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        open(_path(), "w").close()  # one run's tests


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (own, cpu), wall, started = _cpu(), time.monotonic(), time.time()
    yield
    own_after, cpu_after = _cpu()
    record = {"test": item.nodeid, "cpu_s": round(cpu_after - cpu, 1), "wall_s": round(time.monotonic() - wall, 1)}
    record["own_s"] = round(own_after - own, 1)  # in the worker itself: fixtures, in-process models, references
    record["worker"], record["start"] = os.environ.get("PYTEST_XDIST_WORKER", "main"), round(started, 1)  # the tail
    with open(_path(), "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_terminal_summary(terminalreporter) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(_path()) as f:
        records = [json.loads(line) for line in f]
    total, own = sum(r["cpu_s"] for r in records), sum(r["own_s"] for r in records)
    terminalreporter.section(
        f"CPU per test: {total / 60:.1f} CPU-minutes in {len(records)} tests, {own / 60:.1f} of them in the "
        f"pytest workers themselves ({_path()})"
    )
    for r in sorted(records, key=lambda r: -r["cpu_s"])[:25]:
        terminalreporter.write_line(
            f"{r['cpu_s']:8.1f} s CPU ({r['own_s']:6.1f} in the worker) {r['wall_s']:8.1f} s wall  {r['test']}"
        )
