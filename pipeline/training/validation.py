"""The training loop's periodic evaluations.

`Validator`: the loss at every ``eval.loop_counts`` T, every rank its share of the validation rows, the
sums reduced over ranks, and the fitted L(T). ``eval.protocol`` pipeline: packed rows, h_0 = 0; paper: the
reference's, one held-out document per row, like-init h_0 averaged over ``eval.h0_seeds`` seeds (each loop
count's spread over the seeds logged as ``val_loss_loops_T_std``). `DownstreamEvaluator`: CORE and
Core-Extended of ``eval.downstream.bundle`` at the same loop counts (`pipeline.evaluation.downstream`)."""

from __future__ import annotations

from typing import Any

import torch

from data_prep.inspect import packing_of
from data_prep.storage import S3Options
from data_prep.tokenizer import TextTokenizer
from model import ParcaeConfig
from pipeline.data.loader import rows_loader
from pipeline.evaluation.bundle import Bundle
from pipeline.evaluation.documents import document_batches, documents_from_rows
from pipeline.evaluation.downstream import Suite, evaluate_downstream, forward_at
from pipeline.evaluation.losses import Batch, loss_sums, seed_metrics
from pipeline.evaluation.report import downstream_scalars
from pipeline.evaluation.text import completion
from pipeline.evaluation.token_bytes import special_ids
from pipeline.jobspec import DownstreamSpec, EvalSpec, LoggingSpec


class Validator:
    """Built at start-up, so a validation set that cannot work fails then, not at the first evaluation.
    The rows (or documents) are read once, at the first evaluation, and kept on the device."""

    def __init__(
        self,
        spec: EvalSpec,
        url: str,
        options: S3Options,
        cfg: ParcaeConfig,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        seq_len: int,
        device: torch.device,
    ):
        self.spec, self.cfg = spec, cfg
        self.interval, self.max_batches = spec.interval_steps, spec.max_batches
        self.loop_counts = list(spec.loop_counts) if cfg.looped else None
        self.d_model, self.device = cfg.d_model, device
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        # the paper's protocol: every rank reads the (small) set whole, then takes its share of the documents
        ranks = {"rank": 0, "world_size": 1} if spec.protocol == "paper" else {"rank": rank, "world_size": world_size}
        self.loader = rows_loader(
            url, options, batch_size=batch_size, seq_len=seq_len, vocab_size=cfg.vocab_size, **ranks
        )
        self.batches: list[Batch] | None = None
        paper_seeds = spec.protocol == "paper" and cfg.looped
        self.seeds: list[int | None] = list(range(spec.h0_seeds)) if paper_seeds else [None]

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    @torch.no_grad()
    def run(self, engine: Any) -> dict[str, float]:
        """Every rank calls it: ``val_loss_loops_T`` per loop count (``val_loss`` for GPT), and the fit."""
        import torch.distributed as dist

        if self.batches is None:
            self.batches = self._read()
        was_training = engine.training
        engine.eval()
        try:
            per_seed = [loss_sums(engine, self.batches, self.loop_counts, self.d_model, seed) for seed in self.seeds]
        finally:
            engine.train(was_training)
        for sums in per_seed:
            dist.all_reduce(sums)
        return seed_metrics(self.loop_counts, per_seed)

    def _read(self) -> list[Batch]:
        epoch = self.loader.batches_per_epoch(0)
        if self.spec.protocol != "paper":
            n = min(epoch, self.max_batches)
            return [b.to(self.device) for _, b in zip(range(n), self.loader, strict=False)]
        rows = (row for _, b in zip(range(epoch), self.loader, strict=False) for row in b.numpy())
        bos, eos = special_ids(self.loader.manifest)
        aligned = packing_of(self.loader.manifest) == "bos-aligned"
        docs = documents_from_rows(rows, eos, self.spec.documents, aligned)
        docs = docs[: len(docs) - len(docs) % self.world_size]  # the same count on every rank: the same forwards
        mine = docs[self.rank :: self.world_size]
        batches = document_batches(mine, self.batch_size, self.cfg.max_seq_len, bos)
        return [(i.to(self.device), t.to(self.device)) for i, t in batches]


class DownstreamEvaluator:
    """``eval.downstream``: CORE (and Core-Extended) of an eval bundle at ``eval.loop_counts``, every rank
    scoring its share of the batches through the engine (h_0 = 0). Built at start-up: the bundle's items
    are read and the tokenizer loaded then, so a broken bundle fails before the first step."""

    def __init__(
        self,
        spec: DownstreamSpec,
        loop_counts: list[int],
        cfg: ParcaeConfig,
        text: TextTokenizer,
        start: int,
        options: S3Options,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
    ):
        self.spec, self.cfg, self.device = spec, cfg, device
        self.rank, self.world_size = rank, world_size
        self.loop_counts = sorted(set(loop_counts)) if cfg.looped else None
        assert spec.bundle
        self.suite = Suite.load(Bundle(spec.bundle, options), list(dict.fromkeys(spec.tasks)), spec.max_per_task)
        self.text, self.start = text, start

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.spec.interval_steps == 0 or last_step

    @torch.no_grad()
    def run(self, engine: Any) -> dict[str, float]:
        """Every rank calls it: ``downstream/core_loops_T`` (and ``core_extended``, each task's centered
        accuracy under ``downstream/centered/``), as `parcae eval` logs them."""
        was_training = engine.training
        engine.eval()
        try:
            scored = evaluate_downstream(
                forward_at(engine, self.cfg.d_model),
                self.suite,
                encode=self.text.encode,
                prefix=self.start,
                pad=self.start,
                max_len=self.cfg.max_seq_len,
                loop_counts=self.loop_counts,
                seeds=self.spec.seeds,
                device=self.device,
                batch_tokens=self.spec.batch_tokens,
                rank=self.rank,
                world_size=self.world_size,
            )
        finally:
            engine.train(was_training)
        return downstream_scalars(scored["results"])


class TextSamples:
    """``logging.sample_prompts``: greedy continuations at the mean loop count (h_0 = 0) every
    ``sample_interval`` steps. Every rank generates the same tokens through the model's own forward (under
    ZeRO-3 each call gathers the parameters collectively, so the ranks must make the same calls); rank 0
    returns the texts for the log and TensorBoard."""

    def __init__(self, spec: LoggingSpec, cfg: ParcaeConfig, text: TextTokenizer, start: int, device: torch.device):
        self.spec, self.cfg, self.device = spec, cfg, device
        self.text, self.start = text, start
        self.prompts = [[self.start, *ids][-(cfg.max_seq_len - 1) :] for ids in self.text.encode(spec.sample_prompts)]

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.spec.sample_interval == 0 or last_step

    @torch.no_grad()
    def run(self, engine: Any) -> list[tuple[str, str]]:
        """(prompt, continuation) per prompt."""
        was_training = engine.training
        engine.eval()
        loops = self.cfg.mean_recurrence if self.cfg.looped else None
        out = []
        try:
            for prompt, ids in zip(self.spec.sample_prompts, self.prompts, strict=True):
                idx = torch.tensor([ids], device=self.device)
                new = engine.module.generate(
                    idx, self.spec.sample_tokens, loops=loops, use_cache=False, vocab=self.text.vocab_size
                )[0, len(ids) :]
                tokens = new.tolist()
                if self.text.eos_id in tokens:
                    tokens = tokens[: tokens.index(self.text.eos_id)]
                out.append((prompt, completion(self.text, ids, tokens)))
        finally:
            engine.train(was_training)
        return out
