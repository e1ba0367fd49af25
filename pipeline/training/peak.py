"""The dense matmul peak of this process's CPU share: the denominator of MFU on CPU.

GPUs have a published peak (`logging.peak_flops_per_device`, an H100's dense bf16 by default). A CPU's
depends on its cores, its vector units and how many threads this rank may use, so it is measured: square
matmuls of ``size`` for about ``seconds``, in the dtype the matmuls run in (bf16 under bf16-mixed), on
this rank's threads while the other ranks measure theirs. bench/compile.py measures it at several sizes, and
also between rounds of training steps (a sustained rate, not the best call).
"""

from __future__ import annotations

import time

import torch


def gemm_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3, device: str = "cpu") -> float:
    """FLOP/s of ``size`` x ``size`` matmuls in ``dtype`` on this process's threads, or on a GPU (``device``
    "cuda", timed between synchronizations; `parcae check-gpu` measures its bf16 peak so)
    (best of short rounds)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    repeat = 10 if device.startswith("cuda") else 1  # a GPU matmul is too short to time alone
    for _ in range(2):  # warm-up: allocation, thread pool, kernel selection
        torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sync()
        start = time.perf_counter()
        for _ in range(repeat):
            torch.mm(a, b)
        sync()
        best = max(best, repeat * 2 * size**3 / (time.perf_counter() - start))
    return best
