"""Which device a run trains on, and the refusal when the spec wants GPUs the process cannot see.

The one place that reads what the machine offers (torch's CUDA build and device count, CUDA_VISIBLE_DEVICES,
the Slurm allocation) against `training.device`: ``cuda`` refuses to start without GPUs, naming what it
saw and what to set; ``cpu`` trains on CPUs even where GPUs are visible; ``auto`` follows DeepSpeed's
accelerator (CPU when no CUDA device is visible).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from parcae_errors import ParcaeError

SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


class DeviceError(ParcaeError):
    """The spec's device is not what this process has."""


def what_is_visible(env: Mapping[str, str], devices: int) -> str:
    """What this process sees, for a message: torch's CUDA build and devices, CUDA_VISIBLE_DEVICES, Slurm's GPUs."""
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU-only build)"
    seen = [f"torch {torch.__version__} built with {build}", f"{devices} CUDA device(s) visible"]
    seen.append(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')!s}")
    slurm = [f"{name}={env[name]}" for name in SLURM_GPU_VARS if name in env]
    if "SLURM_JOB_ID" in env:
        seen.append("Slurm job " + env["SLURM_JOB_ID"] + ": " + (", ".join(slurm) or "no GPUs allocated"))
    return "; ".join(seen)


def device_problems(
    device: str, procs_per_node: int, env: Mapping[str, str] | None = None, devices: int | None = None
) -> list[str]:
    """Before any rank starts (on the node that starts them): can this node give every rank a GPU?"""
    if device != "cuda":
        return []
    import torch  # here, not at the top: the launcher of a CPU run never imports torch

    env = os.environ if env is None else env
    devices = torch.cuda.device_count() if devices is None else devices
    if devices == 0:
        if not torch.version.cuda:
            hint = "install a CUDA build of torch (make setup TORCH_INDEX_URL=<the CUDA wheel index>)"
        elif "SLURM_JOB_ID" in env and not any(env.get(name) for name in SLURM_GPU_VARS):
            hint = "the job was given no GPUs: request them with cluster.gpus_per_node (and gpu_request / gpu_type)"
        else:
            hint = "run where GPUs are visible (check CUDA_VISIBLE_DEVICES and the driver with nvidia-smi)"
        return [f"training.device: cuda, but this process sees no GPU ({what_is_visible(env, devices)}): {hint}, "
                "or set training.device: cpu to train on CPUs"]  # fmt: skip
    accelerator = env.get("DS_ACCELERATOR")
    if accelerator and accelerator != "cuda":
        return [f"training.device: cuda, but DS_ACCELERATOR={accelerator}: unset it (or set cuda), or train on CPUs "
                "with training.device: cpu"]  # fmt: skip
    if devices < procs_per_node:
        return [f"cluster.procs_per_node: {procs_per_node} ranks per node need one GPU each, but {devices} are "
                f"visible ({what_is_visible(env, devices)}): lower procs_per_node or request more GPUs"]  # fmt: skip
    return []


def select_accelerator(device: str, local_rank: int) -> None:
    """In a rank, before DeepSpeed picks its accelerator: enforce ``device`` (raises `DeviceError`)."""
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        return
    problems = device_problems(device, local_rank + 1)
    if problems:
        raise DeviceError(problems[0])
    import torch

    if device == "auto" and "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
