"""Validation loss at test-time loop counts, with h_0 = 0 so the numbers are reproducible.

One function, `loss_sums`, computes the summed token loss at every loop count; the training loop's
periodic evaluation (`evaluate`, every rank its share, summed over ranks) and `parcae eval` (one
process, any saved model) both use it.

`parcae eval SOURCE` takes a run directory, a checkpoint directory (sharded DeepSpeed, consolidated
here in fp32), our exported safetensors, or reference-format safetensors (with ``--spec`` for the
model), and a validation shard set (local or s3://). It reports per loop count the loss (nats per
target token), perplexity and bits per byte, fits L(T) = L_inf + k exp(-z T) (pipeline/curves.py),
prints a table and writes ``eval.json``, ``eval.png`` and TensorBoard scalars plus the plot.

Bits per byte = summed loss / ln 2 / bytes, where bytes are the UTF-8 bytes the target tokens decode
to, counted per token from the tokenizer (a word-initial "▁" counts as the space it stands for, a
byte-fallback piece as its one byte, control tokens such as BOS/EOS as none).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.distributed import RankInfo
from pipeline.errors import ParcaeError
from pipeline.spec import JobSpec

log = logging.getLogger(__name__)

DEFAULT_LOOPS = (1, 2, 4, 8, 16, 32)


def val_loader(spec: JobSpec, info: RankInfo, options: Any):
    """Every rank reads the whole (small) validation set and keeps its own rows, unshuffled."""
    assert spec.data.val_url is not None
    return _rows_loader(
        spec.data.val_url,
        info.rank,
        info.world_size,
        spec.training.micro_batch_size,
        spec.data.seq_len,
        options,
        spec.storage.max_retries,
    )


def _rows_loader(url: str, rank: int, world: int, batch_size: int, seq_len: int, options: Any, retries: int):
    from pipeline.loader import DataError, ShardLoader

    loader = ShardLoader(
        url,
        rank=rank,
        world_size=world,
        micro_batch_size=batch_size,
        seq_len=seq_len,
        seed=0,
        shuffle_buffer=0,
        options=options,
        shuffle=False,
        prefetch=0,
        max_retries=retries,
        split_by="samples",
    )
    if loader.batches_per_epoch(0) == 0:
        raise DataError(f"{url}: too few validation rows for one batch of {batch_size} per rank on {world} ranks")
    return loader


def loss_sums(
    forward: Callable[..., torch.Tensor],
    batches: Sequence[torch.Tensor],
    loop_counts: Sequence[int] | None,
    d_model: int,
) -> torch.Tensor:
    """(len(loop_counts), 2) float64: summed token loss and target-token count at each loop count
    (``loop_counts`` None: one row, for the non-looped baseline). h_0 is zeros."""
    rows = []
    for loops in loop_counts or [None]:
        total = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            inputs, targets = batch[:, :-1], batch[:, 1:]
            kwargs = {}
            if loops is not None:
                kwargs = {"loops": loops, "h0": torch.zeros(*inputs.shape, d_model, device=batch.device)}
            loss = forward(inputs, targets, **kwargs)
            total += torch.tensor([float(loss) * targets.numel(), targets.numel()], dtype=torch.float64)
        rows.append(total)
    return torch.stack(rows)


@torch.no_grad()
def evaluate(engine: Any, spec: JobSpec, info: RankInfo, options: Any, device: torch.device) -> dict[str, float]:
    """The training loop's periodic evaluation: every rank its share, losses summed over ranks."""
    import torch.distributed as dist

    loader = val_loader(spec, info, options)
    n_batches = min(loader.batches_per_epoch(0), spec.eval.max_batches)
    batches = [b.to(device) for _, b in zip(range(n_batches), loader, strict=False)]
    looped = spec.model.arch == "parcae"
    counts = list(spec.eval.loop_counts) if looped else None
    was_training = engine.training
    engine.eval()
    try:
        sums = loss_sums(engine, batches, counts, spec.model.d_model)
    finally:
        engine.train(was_training)
    dist.all_reduce(sums)
    means = (sums[:, 0] / sums[:, 1]).tolist()
    if not looped:
        return {"val_loss": means[0]}
    results = {f"val_loss_loops_{loops}": mean for loops, mean in zip(counts, means, strict=True)}
    if len(set(counts)) >= 3 and all(math.isfinite(m) for m in means):
        from pipeline.curves import FitError, fit_loop_curve

        try:
            fit = fit_loop_curve(counts, means)
            results.update(val_fit_l_inf=fit.l_inf, val_fit_k=fit.k, val_fit_z=fit.z)
        except FitError:
            pass
    return results


# ------------------------------------------------------------------------------------------------
# parcae eval
class TokenBytes:
    """UTF-8 bytes the target tokens of packed rows decode to.

    Each token counts the bytes of its piece ("▁" is a space, a byte-fallback piece one byte, control
    and unknown tokens none). SentencePiece puts a "▁" before every document's first word that is not
    in the text (its dummy prefix); documents end with <eos>, so a space-led token right after <eos>
    counts one byte less. Counted this way, a document's bytes are exactly its text's UTF-8 length.
    """

    def __init__(self, tokenizer_path: str, vocab: int):
        from data_prep.tokenizer import EOS_ID, TokenizerError, load_tokenizer

        try:
            sp = load_tokenizer(tokenizer_path)
        except TokenizerError as exc:
            raise ParcaeError(f"{exc}; pass --tokenizer with the model the shards were made with") from None
        n = max(vocab, sp.get_piece_size())
        self.sizes = np.zeros(n, dtype=np.int64)
        self.space_led = np.zeros(n, dtype=bool)
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            piece = sp.id_to_piece(i)
            self.sizes[i] = 1 if sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
            self.space_led[i] = piece.startswith("\u2581")
        self.dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
        self.eos = EOS_ID

    def count(self, rows: np.ndarray) -> int:
        """Bytes of ``rows[:, 1:]`` (the targets of rows of seq_len + 1 tokens)."""
        targets, previous = rows[:, 1:], rows[:, :-1]
        total = int(self.sizes[targets].sum())
        if self.dummy_prefix:
            total -= int((self.space_led[targets] & (previous == self.eos)).sum())
        return total


def _load_source(args: argparse.Namespace):
    """(model, spec or None, label, step, default output dir, default TensorBoard dir)."""
    from model import WeightsError, load_pretrained
    from model.weights import read_config
    from pipeline import checkpoint
    from pipeline.spec_io import load_spec
    from pipeline.weights_io import load_checkpoint_model

    source = Path(args.source)
    given = load_spec(args.spec, args.overrides).spec if args.spec else None
    if source.is_file():
        try:
            cfg = read_config(source)
            if cfg is None and given is None:
                raise ParcaeError(
                    f"{source}: holds no model config (reference-format weights); pass --spec with the model section"
                )
            model = load_pretrained(given.model.build() if given else cfg, source)
        except WeightsError as exc:
            raise ParcaeError(str(exc)) from None
        return model, given, source.name, 0, source.with_name(source.stem + "-eval"), None
    if checkpoint.is_remote(args.source):  # an s3:// checkpoint directory
        ckpt_dir = args.source
    elif not source.is_dir():
        raise ParcaeError(
            f"{source}: no such file or directory (a run directory, checkpoint directory or .safetensors)"
        )
    elif (source / checkpoint.LATEST).is_file() or args.tag:
        ckpt_dir = str(source)
    elif (source / "spec.yaml").is_file():
        ckpt_dir = load_spec(source / "spec.yaml").spec.checkpoint.dir or str(source / "checkpoints")
    else:
        raise ParcaeError(
            f"{source}: neither a run directory (spec.yaml) nor a checkpoint directory ({checkpoint.LATEST})"
        )
    model, spec, tag = load_checkpoint_model(ckpt_dir, args.tag)
    step = int(tag.split("-")[-1]) if tag.split("-")[-1].isdigit() else 0
    run_dir = Path(spec.run_dir or ".")
    return model, given or spec, f"{run_dir.name}/{tag}", step, run_dir / "eval" / tag, spec.logging.tensorboard_dir


def run_eval(args: argparse.Namespace) -> int:
    from data_prep.inspect import read_manifest
    from data_prep.storage import S3Options, StorageError, open_store
    from pipeline.curves import FitError, fit_loop_curve, plot_loop_curve

    if args.loops and min(args.loops) < 1:
        raise ParcaeError(f"--loops: loop counts must be >= 1, got {args.loops}")
    if args.batch_size < 1 or args.max_batches < 1:
        raise ParcaeError("--batch-size and --max-batches must be >= 1")
    model, spec, label, step, out_default, tb_default = _load_source(args)
    model.eval()
    cfg = model.cfg
    data = args.data or (spec.data.val_url if spec else None)
    if not data:
        raise ParcaeError("no validation data: pass --data (a shard directory or s3:// prefix with manifest.json)")
    storage = spec.storage if spec else None
    options = S3Options.from_env(
        args.endpoint_url or (storage.endpoint_url if storage else None),
        storage.region if storage else None,
        storage.max_retries if storage else 5,
    )
    try:
        manifest = read_manifest(open_store(data, options))
    except StorageError as exc:
        raise ParcaeError(f"--data: {exc}") from None
    seq_len = int(manifest["seq_len"])
    if seq_len > cfg.max_seq_len:
        raise ParcaeError(f"{data}: rows of {seq_len} tokens, longer than the model's max_seq_len {cfg.max_seq_len}")
    vocab_in_data = int(manifest["tokenizer"].get("vocab_size", cfg.vocab_size))
    if vocab_in_data > cfg.vocab_size:
        raise ParcaeError(f"{data}: tokenizer vocabulary {vocab_in_data} is larger than the model's {cfg.vocab_size}")
    counter = TokenBytes(args.tokenizer or manifest["tokenizer"]["path"], cfg.padded_vocab_size)
    loader = _rows_loader(data, 0, 1, args.batch_size, seq_len, options, options.max_retries)
    n_batches = min(loader.batches_per_epoch(0), args.max_batches)
    batches = [b for _, b in zip(range(n_batches), loader, strict=False)]
    n_bytes = sum(counter.count(b.numpy()) for b in batches)
    if n_bytes == 0:
        raise ParcaeError(f"{data}: the evaluated tokens decode to no bytes; is --tokenizer the shards' tokenizer?")
    counts = sorted(set(args.loops or DEFAULT_LOOPS)) if cfg.looped else None
    with torch.no_grad():
        sums = loss_sums(model, batches, counts, cfg.d_model)
    results = []
    for i, loops in enumerate(counts or [None]):
        loss = float(sums[i, 0] / sums[i, 1])
        results.append(
            {
                "loops": loops,
                "loss": loss,
                "perplexity": math.exp(loss) if loss < 700 else math.inf,
                "bits_per_byte": float(sums[i, 0]) / math.log(2) / n_bytes,
            }
        )
    fit, fit_error = None, None
    if counts:
        try:
            fit = fit_loop_curve(counts, [r["loss"] for r in results])
        except FitError as exc:
            fit_error = str(exc)
    out = Path(args.out or out_default)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "source": str(args.source),
        "label": label,
        "step": step,
        "data": data,
        "rows": int(sum(b.shape[0] for b in batches)),
        "tokens": int(sums[0, 1]),
        "bytes": n_bytes,
        "h0": "zeros",
        "results": results,
        "fit": fit.to_dict() if fit else None,
        "fit_error": fit_error,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    figure = None
    if counts:
        figure = plot_loop_curve(
            {label: (counts, [r["loss"] for r in results], fit)}, f"{label}: loss vs test-time loops", out / "eval.png"
        )
    tb_dir = None if args.tensorboard == "none" else (args.tensorboard or tb_default or str(out / "tensorboard"))
    if tb_dir:
        _write_tensorboard(tb_dir, step, report, figure)
    print(
        f"wrote {out / 'eval.json'}"
        + (f", {out / 'eval.png'}" if counts else "")
        + (f"; TensorBoard: {tb_dir}" if tb_dir else "")
    )
    return 0


def _print_table(report: dict[str, Any]) -> None:
    print(
        f"{report['label']}: {report['rows']} rows, {report['tokens']} target tokens, {report['bytes']} bytes, h0 = 0"
    )
    print(f"  {'loops':>5}  {'loss':>8}  {'ppl':>10}  {'bits/byte':>9}")
    for r in report["results"]:
        loops = "-" if r["loops"] is None else r["loops"]
        print(f"  {loops:>5}  {r['loss']:8.4f}  {r['perplexity']:10.3f}  {r['bits_per_byte']:9.4f}")
    fit = report["fit"]
    if fit:

        def pm(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3g}"

        print(
            f"  fit L(T) = L_inf + k exp(-z T): L_inf {fit['l_inf']:.4f} ± {pm(fit['l_inf_stderr'])}, "
            f"k {fit['k']:.4f} ± {pm(fit['k_stderr'])}, z {fit['z']:.4f} ± {pm(fit['z_stderr'])}, "
            f"rmse {fit['rmse']:.2e}" + (" (z at the edge of its search range)" if fit["z_at_bound"] else "")
        )
    elif report["fit_error"]:
        print(f"  no fit: {report['fit_error']}")


def _write_tensorboard(directory: str, step: int, report: dict[str, Any], figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=directory)
    try:
        for r in report["results"]:
            suffix = "" if r["loops"] is None else f"_loops_{r['loops']}"
            for key in ("loss", "perplexity", "bits_per_byte"):
                writer.add_scalar(f"eval/{key}{suffix}", r[key], step)
            if r["loops"] is not None:
                writer.add_scalar(f"eval_curve_step_{step}/loss_vs_loops", r["loss"], r["loops"])
        if report["fit"]:
            for key in ("l_inf", "k", "z"):
                writer.add_scalar(f"eval/fit_{key}", report["fit"][key], step)
        if figure is not None:
            writer.add_figure("eval/loss_vs_loops", figure, step)
    finally:
        writer.close()
