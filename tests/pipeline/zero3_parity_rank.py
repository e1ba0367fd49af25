"""One rank of the ZeRO-3 parity test (tests/pipeline/test_zero3_parity.py starts two of these).

Builds the engine exactly as `parcae train` does (zero.Init construction, rank-0 init, AdamW, clipping,
schedule), trains STEPS steps on fixed batches with the training loop's per-sequence loop counts and h_0
draws and per-loop checkpointing, and has rank 0 save every parameter's full gradient at every step and
the final fp32 weights.

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


def main() -> None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad, z3_leaf_module

    from pipeline.engine import build_engine, init_distributed
    from pipeline.spec import JobSpec
    from pipeline.train import h0_generator, loop_counts

    spec = JobSpec.model_validate(json.loads(sys.argv[1]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init_distributed("cpu")
    built = build_engine(spec, world, rank, rank)
    engine = built.engine
    # the recurrence is gathered as one unit only when asked (it then has no per-module hooks of its own)
    assert z3_leaf_module(built.model.transformer.recurrence) == (spec.zero.gather_unit == "block")
    micro = spec.training.micro_batch_size
    grads, losses = [], []
    for step in range(int(os.environ.get("STEPS", "20"))):
        batch = batches(spec, step)[rank * micro : (rank + 1) * micro]
        n_nograd, n_grad, at_least = loop_counts(spec, step, 0, rank)
        loss = engine(
            batch[:, :-1],
            batch[:, 1:],
            loops=(n_nograd, n_grad),
            min_iterations=at_least,
            generator=h0_generator(spec.training.seed, rank, step, 0, torch.device("cpu")),
        )
        engine.backward(loss)
        grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
        losses.append(float(loss))
        engine.step()
    weights = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"grads": grads, "weights": weights, "losses": losses}, sys.argv[2])


if __name__ == "__main__":
    main()
