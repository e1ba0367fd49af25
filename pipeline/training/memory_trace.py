"""Measured peak memory of one rank, the check of the memory plan (`pipeline.training.memory`).

On a GPU the allocator keeps its own peak (``max_memory_allocated``). The CPU allocator keeps none, so
there every allocation and free is recorded with torch.profiler (``profile_memory=True``) from before the
engine is built until the last traced step, and the peak of live bytes is computed from the events: the
same quantity, tensors allocated by torch on the rank's device, without the interpreter and libraries a
resident-set size counts. The profiler sees only its own threads: a free on a collective's thread is
inferred when its address is allocated again (`live_peaks`). Slow (every op is recorded): for a few steps
on request (``logging.profile_memory_steps``), written to ``RUN/memory/rank<R>.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

STEP_RANGE = "parcae_memory_step"


class MemoryTrace:
    """Started at the rank's start (``steps`` 0: does nothing); `step` wraps each training step and writes
    the peaks to ``path`` after the ``steps``-th; `finish` writes them if the run ended sooner."""

    def __init__(self, device_type: str, steps: int, path: Path, rank: int):
        self.device_type, self.steps, self.path, self.rank = device_type, steps, path, rank
        self.profiler: Any = None
        self.traced = 0
        self.active = steps > 0
        if self.active:
            self._start()

    def _start(self) -> None:
        if self.device_type == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
            self.profiler.__enter__()
        else:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().reset_peak_memory_stats()

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        """Around training step ``number``: its span is what the step peak is taken over."""
        if not self.active:
            yield
            return
        with torch.profiler.record_function(f"{STEP_RANGE}_{number}"):
            yield
        self.traced += 1
        if self.traced >= self.steps:
            self.finish()

    def finish(self) -> dict[str, Any] | None:
        """The peaks (bytes): over the whole trace and over the traced training steps; written to the path."""
        if not self.active:
            return None
        self.active = False
        if self.profiler is None:
            from deepspeed.accelerator import get_accelerator

            peak = int(get_accelerator().max_memory_allocated())
            result = {"rank": self.rank, "device": self.device_type, "peak_bytes": peak, "step_peak_bytes": peak}
        else:
            self.profiler.__exit__(None, None, None)
            result = {"rank": self.rank, "device": "cpu", **peaks(self.profiler)}
        result["steps"] = self.traced
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(result, indent=2) + "\n")
        log.info(
            "measured peak memory (rank %d): %.4g MiB in the traced steps, %.4g MiB overall; %s",
            self.rank,
            result["step_peak_bytes"] / 2**20,
            result["peak_bytes"] / 2**20,
            self.path,
        )
        return result


def peaks(profiler: Any) -> dict[str, int]:
    """Peak live bytes from a profile's allocation records, overall and within the step ranges."""
    return live_peaks(*records(profiler))


def records(profiler: Any) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]]]:
    """A profile's allocations and frees as (time, bytes: negative for a free, address), and the step ranges."""
    from torch._C._profiler import _ExtraFields_Allocation

    allocations, spans = [], []
    stack = list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if isinstance(node.extra_fields, _ExtraFields_Allocation):
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
        elif node.name.startswith(STEP_RANGE):
            spans.append((node.start_time_ns, node.end_time_ns))
    return allocations, spans


def live_peaks(allocations: list[tuple[int, int, int]], spans: list[tuple[int, int]]) -> dict[str, int]:
    """Peak live bytes of ``allocations`` (time, bytes: negative for a free, address), overall and at the times
    within ``spans``. The profiler records an allocation or a free only on a thread it runs on: a block whose
    last reference a collective's worker thread dropped (gloo's, when DeepSpeed's asynchronous reduce or
    gather finishes after the step let go) is freed unseen. A new block at the address of one still live
    is that proof: the old one is counted freed there. (Without it the peak grew by up to a fifth, by the
    threads' timing, from one run of the same spec to the next.)"""
    blocks: dict[int, int] = {}
    live = peak = step_peak = 0
    for when, nbytes, address in sorted(allocations):
        if nbytes > 0:
            live += nbytes - blocks.get(address, 0)
            blocks[address] = nbytes
        else:
            blocks.pop(address, None)
            live += nbytes
        peak = max(peak, live)
        if any(start <= when <= end for start, end in spans):
            step_peak = max(step_peak, live)
    return {"peak_bytes": peak, "step_peak_bytes": step_peak}
