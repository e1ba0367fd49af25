"""The model's own configuration: plain data, no torch, no pipeline.

`ParcaeConfig` describes both the looped Parcae model (``arch="parcae"``) and the fixed-depth GPT
baseline built from the same block (``arch="gpt"``, ``n_layers`` unique layers). It is the one place a
model field is declared: its default, its bounds and description (field metadata) and the rules across
fields (`problems`). The pipeline's `ModelSpec` derives its fields from it and reports its problems
with dotted paths; the model itself only asserts there are none (`check`).

Counting (`count_params`, `paper_flops_per_token`, `hardware_flops_per_token`) is analytic and exact for the
architecture in ``model/parcae.py``; a test compares it with the parameters of the real module built on the
meta device. The two FLOP counts differ on purpose: the paper's convention (planning, sweeps, anything
compared with the paper's fits) and what the devices compute (MFU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

Arch = Literal["parcae", "gpt"]
Injection = Literal["diagonal", "add", "concat"]
H0Init = Literal["like_init", "zeros"]

VE_GATE_CHANNELS = 32  # value-embedding gate reads the first 32 channels of the block input
MAX_LOOPS = 1024  # loop counts (mean recurrence, backprop depth, test-time loops) beyond this make no sense
VOCAB_MULTIPLE = 64


def _field(default: Any, doc: str = "", **bounds: float) -> Any:
    """A config field with its description and numeric bounds (``gt``/``ge``/``le``) as metadata: the job
    spec's ``ModelSpec`` derives its fields, types, defaults, bounds and descriptions from these. Upper
    bounds are what the code can represent and what makes sense (a Poisson draw of mean 1e23 overflows)."""
    return field(default=default, metadata={"doc": doc, **bounds})


class ConfigProblem(NamedTuple):
    """A combination of values the model cannot be built with: the field to blame, why, every field read."""

    field: str
    message: str
    reads: tuple[str, ...]


@dataclass(frozen=True)
class ParcaeConfig:
    arch: Arch = _field("parcae")
    vocab_size: int = _field(32768, gt=0, le=2**22)
    d_model: int = _field(768, gt=0, le=65536)
    n_head: int = _field(6, gt=0, le=1024)
    n_prelude: int = _field(2, ge=0, le=1024)
    n_core: int = _field(2, gt=0, le=1024)
    n_coda: int = _field(2, ge=0, le=1024)
    n_layers: int = _field(12, "Unique layers of the GPT baseline (arch=gpt only).", gt=0, le=1024)
    max_seq_len: int = _field(2048, "Context length (RoPE tables are built for it).", gt=0, le=2**20)
    injection: Injection = _field("diagonal", "diagonal = Parcae's stable injection; add / concat = RDM baselines.")
    mean_recurrence: int = _field(8, "Mean of the per-sequence Poisson loop count.", gt=0, le=MAX_LOOPS)
    mean_backprop_depth: int = _field(4, "Loops run with gradients (truncated backprop).", gt=0, le=MAX_LOOPS)
    h0_init: H0Init = _field("like_init")
    activation_checkpointing: bool = _field(True, "Checkpoint each loop iteration.")
    value_embeddings: bool = _field(True)
    rope_base: float = _field(50000.0, gt=0, le=1e12)
    norm_eps: float = _field(1e-5, gt=0, le=1.0)

    def problems(self) -> list[ConfigProblem]:
        """Every rule across fields this config breaks (bounds of single fields are in the metadata)."""
        problems = []
        width = ("d_model", "n_head")
        if self.d_model % self.n_head:
            problems.append(ConfigProblem("n_head", f"must divide d_model={self.d_model}", width))
        elif (self.d_model // self.n_head) % 2:
            problems.append(ConfigProblem("n_head", "d_model / n_head must be even for RoPE", width))
        if self.mean_backprop_depth > self.mean_recurrence:
            message = f"must be <= model.mean_recurrence ({self.mean_recurrence})"
            problems.append(ConfigProblem("mean_backprop_depth", message, ("mean_backprop_depth", "mean_recurrence")))
        if self.value_embeddings and self.d_model < VE_GATE_CHANNELS:
            message = (
                f"must be >= {VE_GATE_CHANNELS} with value_embeddings (the gate reads {VE_GATE_CHANNELS} channels)"
            )
            problems.append(ConfigProblem("d_model", message, ("d_model", "value_embeddings")))
        return problems

    def check(self) -> None:
        """Internal invariant: the model is only built from a config without problems."""
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{p.field}: {p.message}" for p in problems))

    @property
    def looped(self) -> bool:
        return self.arch == "parcae"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def num_unique_layers(self) -> int:
        return self.n_prelude + self.n_core + self.n_coda if self.looped else self.n_layers

    @property
    def core_layers(self) -> range:
        """Unique-layer indices of the core blocks (empty for the GPT baseline)."""
        return range(self.n_prelude, self.n_prelude + self.n_core) if self.looped else range(0)

    @property
    def sigma(self) -> float:
        """Entry std of every initialised matrix and of h_0: sqrt(2 / (5 d))."""
        return init_std(self.d_model)

    def has_value_embedding(self, layer: int) -> bool:
        """The reference's rule: the unique layers with the last one's parity own a value embedding
        (``layer % 2 == (n - 1) % 2``: 1, 3, 5, ... for an even count, 0, 2, 4, ... for an odd one)."""
        if not self.value_embeddings:
            return False
        return layer % 2 == (self.num_unique_layers - 1) % 2

    def value_embedding_layers(self) -> list[int]:
        return [i for i in range(self.num_unique_layers) if self.has_value_embedding(i)]


def init_std(d_model: int) -> float:
    """sqrt(2 / (5 d)): the entry std of the initialised matrices and of a like-init h_0."""
    return math.sqrt(2.0 / (5.0 * d_model))


def _block_params(cfg: ParcaeConfig, layer: int) -> int:
    d = cfg.d_model
    attn = 4 * d * d
    mlp = 2 * d * 4 * d
    norms = 2 * d
    gate = VE_GATE_CHANNELS * cfg.n_head if cfg.has_value_embedding(layer) else 0
    return attn + mlp + norms + gate


def _injection_params(cfg: ParcaeConfig) -> int:
    d = cfg.d_model
    if cfg.injection == "diagonal":
        return 2 * d + d * d  # A_log, dt_bias, B
    if cfg.injection == "concat":
        return 2 * d * d
    return 0


def count_params(cfg: ParcaeConfig) -> dict[str, int]:
    """Parameter counts by part. ``total`` counts the tied embedding/head once."""
    d, v = cfg.d_model, cfg.padded_vocab_size
    layers = range(cfg.num_unique_layers)
    embedding = v * d
    value_embeddings = len(cfg.value_embedding_layers()) * v * d
    if cfg.looped:
        core_layers = cfg.core_layers
        core = sum(_block_params(cfg, i) for i in core_layers) + _injection_params(cfg)
        other_blocks = sum(_block_params(cfg, i) for i in layers if i not in core_layers)
        other = other_blocks + d * d + 2 * d  # readout C, ln_prelude, ln_f
    else:
        core = 0
        other = sum(_block_params(cfg, i) for i in layers) + d  # ln_f
    return {
        "embedding": embedding,
        "value_embeddings": value_embeddings,
        "core": core,
        "other": other,
        "total": embedding + value_embeddings + core + other,
    }


def _loop_means(cfg: ParcaeConfig, mean_recurrence: float | None, mean_backprop_depth: float | None):
    mean_rec = cfg.mean_recurrence if mean_recurrence is None else mean_recurrence
    mean_bwd = cfg.mean_backprop_depth if mean_backprop_depth is None else mean_backprop_depth
    return mean_rec, mean_bwd


def _attention_forward(cfg: ParcaeConfig, seq_len: int) -> int:
    """One layer's attention forward per token: QK^T and AV, 2 d seq_len each (no causal savings)."""
    return 4 * cfg.d_model * seq_len


def _attention_flops(cfg: ParcaeConfig, seq_len: int, mean_rec: float, mean_bwd: float) -> float:
    """Attention scores and mixing per token: 4 d seq_len per layer forward (QK^T and AV, without causal
    savings, as nanochat and PaLM count), twice that backward; core layers once per loop forward and
    twice per backpropagated loop."""
    attn_fwd = _attention_forward(cfg, seq_len)
    outside = cfg.num_unique_layers - (cfg.n_core if cfg.looped else 0)
    flops = 3 * attn_fwd * outside
    if cfg.looped:
        flops += (mean_rec + 2 * mean_bwd) * attn_fwd * cfg.n_core
    return float(flops)


def recompute_flops_per_token(
    cfg: ParcaeConfig,
    seq_len: int,
    mean_recurrence: float | None = None,
    mean_backprop_depth: float | None = None,
) -> float:
    """FLOPs per token that per-loop activation checkpointing adds: each backpropagated loop's forward runs
    again in the backward, mean_bwd times: 2 N_core + the core's attention, less the loop body's last matmul
    (the last MLP's down projection: non-reentrant checkpointing stops recomputing once every tensor the
    backward needs is back, and nothing saves that matmul's output). Zero without checkpointing and for the
    GPT baseline. hardware_flops_per_token + this is what the matmuls execute: the numerator of HFU
    (hardware FLOPs utilisation), where MFU leaves recomputation out as PaLM defines it."""
    if not (cfg.looped and cfg.activation_checkpointing):
        return 0.0
    _, mean_bwd = _loop_means(cfg, mean_recurrence, mean_backprop_depth)
    last_projection = 4 * cfg.d_model**2
    attention = _attention_forward(cfg, seq_len) * cfg.n_core
    return float(mean_bwd * (2 * (count_params(cfg)["core"] - last_projection) + attention))


def _core_block_params(cfg: ParcaeConfig) -> int:
    return sum(_block_params(cfg, i) for i in cfg.core_layers)


def paper_flops_per_token(
    cfg: ParcaeConfig,
    seq_len: int,
    mean_recurrence: float | None = None,
    mean_backprop_depth: float | None = None,
) -> float:
    """Training FLOPs per token in the paper's convention (its cost script: the basis of its isoFLOP sweeps
    and scaling-law fits). Use it for planning and anything compared with the paper.

    6 N_other + (2 mean_rec + 4 mean_bwd) N_core_blocks + attention, where N_other = all parameters -
    the token embedding - the core blocks (value embeddings, the injection, C and the norms included; the
    tied head not counted separately). About 1.36 GFLOP/token for parcae-140m.
    """
    mean_rec, mean_bwd = _loop_means(cfg, mean_recurrence, mean_backprop_depth)
    counts = count_params(cfg)
    core_blocks = _core_block_params(cfg)
    n_other = counts["total"] - counts["embedding"] - core_blocks
    flops = 6 * n_other + (2 * mean_rec + 4 * mean_bwd) * core_blocks if cfg.looped else 6 * n_other
    return float(flops) + _attention_flops(cfg, seq_len, mean_rec, mean_bwd)


def hardware_flops_per_token(
    cfg: ParcaeConfig,
    seq_len: int,
    mean_recurrence: float | None = None,
    mean_backprop_depth: float | None = None,
) -> float:
    """Training FLOPs per token the chips compute (forward + backward, recomputation not counted): for MFU.

    6 N_other + (2 mean_rec + 4 mean_bwd) N_core + attention, where N excludes the embedding and value
    embedding tables (lookups, not matmuls) but includes the tied LM head (a matmul); the core (blocks and
    injection) runs forward on every loop (2 N) and backward on the backpropagated ones (4 N).
    About 1.07 GFLOP/token for parcae-140m.
    """
    mean_rec, mean_bwd = _loop_means(cfg, mean_recurrence, mean_backprop_depth)
    counts = count_params(cfg)
    head = cfg.padded_vocab_size * cfg.d_model
    flops = 6 * (counts["other"] + head)
    if cfg.looped:
        flops += (2 * mean_rec + 4 * mean_bwd) * counts["core"]
    return float(flops) + _attention_flops(cfg, seq_len, mean_rec, mean_bwd)
