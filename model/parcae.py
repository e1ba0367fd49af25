"""Parcae: a stable looped language model, and the fixed-depth GPT baseline built from the same block.

Read top to bottom; docs/parcae.md is the account of the paper every choice here follows. A second,
self-contained copy for Hugging Face remote code is `model/hf_template/modeling_parcae.py`;
tests/pipeline/jobs/test_hf_export.py holds the two to the same logits and tokens (change both together).

    ids -> wte -> PRELUDE blocks -> ln_prelude -> e                       (the injected signal)
    h_0 = truncated normal (std sigma, cut at 3 sigma, fresh each forward) or zeros
    for each loop:  u = adapter(h, e)  (diagonal: A_bar * h + Delta * B e);  h = CORE blocks(u)
    x = C h -> CODA blocks -> ln_f -> tied LM head (logits in fp32)

Design choices:
- Pre-norm blocks: RMSNorm (learnable weight, fp32, eps 1e-5); causal attention without biases, RoPE
  (base 50,000, interleaved pairs) then a parameter-free RMS QK-norm, both in fp32, softmax scale
  1/sqrt(head_dim); MLP d -> 4d -> d with 0.5 * relu(x)^2.
- Value embeddings (nanochat): the unique layers with the last one's parity own a vocab x d table; there
  v += 2 * sigmoid(ve_gate(x[..., :32])) * ve(ids), one gate per head. The core reuses its own on every loop.
- Injection: ``diagonal`` (Parcae) keeps the spectral radius max(A_bar) < 1 by construction; ``add``
  (h + e) and ``concat`` (Linear(2d -> d)) are the RDM baselines.
- Loop control: every forward takes per-sequence counts of loops run without gradients (first) and
  with gradients (last; truncated backprop). A row whose count is done is frozen and, by default,
  costs nothing: each loop runs the core on the rows still looping only (gather, then index_copy back).
- Activation checkpointing per loop iteration with torch's non-reentrant checkpoint; A_bar and the
  value-embedding lookups are computed inside the checkpointed step.
- The loss is computed over chunks of positions (at most LOSS_CHUNK_ELEMENTS fp32 logits each), fused with the
  head: each chunk's loss gradient is taken as it is computed (`model.loss`), so peak memory holds one chunk's
  logits, whatever batch x sequence x vocabulary, and nothing is recomputed.
- Every parameter is used inside its own module's forward (the tied LM head is a mode of the embedding
  module), so ZeRO-3's gather hooks see every use. No DeepSpeed import here.
- The looped part (injection, core blocks, their value embeddings) is one module, `Recurrence`, whose
  forward runs every loop: ZeRO-3 can gather it as one unit, once per forward, whatever the loop count.
- Parameter names map one to one onto the reference implementation's (model/weights.py): released
  weights load as they are.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import generation
from model.cache import KVCache, LayerKV, RowsKV
from model.config import VE_GATE_CHANNELS, ParcaeConfig
from model.loss import linear_cross_entropy

LoopCounts = tuple[torch.Tensor, torch.Tensor]  # (no-grad loops, grad loops), each (batch,) int64 on CPU
Generators = torch.Generator | list[torch.Generator] | None  # one for the batch, or one per row


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(seq_len: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin, (seq_len, head_dim / 2) in fp32, for interleaved channel pairs."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of x: (batch, seq, heads, head_dim), in fp32."""
    x = x.float()
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ParcaeConfig, has_value_embedding: bool):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim, self.eps = cfg.n_head, cfg.head_dim, cfg.norm_eps
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, d, bias=False)
        self.c_v = nn.Linear(d, d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, cfg.n_head, bias=False) if has_value_embedding else None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        ve: torch.Tensor | None,
        cache: LayerKV | RowsKV | None = None,
    ) -> torch.Tensor:
        """Causal self-attention; with ``cache`` the new positions also attend to the cached ones (and are
        added to it), ``rope`` then holding the new positions' rows."""
        b, t, _ = x.shape
        shape = (b, t, self.n_head, self.head_dim)
        q, k, v = self.c_q(x).view(shape), self.c_k(x).view(shape), self.c_v(x).view(shape)
        if ve is not None:
            assert self.ve_gate is not None
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(shape)
        q = F.rms_norm(apply_rotary(q, *rope), (self.head_dim,), eps=self.eps).to(x.dtype)
        k = F.rms_norm(apply_rotary(k, *rope), (self.head_dim,), eps=self.eps).to(x.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.head_dim**-0.5)
        else:
            mask = cache.mask(t)
            k, v = cache.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(0.5 * F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ParcaeConfig, layer: int):
        super().__init__()
        self.layer = layer  # global index over prelude + core + coda: selects the value embedding
        self.norm_1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, cfg.has_value_embedding(layer))
        self.norm_2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        ve: torch.Tensor | None,
        cache: LayerKV | RowsKV | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, ve, cache)
        return x + self.mlp(self.norm_2(x))


class DiagonalInjection(nn.Module):
    """Parcae: u = A_bar * h + Delta * (B e), A_bar = exp(-softplus(dt_bias) * exp(A_log)) in (0, 1)."""

    def __init__(self, d: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.empty(d, d))

    # exp(-rate) rounds to 1.0 in fp32 once rate < ~3e-8: keep the rate above 1e-6 so that max(A_bar)
    # <= exp(-1e-6) < 1 holds numerically for any parameter values, not only in exact arithmetic.
    # A_log is capped so that exp(A_log) stays finite (0 * inf would be NaN when Delta underflows).
    MIN_RATE = 1e-6
    MAX_A_LOG = 80.0

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_bar, Delta) in fp32. max(A_bar) is the spectral radius of the loop's linear part."""
        delta = F.softplus(self.dt_bias.float())
        rate = delta * torch.exp(self.A_log.float().clamp(max=self.MAX_A_LOG))
        return torch.exp(-rate.clamp(min=self.MIN_RATE)), delta

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        a_bar, delta = self.discretize()
        return (a_bar * h + delta * F.linear(e, self.B)).to(h.dtype)

    SPECTRAL_PARAMS = ("A_log", "dt_bias")  # what spectral_stats reads (a sharded trainer gathers these)

    @torch.no_grad()
    def spectral_stats(self) -> dict[str, float]:
        """The spectral radius of the loop's linear part, max(A_bar), and mean(A_bar)."""
        a_bar, _ = self.discretize()
        return {"spectral_radius": float(a_bar.max()), "a_bar_mean": float(a_bar.mean())}


class AddInjection(nn.Module):
    """RDM baseline: u = h + e (A = I, spectral radius exactly 1)."""

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + e

    SPECTRAL_PARAMS = ()

    def spectral_stats(self) -> dict[str, float]:
        return {"spectral_radius": 1.0}


class ConcatInjection(nn.Module):
    """RDM baseline: u = W [h; e] with W: 2d -> d unconstrained."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, 2 * d))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.cat((h, e), dim=-1), self.weight)

    MAX_EIG_DIM = 4096  # above this an eigendecomposition per log step costs more than it tells
    SPECTRAL_PARAMS = ("weight",)

    @torch.no_grad()
    def spectral_stats(self) -> dict[str, float]:
        """max |eigenvalue| of the block of W acting on h."""
        d = self.weight.shape[0]
        if d > self.MAX_EIG_DIM:
            return {}
        return {"spectral_radius": float(torch.linalg.eigvals(self.weight[:, :d].float()).abs().max())}


INJECTIONS: dict[str, Callable[[int], nn.Module]] = {
    "diagonal": DiagonalInjection,
    "add": lambda d: AddInjection(),
    "concat": ConcatInjection,
}


class Readout(nn.Linear):
    """C: the bias-free d_rec -> d projection of the final recurrent state."""

    def __init__(self, d: int):
        super().__init__(d, d, bias=False)


class Embedding(nn.Embedding):
    """nn.Embedding without its own N(0, 1) draw at construction: `ParcaeLM.init_weights` initialises every
    parameter, so that draw was thrown away, and on the meta device (where models are built) it imported
    torch._dynamo, a second of start-up for every `parcae eval`, `generate`, `export` and `import`."""

    def reset_parameters(self) -> None:
        pass


class TiedEmbedding(Embedding):
    """Token embedding that is also the LM head, so every use runs inside this module's forward: the
    embedding, the head's logits (``as_head``), and the head fused with its summed cross-entropy
    (``targets``, computed over chunks of ``chunk_rows`` positions: `model.loss`)."""

    def forward(
        self,
        x: torch.Tensor,
        as_head: bool = False,
        targets: torch.Tensor | None = None,
        chunk_rows: int = 0,
    ) -> torch.Tensor:
        if targets is not None:
            return linear_cross_entropy(x, self.weight, targets, chunk_rows)
        return F.linear(x, self.weight) if as_head else super().forward(x)


def _blocks(cfg: ParcaeConfig, first: int, n: int) -> nn.ModuleList:
    return nn.ModuleList(Block(cfg, first + i) for i in range(n))


def _value_embeddings(cfg: ParcaeConfig, layers) -> nn.ModuleDict:
    return nn.ModuleDict({str(i): Embedding(cfg.padded_vocab_size, cfg.d_model) for i in layers})


class Recurrence(nn.Module):
    """The looped part: the injection (``adapter``), the core blocks and the core's value embeddings.

    One forward runs every loop, so a sharded trainer can treat the recurrence as one unit: its
    parameters are gathered once per forward (they are reused by every loop anyway) and the sequence
    of modules the trainer sees does not depend on the loop count.
    """

    def __init__(self, cfg: ParcaeConfig):
        super().__init__()
        self.cfg = cfg
        self.adapter = INJECTIONS[cfg.injection](cfg.d_model)
        self.core_block = _blocks(cfg, cfg.n_prelude, cfg.n_core)
        self.value_embeds = _value_embeddings(cfg, [i for i in cfg.value_embedding_layers() if i in cfg.core_layers])

    def forward(
        self,
        h: torch.Tensor,
        e: torch.Tensor,
        idx: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        counts: LoopCounts,
        skip_finished_rows: bool,
        min_iterations: tuple[int, int],
        collect_stats: bool = False,
    ) -> torch.Tensor:
        """No-grad loops first, then the loops that backpropagate (truncated BPTT). With ``collect_stats``,
        ``self.loop_stats`` holds one dict per loop afterwards (an attribute, not an argument: a sharding
        wrapper's hooks may rebuild the arguments of a forward, so appending to a passed list is unsafe)."""
        b = h.shape[0]
        # One layout of the ids for every call of the loop body: they arrive as a slice of the (B, T+1) token
        # rows (row stride T+1) and the rows still looping as a copy (stride T); dynamo guards a core layer's
        # value-embedding input on its strides, so each layout would be a compiled variant of its own, and the
        # first would compile mid-run (after `ParcaeLM.warm_up_compiled`).
        idx = idx.contiguous()
        self.loop_stats: list[dict[str, float]] = []
        n_nograd, n_grad = counts
        phases = ((n_nograd, False, min_iterations[0]), (n_grad, torch.is_grad_enabled(), min_iterations[1]))
        for phase_counts, with_grad, at_least in phases:
            checkpointed = with_grad and self.cfg.activation_checkpointing
            with torch.set_grad_enabled(with_grad):
                for step in range(max(int(phase_counts.max()), at_least)):
                    active = (phase_counts > step).nonzero().squeeze(1)
                    h_prev = h
                    if len(active) == b:  # every row still loops
                        h = self._loop_step(h, e, idx, rope, checkpointed)
                    elif skip_finished_rows:  # only the rows still looping run the core
                        rows = active.to(h.device)
                        h = h.index_copy(0, rows, self._loop_step(h[rows], e[rows], idx[rows], rope, checkpointed))
                    else:  # the reference's way: every row runs, finished rows keep their state
                        keep = (phase_counts > step).to(h.device)[:, None, None]
                        h = torch.where(keep, self._loop_step(h, e, idx, rope, checkpointed), h)
                    if collect_stats and len(active):
                        self.loop_stats.append(_change_stats(h_prev, h, active.to(h.device)))
        return h

    compiled_core: Callable[..., torch.Tensor] | None = None  # the loop body compiled (ParcaeLM.compile_units)

    def _loop_step(self, h, e, idx, rope, use_checkpoint: bool) -> torch.Tensor:
        # The compiled body serves 2 rows or more; 0 and 1 rows run eager: dynamo specialises those sizes, so
        # each would be a graph of its own, compiled whenever the loop draws first produce it (mid-run).
        core = self.compiled_core if self.compiled_core is not None and h.shape[0] >= 2 else self._core
        if use_checkpoint:
            return checkpoint(core, h, e, idx, rope, use_reentrant=False)
        return core(h, e, idx, rope)

    def _core(self, h: torch.Tensor, e: torch.Tensor, idx: torch.Tensor, rope) -> torch.Tensor:
        """One loop iteration: inject, then the core blocks (one checkpointed region)."""
        u = self.adapter(h, e)
        for block in self.core_block:
            key = str(block.layer)
            u = block(u, rope, self.value_embeds[key](idx) if key in self.value_embeds else None)
        return u


# The loss computes the fp32 logits of at most this many elements at a time (128 MiB): at vocab 32,768 that
# is 1,024 positions per chunk; a batch of fewer positions is one chunk.
LOSS_CHUNK_ELEMENTS = 2**25


class ParcaeLM(nn.Module):
    def __init__(self, cfg: ParcaeConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.loss_chunk_rows: int | None = None  # positions per loss chunk (None: LOSS_CHUNK_ELEMENTS / vocab)
        self.compiled_units = 0  # set by compile_units
        d, v = cfg.d_model, cfg.padded_vocab_size
        if cfg.looped:
            self.transformer = nn.ModuleDict(
                {
                    "wte": TiedEmbedding(v, d),
                    "prelude": _blocks(cfg, 0, cfg.n_prelude),
                    "ln_prelude": RMSNorm(d, cfg.norm_eps),
                    "recurrence": Recurrence(cfg),
                    "C": Readout(d),
                    "coda": _blocks(cfg, cfg.n_prelude + cfg.n_core, cfg.n_coda),
                    "ln_f": RMSNorm(d, cfg.norm_eps),
                }
            )
            outside = [i for i in cfg.value_embedding_layers() if i not in cfg.core_layers]
            self.value_embeds = _value_embeddings(cfg, outside)
        else:
            self.transformer = nn.ModuleDict(
                {"wte": TiedEmbedding(v, d), "h": _blocks(cfg, 0, cfg.n_layers), "ln_f": RMSNorm(d, cfg.norm_eps)}
            )
            self.value_embeds = _value_embeddings(cfg, cfg.value_embedding_layers())

    # ----------------------------------------------------------------------------------------------
    # Initialisation
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter (the model may have been built on the meta device).

        | parameter                               | init                                           |
        |-----------------------------------------|------------------------------------------------|
        | c_q, c_k, c_v, mlp.fc, C, wte (tied)    | orthogonal, entry std sigma = sqrt(2 / (5 d))   |
        | c_proj, mlp.proj                        | zeros (every block starts as the identity)     |
        | value embeddings                        | N(0, 1)                                        |
        | ve_gate                                 | PyTorch's Linear default, U(+-1/sqrt(32))       |
        | RMSNorm weights                         | ones                                           |
        | diagonal injection                      | A_log 0, Delta = ln(5) / 2 so A_bar = 0.447; B = I |
        | concat injection                        | truncated normal, std sigma, cut at 3 sigma    |

        Each module is initialised by `init_module`, so a sharded run can gather one module at a time.
        """
        for module in self.modules():
            self.init_module(module, generator)

    @torch.no_grad()
    def init_module(self, module: nn.Module, generator: torch.Generator | None = None) -> None:
        """Initialise the parameters ``module`` is responsible for (see `INIT_TYPES`; others: nothing).
        Random values are drawn in fp32 and then stored in the parameter's dtype, so a bf16 model starts
        from the same (rounded) values as an fp32 one (and bf16 has no QR for the orthogonal init)."""
        sigma = self.cfg.sigma

        def drawn(w: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
            values = torch.empty(w.shape, dtype=torch.float32, device=w.device)
            init(values)
            w.copy_(values)

        def orthogonal(w: torch.Tensor) -> None:
            drawn(w, lambda t: nn.init.orthogonal_(t, gain=sigma * math.sqrt(max(w.shape)), generator=generator))

        if isinstance(module, TiedEmbedding):
            orthogonal(module.weight)
        elif isinstance(module, nn.Embedding):
            drawn(module.weight, lambda t: nn.init.normal_(t, 0.0, 1.0, generator=generator))
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention):
            for w in (module.c_q.weight, module.c_k.weight, module.c_v.weight):
                orthogonal(w)
            nn.init.zeros_(module.c_proj.weight)
            if module.ve_gate is not None:  # the reference keeps nn.Linear's default: gates start near, not at, 1
                bound = 1.0 / math.sqrt(VE_GATE_CHANNELS)
                drawn(module.ve_gate.weight, lambda t: nn.init.uniform_(t, -bound, bound, generator=generator))
        elif isinstance(module, MLP):
            orthogonal(module.fc.weight)
            nn.init.zeros_(module.proj.weight)
        elif isinstance(module, DiagonalInjection):
            nn.init.zeros_(module.A_log)
            delta = 0.5 * math.log(5.0)  # -ln(sqrt(1/5)): A_bar = exp(-delta) = sqrt(1/5) ~ 0.447
            module.dt_bias.fill_(math.log(math.expm1(delta)))
            nn.init.eye_(module.B)
        elif isinstance(module, ConcatInjection):
            drawn(
                module.weight,
                lambda t: nn.init.trunc_normal_(t, 0.0, sigma, -3 * sigma, 3 * sigma, generator=generator),
            )
        elif isinstance(module, Readout):
            orthogonal(module.weight)

    # ----------------------------------------------------------------------------------------------
    # Forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        loops: LoopCounts | int | None = None,
        h0: torch.Tensor | None = None,
        generator: Generators = None,
        skip_finished_rows: bool = True,
        min_iterations: tuple[int, int] = (0, 0),
        loop_stats: list[dict[str, float]] | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, padded vocab) in fp32, or the mean cross-entropy when ``targets`` is given
        (positions with target -100 are ignored).

        ``loops`` (looped model only): an int T runs T loops, all of them with gradients when grad is
        enabled; a pair (n_nograd, n_grad) of per-row int64 tensors runs n_nograd[i] loops without
        gradients, then n_grad[i] with them, for row i. ``h0`` overrides the initial state; otherwise
        it follows ``cfg.h0_init`` (``generator``, or one per row, seeds the like-init draw). ``loop_stats``, if a list,
        receives one dict per loop: the mean norm of h over active rows and its relative change.
        ``min_iterations`` (no-grad, grad) runs at least that many iterations of each phase, calling the
        core on zero rows when none is active: data-parallel ranks whose batches drew different counts
        then still run the same sequence of modules (ZeRO-3 gathers parameters collectively).
        """
        b, t = idx.shape
        rope = rotary_tables(t, self.cfg.head_dim, self.cfg.rope_base, idx.device)
        x = self.transformer.wte(idx)
        if not self.cfg.looped:
            if loops is not None or h0 is not None:
                raise ValueError("loops / h0 were given, but this is not a looped model (arch=gpt)")
            for block in self.transformer.h:
                x = block(x, rope, self._value_embedding(block, idx))
            return self._head(x, targets)

        for block in self.transformer.prelude:
            x = block(x, rope, self._value_embedding(block, idx))
        e = self.transformer.ln_prelude(x)
        h = self.initial_state(e, generator) if h0 is None else h0.to(e.dtype)  # the state lives in e's dtype
        counts = self._loop_counts(loops, b)
        recurrence = self.transformer.recurrence
        h = recurrence(h, e, idx, rope, counts, skip_finished_rows, min_iterations, loop_stats is not None)
        if loop_stats is not None:
            loop_stats.extend(recurrence.loop_stats)
        x = self.transformer.C(h)
        for block in self.transformer.coda:
            x = block(x, rope, self._value_embedding(block, idx))
        return self._head(x, targets)

    def compile_units(self) -> int:
        """``torch.compile`` the repeated units in place: every block outside the loop (every block of the
        GPT baseline) and the loop body (injection + core blocks, one graph per loop). Only their
        ``forward`` is replaced, so parameter names, state dicts and module hooks (a sharding wrapper's)
        stay as they are. Shapes are compiled dynamic from the start: the loop body sees a batch of
        however many rows still loop, and that must not recompile (below 2 rows it runs eager). Each unit
        compiles at its first call in each grad mode; `warm_up_compiled` makes all of them now. Returns
        the number of units."""
        # The variants: blocks with and without grad; the loop body without grad, and with grad for an
        # incoming state that does not / does require grad. A unit past dynamo's recompile limit would
        # silently run eager: the limit is raised well above that count.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        units: list[nn.Module] = list(self.transformer.h) if not self.cfg.looped else []
        if self.cfg.looped:
            units = [*self.transformer.prelude, *self.transformer.coda]
            recurrence = self.transformer.recurrence
            recurrence.compiled_core = torch.compile(recurrence._core, dynamic=True)
        for block in units:
            block.forward = _compiled_unless_cached(block.forward)
        self.compiled_units = len(units) + int(self.cfg.looped)
        return self.compiled_units

    def warm_up_compiled(self, seq_len: int, gather: Callable[[nn.Module], Any] | None = None) -> None:
        """Compile now every variant training and evaluation meet, so that none compiles mid-run: each block
        outside the loop with and without grad; the loop body without grad (for e that does not / does
        require grad: evaluation, and training's no-grad loops) and with grad (for an incoming state that
        does not / does require grad), forward and backward (through the per-loop checkpoint, as in
        training). Inputs are random, 3 rows of ``seq_len`` (shapes are dynamic: 3 matches no other size, so
        no dimension is tied to another); gradients are taken with respect to them only, so no parameter's
        ``.grad`` is touched. ``gather(module)`` is a context in which that module's parameters are whole (a
        sharded trainer's); the caller sets the autocast state training runs under."""
        assert self.compiled_units, "compile_units() first"
        gather = gather or (lambda module: contextlib.nullcontext())
        weight = self.transformer.wte.weight
        rows, d, dtype, device = 3, self.cfg.d_model, weight.dtype, weight.device
        rope = rotary_tables(seq_len, self.cfg.head_dim, self.cfg.rope_base, device)  # as forward makes them
        idx = torch.zeros(rows, seq_len, dtype=torch.long, device=device)

        def state(grad: bool, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(rows, seq_len, d, dtype=dtype, device=device).requires_grad_(grad)

        # under autocast the readout C hands the coda a state in the autocast dtype (a guarded input dtype)
        autocast = torch.is_autocast_enabled(device.type)
        coda_dtype = torch.get_autocast_dtype(device.type) if autocast else dtype
        coda = set(self.transformer.coda) if self.cfg.looped else set()

        def backward(out: torch.Tensor, inputs: list[torch.Tensor]) -> None:
            torch.autograd.grad(out.float().square().mean(), [x for x in inputs if x.requires_grad])

        tr = self.transformer
        blocks = list(tr.h) if not self.cfg.looped else [*tr.prelude, *tr.coda]
        was_training = self.training
        try:
            for block in blocks:
                with gather(block):
                    has_ve = str(block.layer) in self.value_embeds
                    for grad in (False, True):
                        self.train(grad)
                        x, ve = state(grad, coda_dtype if block in coda else dtype), state(grad) if has_ve else None
                        with torch.set_grad_enabled(grad):
                            out = block.forward(x, rope, ve)
                        if grad:
                            backward(out, [x] + ([ve] if ve is not None else []))
            if self.cfg.looped:
                recurrence = self.transformer.recurrence
                assert recurrence.compiled_core is not None
                with gather(recurrence):
                    for e_grad in (False, True):  # no-grad loops: in evaluation, and in training (e requires grad)
                        self.train(e_grad)
                        with torch.no_grad():
                            recurrence.compiled_core(state(False), state(e_grad), idx, rope)
                    self.train()
                    e = state(True)
                    for h in (state(False), state(True)):
                        out = recurrence._loop_step(h, e, idx, rope, self.cfg.activation_checkpointing)
                        backward(out, [h, e])
        finally:
            self.train(was_training)

    def _value_embedding(self, block: Block, idx: torch.Tensor) -> torch.Tensor | None:
        key = str(block.layer)
        return self.value_embeds[key](idx) if key in self.value_embeds else None

    def _head(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.transformer.wte(x, as_head=True).float()
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        # the fp32 logits of one chunk of positions at a time, the loss's gradient computed with them
        rows = self.loss_chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // self.cfg.padded_vocab_size)
        return self.transformer.wte(x, targets=targets, chunk_rows=rows) / (targets != -100).sum()

    def initial_state(self, e: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """h_0 for the rows of ``e``: zeros, or a truncated normal draw (one generator for the batch, or one
        per row, so that a row's draw does not depend on the rows beside it)."""
        if self.cfg.h0_init == "zeros":
            return torch.zeros_like(e)
        sigma = self.cfg.sigma
        h = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        rows = list(zip(h, generator, strict=True)) if isinstance(generator, list | tuple) else [(h, generator)]
        for part, draw in rows:
            nn.init.trunc_normal_(part, 0.0, sigma, -3 * sigma, 3 * sigma, generator=draw)
        return h.to(e.dtype)

    def _loop_counts(self, loops: LoopCounts | int | None, batch: int) -> LoopCounts:
        if loops is None:
            raise ValueError(
                "the looped model needs loops=T (an int >= 1) or loops=(n_nograd, n_grad) per row; "
                "training draws them with model.sampling.sample_loop_counts"
            )
        if isinstance(loops, int):
            if loops < 1:
                raise ValueError(f"loops must be >= 1, got {loops}")
            return torch.zeros(batch, dtype=torch.long), torch.full((batch,), loops, dtype=torch.long)
        n_nograd, n_grad = (c.to("cpu", torch.long) for c in loops)
        if n_nograd.shape != (batch,) or n_grad.shape != (batch,):
            raise ValueError(
                f"loop counts must have shape ({batch},), got {tuple(n_nograd.shape)}, {tuple(n_grad.shape)}"
            )
        if (n_nograd < 0).any() or (n_grad < 0).any() or ((n_nograd + n_grad) < 1).any():
            raise ValueError("loop counts must be >= 0 with at least one loop per row")
        return n_nograd, n_grad

    # ----------------------------------------------------------------------------------------------
    # Inference (model/generation.py)
    def rope(self, t: int, device: torch.device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of positions start..start+t-1."""
        cos, sin = rotary_tables(start + t, self.cfg.head_dim, self.cfg.rope_base, device)
        return cos[start:], sin[start:]

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, *args, **kwargs) -> torch.Tensor:
        """The next-token logits (batch, padded vocab) after ``idx`` (batch, t): the new positions go through
        every layer (each core layer once per loop, h_0 = 0) attending to what ``cache`` holds, and are
        added to it (`model.generation.forward_cached`: loops, adaptive, loops_used)."""
        return generation.forward_cached(self, idx, cache, *args, **kwargs)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, loops: int | None = None, **options) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation of idx (batch, seq) with ``loops`` loops (default:
        the mean recurrence; the maximum under ``adaptive``); h_0 is zeros, so greedy generation is
        deterministic. Returns idx with the new tokens appended.

        ``use_cache`` (default): the prompt is prefilled in one forward, then each new token runs through
        the layers alone against a KV cache (`model.cache`), every core layer caching once per loop, or in
        ``core_slots`` slots (bounded memory, approximate). ``adaptive``: stop a token's loops once two
        successive loops' next-token distributions are within this KL (`model.generation`). Rows of
        different prompt lengths are left-padded in ``idx`` with ``lengths`` giving each row's real length.
        A generation longer than the context (prompt + new tokens > max_seq_len) runs the uncached way:
        ``use_cache=False`` re-runs the last max_seq_len tokens for every new token. ``vocab``: only ids below
        it are generated (a tokenizer smaller than the model's vocabulary; default the model's). ``options``:
        temperature, top_k, generator, use_cache, lengths, vocab, core_slots, adaptive (`model.generation.stream`)."""
        new = list(self.stream(idx, max_new_tokens, loops, **options))
        return torch.cat((idx, *new), dim=1)

    def stream(self, idx: torch.Tensor, max_new_tokens: int, *args, **kwargs) -> Iterator[torch.Tensor]:
        """`generate`, one step at a time: yields each step's new tokens, (batch, 1)."""
        return generation.stream(self, idx, max_new_tokens, *args, **kwargs)


def _compiled_unless_cached(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A block's forward compiled for training and evaluation; calls with a KV cache (generation, one or a
    few new positions at a time, cache objects dynamo would guard on) stay eager and compile nothing."""
    compiled = torch.compile(forward, dynamic=True)

    def dispatch(x, rope, ve, cache=None):
        return forward(x, rope, ve, cache) if cache is not None else compiled(x, rope, ve)

    return dispatch


def _change_stats(h_prev: torch.Tensor, h: torch.Tensor, active: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        new, old = h[active].float(), h_prev[active].float()
        norm = new.norm(dim=-1).mean()
        change = (new - old).norm() / old.norm().clamp_min(1e-12)
    return {"h_norm": float(norm), "relative_change": float(change), "active_rows": int(active.numel())}


# The modules `ParcaeLM.init_module` initialises, each with all of its parameters (children included).
INIT_TYPES = (TiedEmbedding, nn.Embedding, RMSNorm, Attention, MLP, DiagonalInjection, ConcatInjection, Readout)


def empty_model(cfg: ParcaeConfig, device: str | torch.device = "cpu") -> ParcaeLM:
    """The model of ``cfg`` on ``device`` with its parameters allocated and not initialised: for weights to
    be loaded into, or drawn by `ParcaeLM.init_weights`. Built on the meta device, then each parameter is
    allocated as a plain tensor: `Module.to_empty` would call ``empty_like`` on meta tensors, which goes
    through PyTorch's reference ops and imports sympy, 0.4 s of every `parcae eval`, `generate` or `export`.
    A parameter that two modules share stays shared."""
    with torch.device("meta"):
        model = ParcaeLM(cfg)
    allocated: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in allocated:
                allocated[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
            setattr(module, name, allocated[id(p)])
        for name, b in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty(b.shape, dtype=b.dtype, device=device))
    return model


def build_model(cfg: ParcaeConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> ParcaeLM:
    """Build on the meta device, allocate on ``device``, then initialise (nothing is initialised twice)."""
    model = empty_model(cfg, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    model.init_weights(generator)
    return model
