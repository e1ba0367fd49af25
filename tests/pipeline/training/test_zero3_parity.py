"""ZeRO-3 on 2 CPU ranks (gloo) gives plain PyTorch's gradients, step by step, for the real model.

20 steps with per-loop activation checkpointing and loop counts drawn per step and per sequence as in
training (different on each rank), against the same run in this one plain process: every parameter's
gradient at every step within 1e-5 relative, and the final weights equal to fp32 tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model
from pipeline.jobspec import JobSpec
from pipeline.training.distributed import free_port
from pipeline.training.engine import param_groups
from pipeline.training.schedule import lr_multiplier
from pipeline.training.step import DepthSampler
from tests.conftest import REPO
from tests.pipeline.training.zero3_parity_rank import batches

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS = 20

SPEC = {
    "name": "parity",
    "model": {
        "vocab_size": 256,
        "d_model": 64,
        "n_head": 2,
        "n_prelude": 1,
        "n_core": 2,
        "n_coda": 1,
        "max_seq_len": 64,
        "mean_recurrence": 4,
        "mean_backprop_depth": 2,
        "activation_checkpointing": True,
    },
    "data": {"train_url": "unused", "seq_len": 32},
    "optimizer": {
        "name": "adamw",
        "lr": 3e-3,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
    },
    "schedule": {"kind": "cosine", "warmup_steps": 3},
    "training": {"micro_batch_size": 4, "total_steps": STEPS, "seed": 11},
    "zero": {"stage": 3},
    "cluster": {"procs_per_node": 2},
}


def run_ranks(tmp_path: Path, spec: dict) -> dict:
    out = tmp_path / "zero3.pt"
    port = free_port()
    import json

    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "STEPS": str(STEPS),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "tests" / "pipeline" / "training" / "zero3_parity_rank.py"),
                    json.dumps(spec),
                    str(out),
                ],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return torch.load(out)


def sampler(spec: JobSpec, rank: int) -> DepthSampler:
    micro = spec.training.micro_batch_size
    return DepthSampler.for_model(
        spec.model.build(), seed=spec.training.seed, micro_batch_size=micro, world_size=2, rank=rank
    )


def reference(spec: JobSpec) -> dict:
    """The same training in one plain PyTorch process: the global batch, each rank's rows with its draws."""
    model = build_model(spec.model.build(), seed=spec.training.seed)
    opt = spec.optimizer
    optimizer = torch.optim.AdamW(param_groups(model, opt), lr=opt.lr, betas=opt.betas, eps=opt.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, STEPS, spec.schedule))
    micro = spec.training.micro_batch_size
    grads = []
    for step in range(STEPS):
        full = batches(spec, step)
        total = 0.0
        for rank in range(2):
            rows = full[rank * micro : (rank + 1) * micro]
            n_nograd, n_grad, _ = sampler(spec, rank).loop_counts(step, 0)
            loss = model(
                rows[:, :-1],
                rows[:, 1:],
                loops=(n_nograd, n_grad),
                generator=sampler(spec, rank).h0_generator(step, 0, torch.device("cpu")),
            )
            total = total + loss / 2
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        schedule.step()
    return {"grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("gather_unit", ["block", "module"])
def test_zero3_matches_plain_pytorch_gradients_every_step(tmp_path, gather_unit):
    """Both ways of gathering: the recurrence as one ZeRO-3 unit (default), and DeepSpeed's per-module hooks."""
    raw = {**SPEC, "zero": {"stage": 3, "gather_unit": gather_unit}}
    spec = JobSpec.model_validate(raw)
    # the draws differ between the ranks' sequences (and between steps)
    assert not torch.equal(
        torch.cat(sampler(spec, 0).loop_counts(0, 0)[:2]), torch.cat(sampler(spec, 1).loop_counts(0, 0)[:2])
    )
    zero3 = run_ranks(tmp_path, raw)
    plain = reference(spec)
    assert len(zero3["grads"]) == STEPS
    worst = []
    for step in range(STEPS):
        names = plain["grads"][step].keys()
        assert zero3["grads"][step].keys() == names
        step_worst = max(relative(zero3["grads"][step][n], plain["grads"][step][n]) for n in names)
        worst.append(step_worst)
    assert max(worst) < 1e-5, [f"{w:.1e}" for w in worst]
    for name, ref in plain["weights"].items():
        torch.testing.assert_close(zero3["weights"][name], ref, atol=1e-5, rtol=1e-4, msg=name)
