"""One rank of the ZeRO-3 parity test (tests/pipeline/training/test_zero3_parity.py starts two of these).

Builds the engine as `parcae train` does (`engine_for_job`: the DeepSpeed config from the spec, zero.Init
construction, rank-0 init, AdamW, clipping, schedule) and runs the trainer's own `train_step` for STEPS
steps on fixed batches (its per-sequence loop counts, h_0 draws and loss guard, per-loop checkpointing).
The engine is wrapped only to read every parameter's full gradient just before each optimizer step;
rank 0 saves them and the final fp32 weights.

    python zero3_parity_rank.py SPEC_JSON OUT_PATH   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch


def batches(spec, step: int) -> torch.Tensor:
    """The global batch of a step: (world x micro, seq_len + 1) tokens, the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = spec.training.micro_batch_size * spec.world_size
    return torch.randint(0, spec.model.vocab_size, (rows, spec.data.seq_len + 1), generator=g)


def micro_batch(spec, step: int, rank: int):
    """Rank ``rank``'s rows of step ``step`` (accumulation 1), placed in the run's rows as the loader places them."""
    from pipeline.data.mixture import MicroBatch

    micro, rows = spec.training.micro_batch_size, spec.training.micro_batch_size * spec.world_size
    return MicroBatch(batches(spec, step)[rank * micro : (rank + 1) * micro], step * rows, rows, rank * micro)


class GradientRecorder:
    """The real engine; `step` first copies every full gradient (ZeRO-3 collectives: every rank calls it)."""

    def __init__(self, engine):
        self.engine, self.grads = engine, []

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss):
        self.engine.backward(loss)

    def step(self):
        from deepspeed.utils import safe_get_full_grad

        self.grads.append({n: safe_get_full_grad(p).clone() for n, p in self.engine.module.named_parameters()})
        self.engine.step()


def main() -> None:
    from deepspeed.utils import safe_get_full_fp32_param, z3_leaf_module

    from pipeline.jobspec import JobSpec
    from pipeline.training.distributed import close_distributed, init_distributed
    from pipeline.training.guard import LossGuard
    from pipeline.training.step import DepthSampler, Progress, train_step
    from pipeline.training.trainer import engine_for_job

    spec = JobSpec.model_validate(json.loads(sys.argv[1]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed("cpu")
    t = spec.training
    engine = engine_for_job(spec, world, rank, "cpu")
    if os.environ.get("LOSS_CHUNK_ROWS"):  # the loss over several chunks (recomputed in the backward)
        engine.module.loss_chunk_rows = int(os.environ["LOSS_CHUNK_ROWS"])
    # the recurrence is gathered as one unit only when asked (it then has no per-module hooks of its own)
    assert z3_leaf_module(engine.module.transformer.recurrence) == (spec.zero.gather_unit == "block")
    recorder = GradientRecorder(engine)
    sampler = DepthSampler.for_model(spec.model.build(), seed=t.seed, global_batch=t.micro_batch_size * world)
    guard, losses = LossGuard(None), []
    first, checkpoint = int(os.environ.get("STEP_FROM", "0")), os.environ.get("CHECKPOINT")
    if checkpoint and first:  # the second half of a run interrupted after step `first`
        engine.load_checkpoint(checkpoint, tag="mid")
    progress = Progress(step=first)
    for step in range(first, int(os.environ.get("STEPS", "20"))):
        rows = iter([micro_batch(spec, step, rank)])
        result = train_step(
            recorder, rows, sampler, guard, progress, accumulation=1, max_nonfinite=1, device=torch.device("cpu")
        )
        losses.append(result.loss)
        progress.step += 1
    if checkpoint and not first:
        engine.save_checkpoint(checkpoint, tag="mid")
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"grads": recorder.grads, "weights": weights, "losses": losses}, sys.argv[2])
    torch.distributed.barrier()
    close_distributed()  # a group left to the interpreter's exit can abort the process


if __name__ == "__main__":
    main()
