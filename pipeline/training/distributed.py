"""Ranks and devices: where ranks come from (our local launcher, torchrun, or Slurm), how they start,
which device each one drives and how the process group is formed.

One code path for every case: each rank is one process running ``parcae train``; it learns its
rank, world size and rendezvous from the environment. On one machine, `launch_local` starts the
ranks itself (like torchrun) when the spec asks for more than one. The device comes from DeepSpeed's
accelerator API (`accelerator_device`): this file and `engine.py` are the only device-specific code.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from parcae_errors import REQUEUE_EXIT_CODE, ParcaeError, ReportedElsewhere

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def rank_info() -> RankInfo | None:
    """From torchrun/our launcher (RANK, ...) or Slurm (SLURM_PROCID, ...); None when not launched."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", env["RANK"])),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "29500")),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        port = int(env.get("MASTER_PORT", str(20000 + job % 20000)))
        return RankInfo(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", "0")),
            int(env["SLURM_NTASKS"]),
            env["MASTER_ADDR"],
            port,
        )
    return None


def export_rank_env(info: RankInfo) -> None:
    """What torch.distributed's env:// rendezvous reads."""
    os.environ.update(
        RANK=str(info.rank),
        LOCAL_RANK=str(info.local_rank),
        WORLD_SIZE=str(info.world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port no socket of ``host`` holds now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cpu_threads_per_rank(ranks_on_node: int) -> int:
    """Intra-op threads for a CPU rank: its share of the CPUs it may run on. When the process is bound
    to a subset (Slurm task binding, taskset) that subset is its own; otherwise the node's CPUs are
    split between the node's ranks, as torchrun does, so ranks do not oversubscribe the cores."""
    allowed = len(os.sched_getaffinity(0))
    if allowed < (os.cpu_count() or allowed):
        return max(1, allowed)
    return max(1, allowed // max(1, ranks_on_node))


def die_with_parent() -> None:
    """In a child, before exec: the kernel kills it (SIGKILL) when its parent dies, however the parent
    dies, so no rank outlives its launcher as an orphan racing a rerun (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


_DEATHS = {
    "SIGKILL": "the kernel's out-of-memory killer sends it when the machine runs out of memory (look for 'Out of "
    "memory' in `dmesg` or the job's log), as do `kill -9` and a scheduler's hard limit",
    "SIGSEGV": "a crash in native code (a driver, a compiled extension)",
    "SIGBUS": "a crash in native code, or a full /dev/shm",
    "SIGABRT": "an abort in native code (a failed assertion in a library)",
}


# The launcher's word to the other ranks when one failed: stop, and say nothing (the failed rank said why).
PEER_FAILED_SIGNAL = signal.SIGUSR2
_PEER_FAILED = False


def mark_peer_failed() -> None:
    """In a rank, on PEER_FAILED_SIGNAL: whatever this rank meets on its way out (a data wait cut short,
    a collective with a rank gone) is not news; `stopped_for_a_peer` keeps the command line quiet."""
    global _PEER_FAILED
    _PEER_FAILED = True


def stopped_for_a_peer() -> bool:
    return _PEER_FAILED


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def rank_death(rank: int, signum: int) -> str:
    """Why a rank that a signal killed is gone, as far as the launcher can tell."""
    name = _signal_name(signum)
    cause = _DEATHS.get(name, "something outside the run sent it")
    return f"rank {rank} was killed by {name}: {cause}; the other ranks were stopped"


STUCK_AFTER_S = 15  # how long the other ranks get to leave after the first one has
STACKS_SIGNAL = signal.SIGQUIT  # a rank prints its threads' stacks (`dump_stacks_on_request`) and goes on


def dump_stacks_on_request() -> None:
    """In a rank: STACKS_SIGNAL prints every thread's Python stack to stderr (faulthandler, from the signal
    itself, so it works while the rank waits inside native code), and the rank goes on. The local launcher
    sends it to a rank that did not leave in time before killing it; `kill -QUIT` does the same by hand."""
    import faulthandler

    faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True)


def kill_stuck(procs: list[subprocess.Popen]) -> list[int]:
    """Kill the ranks still running STUCK_AFTER_S after another left, each named with where it was stuck;
    the ranks killed."""
    stuck = [(rank, p) for rank, p in enumerate(procs) if p.poll() is None]
    for rank, p in stuck:
        print(
            f"error: rank {rank} was still running {STUCK_AFTER_S} s after another rank left; killing it. "
            "Where it waited (its threads' stacks, most recent call first):",
            file=sys.stderr,
            flush=True,
        )
        p.send_signal(STACKS_SIGNAL)
        time.sleep(1)  # the rank writes its stacks from the signal handler
    for _rank, p in stuck:
        p.kill()
    return [rank for rank, _p in stuck]


def killed_while_stopping(procs: list[subprocess.Popen], killed: list[int]) -> list[str]:
    """After a stop the user asked for, the ranks a signal took on their way out (not the launcher's own kill
    of a stuck rank, which said so): each said nothing, and its checkpoint may be missing."""
    lines = []
    for rank, p in enumerate(procs):
        if p.returncode is not None and p.returncode < 0 and rank not in killed:
            lines.append(f"error: rank {rank} was killed by {_signal_name(-p.returncode)} while the run stopped")
    return lines


def launch_local(
    argv: list[str], world_size: int, env: dict[str, str] | None = None, after_death: Callable[[], str] | None = None
) -> int:
    """Start ``world_size`` ranks of ``python -m pipeline ARGV`` on this machine (loopback rendezvous).

    Signals to the launcher are passed on to every rank (so a Slurm warning or Ctrl-C reaches them);
    the ranks die with the launcher; when one rank fails the others are stopped with PEER_FAILED_SIGNAL
    (they stay quiet: the failed rank says why). A rank killed by a signal cannot say why: the launcher
    names it, the signal and its likely cause, and ``after_death()`` (what a rerun does). Returns the first
    non-zero exit code (128 + the signal for a killed rank), or 0.
    """
    port = free_port()
    procs = []
    base = {**os.environ, **(env or {})}
    for rank in range(world_size):
        rank_env = {
            **base,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=rank_env, preexec_fn=die_with_parent)
        )

    asked_to_stop: list[int] = []

    def forward(signum, _frame):
        asked_to_stop.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code, failed_at, killed = 0, None, []
        while True:
            running = any(p.poll() is None for p in procs)  # before the failures: both seen in one look
            # a rank that exits 75 was asked to stop and has checkpointed: let the others finish theirs
            failed = [p for p in procs if p.poll() not in (None, 0, REQUEUE_EXIT_CODE)]
            # a rank killed by a signal is the cause; one that exited with an error as well lost it as a peer
            failed.sort(key=lambda p: p.returncode >= 0)
            if asked_to_stop:  # ranks leave a stop in their own order: none of them is the run's failure
                if failed_at is None and any(p.poll() is not None for p in procs):
                    failed_at = time.monotonic()  # the first one out: the others get as long as after a failure
                failed = []
            if failed and code == 0:
                code, failed_at = failed[0].returncode, time.monotonic()
                if code < 0:  # killed by a signal: nothing of it said why
                    print(f"error: {rank_death(procs.index(failed[0]), -code)}", file=sys.stderr)
                    if after_death is not None:
                        print(after_death(), file=sys.stderr)
                    code = 128 - code
                log.debug("rank %d exited with %d; stopping the other ranks", procs.index(failed[0]), code)
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(PEER_FAILED_SIGNAL)  # stop, quietly: the failed rank said why
                        p.send_signal(signal.SIGCONT)  # a stopped (hung) rank handles it too
            if not running:
                break
            if failed_at is not None and time.monotonic() - failed_at > STUCK_AFTER_S:  # stuck in a collective
                killed += kill_stuck(procs)
            time.sleep(0.2)
        if asked_to_stop:
            for line in killed_while_stopping(procs, killed):
                print(line, file=sys.stderr)
        if asked_to_stop and any(p.returncode == REQUEUE_EXIT_CODE for p in procs):
            return REQUEUE_EXIT_CODE  # stopped as asked (a rank that lost a peer on the way out is no failure)
        if code == 0:
            code = next((p.returncode for p in procs if p.returncode != 0), 0)
        return 128 - code if code < 0 else code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def accelerator_device(local_rank: int) -> tuple[torch.device, str]:
    """This rank's device and its type ("cpu", "cuda", ...), as DeepSpeed's accelerator reports it."""
    import torch
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    name = acc.device_name()
    if name == "cpu":
        return torch.device("cpu"), "cpu"
    acc.set_device(local_rank)
    return torch.device(acc.device_name(local_rank)), name


def init_distributed(device_type: str, timeout_s: int = 1800) -> None:
    """The process group: gloo on CPU, the accelerator's backend (NCCL on CUDA) otherwise. A collective
    not complete after ``timeout_s`` fails (gloo raises in the waiting rank; NCCL's watchdog with
    asynchronous error handling tears the process down) instead of holding the allocation forever."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    global _INITIALISED, _TIMEOUT_S
    backend = "gloo" if device_type == "cpu" else get_accelerator().communication_backend_name()
    if device_type == "cpu":
        # DeepSpeed's CPU backend JIT-builds its shared-memory all-reduce op (deepspeed_shm_comm: about a minute
        # of gcc the first time a venv runs, a ninja check in every rank after). The op serves only
        # `inference_all_reduce` (tensor-parallel inference), which training never calls: gloo does the rest.
        # (the module by its full name: the package's attribute `torch` is torch itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective ends the process
    try:
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # rank 0's own failure, which the others see as a lost peer: said, not hidden
        if "EADDRINUSE" not in str(exc):
            raise
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise ParcaeError(
            f"rendezvous: rank 0 cannot listen on {where}, the port is in use (another job or service on that "
            "node); set MASTER_PORT to a free port, or run again (`parcae train` and `parcae submit` pick a "
            "free one at each start)"
        ) from None
    _INITIALISED, _TIMEOUT_S = True, timeout_s


_INITIALISED = False  # this process joined a process group (it is a rank)
_TIMEOUT_S = 0


def collective_timeout(exc: BaseException) -> str | None:
    """The message for a collective that did not complete in time (another rank hung), else None."""
    if not _INITIALISED or os.environ.get("WORLD_SIZE", "1") == "1":
        return None
    text = f"{type(exc).__name__}: {exc}".lower()
    if "timed out" not in text and "timeout" not in text:
        return None
    rank = os.environ.get("RANK", "?")
    return (
        f"rank {rank}: a collective did not complete within training.collective_timeout_s ({_TIMEOUT_S} s): another "
        "rank hung or died without saying so; the run stops (resume from its newest checkpoint)"
    )


def exit_rank(code: int) -> None:
    """Leave a rank process with ``code`` and no interpreter teardown, once its work is done and said
    (checkpoints written, TensorBoard closed, the error printed). Even after `close_distributed`, a rank
    that trained was seen to abort at interpreter exit ("terminate called without an active exception",
    from a native thread of the communication stack), turning exit 1 or 0 into 250 (SIGABRT). Returns
    (does nothing) in a process that never joined a process group."""
    if not _INITIALISED:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def close_distributed() -> None:
    """Tear the process group down, on every way out of a rank (a check that failed, an error, the end):
    a gloo group left to the interpreter's exit can abort the process ("terminate called without an
    active exception"), turning a clean exit code into a SIGABRT. Local: it waits for no other rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (a collective: every rank calls it)."""
    import torch.distributed as dist

    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def memory_metrics(device_type: str) -> dict[str, float]:
    """Peak memory of this rank: resident set on CPU, allocated device memory otherwise."""
    if device_type == "cpu":
        return {"memory_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    import torch

    return {"memory_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout", "Timed out")


def lost_a_peer(exc: BaseException) -> bool:
    """True for the error a rank gets from a collective when another rank has died (that rank reports
    its own error; this one should stop without adding a traceback to it)."""
    if os.environ.get("WORLD_SIZE", "1") == "1":
        return False
    text = f"{type(exc).__name__}: {exc}"
    return "DistBackendError" in text or "DistNetworkError" in text or any(p in text for p in PEER_GONE)


def peer_loss_summary(exc: BaseException) -> str:
    """What a rank that lost a peer says of it, in one short line: the error's kind and its first sentence,
    without the backend's source location and advice (gloo: "[.../pair.cc:553] Connection closed by peer
    [127.0.0.1]:12725. This is typically caused by ..."). The failing rank's own error is the one that
    matters; this line says how the others ended (a rendezvous port in use once hid behind it)."""
    lines = str(exc).strip().splitlines()
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else ""
    first = re.split(r"(?<=\.)\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def agree_on_failure(failure: Exception | None) -> None:
    """A collective after a check that one rank ran: every rank raises. The rank whose check failed raises
    its error; the others raise `ReportedElsewhere` with the same exit code, and stay quiet."""
    import torch
    import torch.distributed as dist

    code = torch.tensor([failure.exit_code if isinstance(failure, ParcaeError) else 0], dtype=torch.int64)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if int(code):
        raise ReportedElsewhere(int(code))
