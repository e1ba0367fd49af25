"""`parcae eval SOURCE`: a saved model's validation loss, perplexity and bits per byte at test-time loop
counts, the fitted L(T) = L_inf + k exp(-z T); a table, ``eval.json``, ``eval.png`` and TensorBoard.

SOURCE is a run directory, a checkpoint directory (sharded DeepSpeed, consolidated here in fp32), our
exported safetensors, or reference-format safetensors (with a spec for the model). The validation
shards (local or s3://) stream through the training loader, unshuffled; h_0 = 0, so the numbers are
identical run to run. Bits per byte = summed loss / ln 2 / bytes, the bytes being the UTF-8 bytes the
target tokens decode to (`pipeline.evaluation.token_bytes`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.inspect import packing_of, read_manifest
from data_prep.storage import LocalStore, StorageError, check_writable, is_s3, make_dir, open_store, write_text
from data_prep.tokenizer import TokenizerError, file_sha256
from model import ParcaeLM, load_pretrained
from model.weights import read_config
from parcae_errors import ParcaeError, UsageError
from pipeline.data.loader import rows_loader
from pipeline.evaluation.curves import CurveFit, plot_loop_curve
from pipeline.evaluation.documents import IGNORE, document_batches, documents_from_rows
from pipeline.evaluation.losses import loss_sums
from pipeline.evaluation.report import fit_results, seed_results, write_tensorboard
from pipeline.evaluation.token_bytes import TokenBytes, special_ids
from pipeline.jobspec import JobSpec, load_run_spec, s3_options
from pipeline.jobspec.run_dir import run_tokenizer
from pipeline.training import checkpoint
from pipeline.training.weights import load_checkpoint_model

log = logging.getLogger(__name__)

DEFAULT_LOOPS = (1, 2, 4, 8, 16, 32)
PROTOCOLS = ("pipeline", "paper")


@dataclass
class Source:
    """A model to evaluate and where its results go by default."""

    model: ParcaeLM
    spec: JobSpec | None  # the run's (or the one given), for data and storage defaults
    label: str
    step: int
    out_dir: Path
    tensorboard_dir: str | None
    run_dir: Path | None = None  # a run's directory as given here (its saved tokenizer, its eval/ outputs)


def load_source(source: str, given: JobSpec | None, tag: str | None, endpoint_url: str | None = None) -> Source:
    """A run directory, checkpoint directory (local or s3://), released model directory (config.json) or
    safetensors file; ``given`` describes the model of reference-format weights (and overrides a run's spec
    for data and storage). ``tag`` picks a checkpoint of a run or checkpoint directory. S3 is reached as
    `s3_options` says (``endpoint_url``, else the given spec's or the run's storage, else the environment)."""
    path = Path(source)
    if path.is_file():
        cfg = read_config(path)
        if cfg is None and given is None:
            raise ParcaeError(
                f"{path}: holds no model config (reference-format weights); pass --spec with the model section"
            )
        model = load_pretrained(given.model.build() if given else cfg, path)
        return Source(model, given, path.name, 0, path.with_name(path.stem + "-eval"), None)
    if not is_s3(source) and path.is_dir() and (path / "config.json").is_file() and not (path / "spec.yaml").is_file():
        model = load_pretrained(given.model.build(), path) if given else load_pretrained(path)  # a released model
        return Source(model, given, path.name, 0, path.with_name(path.name + "-eval"), None)
    run_dir, ckpt_dir = locate_checkpoints(source)  # the run directory as given here (maybe a copy)
    run_spec = load_run_spec(run_dir) if run_dir else None
    options = s3_options(endpoint_url, given or run_spec)
    model, spec, tag = load_checkpoint_model(ckpt_dir, tag, options)
    step = int(tag.split("-")[-1]) if tag.split("-")[-1].isdigit() else 0
    if run_spec is not None:
        spec = run_spec  # the run's own files where the run is now (the checkpoint's model section is the same)
    tensorboard = spec.logging.tensorboard_dir
    run_dir = run_dir or Path(spec.run_dir or ".")
    return Source(model, given or spec, f"{run_dir.name}/{tag}", step, run_dir / "eval" / tag, tensorboard, run_dir)


def default_validation(spec: JobSpec) -> str | None:
    """The shard set `parcae eval` scores without --data: data.val_url, else (a mixture) the first source's
    val_url, said in the log (--data names another)."""
    if spec.data.val_url:
        return spec.data.val_url
    with_val = [s for s in spec.data.sources or [] if s.val_url]
    if not with_val:
        return None
    if len(with_val) > 1:
        log.info(
            "validation data: source %r's val_url (of %s); --data picks another",
            with_val[0].name,
            ", ".join(repr(s.name) for s in with_val),
        )
    return with_val[0].val_url


def locate_checkpoints(source: str) -> tuple[Path | None, str]:
    """(the run directory or None, the checkpoint directory) of ``source``: a run directory (spec.yaml; its
    checkpoint.dir as the spec names it, moved with a copied run), its checkpoint directory, or an s3://
    checkpoint directory. Every command that reads a run's checkpoints (``--tag`` included) resolves here."""
    path = Path(source)
    if is_s3(source):
        return None, source
    if not path.is_dir():
        raise ParcaeError(
            f"{path}: no such file or directory (a run directory, checkpoint directory, released model directory "
            "or .safetensors)"
        )
    if (path / "spec.yaml").is_file() and not (path / checkpoint.LATEST).is_file():
        return path, run_checkpoint_dir(path)
    if (path / checkpoint.LATEST).is_file() or any(path.glob("step-*/spec.yaml")):
        run_dir = path.parent if path.name == "checkpoints" and (path.parent / "spec.yaml").is_file() else None
        return run_dir, str(path)
    raise ParcaeError(
        f"{path}: neither a run directory (spec.yaml), a checkpoint directory ({checkpoint.LATEST}) nor a "
        "released model directory (config.json)"
    )


def run_checkpoint_dir(run_dir: Path) -> str:
    """A run directory's checkpoint directory, as its spec.yaml names it (moved with a copied run)."""
    return load_run_spec(run_dir).checkpoint.dir or str(run_dir / "checkpoints")


def run_eval(
    source: Source,
    *,
    data: str | None,
    loops: list[int] | None,
    batch_size: int,
    max_batches: int,
    tokenizer: str | None,
    out: str | None,
    tensorboard: str | None,
    endpoint_url: str | None,
    source_name: str,
    protocol: str = "pipeline",
    documents: int = 1000,
    h0_seeds: int = 3,
) -> Written:
    """Evaluate and write the outputs (eval.json, the plot, TensorBoard); returns the report and where it went.

    ``protocol`` "pipeline": rows of the packed token stream (at most ``max_batches``), h_0 = 0 (the
    numbers are identical run to run). "paper": the reference's evaluation, ``documents`` held-out
    documents one per row (truncated to the context, bytes without special tokens), h_0 the like-init
    truncated normal averaged over ``h0_seeds`` seeds, each result with its spread over the seeds."""
    check_eval_settings(protocol, documents, h0_seeds, loops, batch_size, max_batches)
    out_dir = Path(out or source.out_dir)
    check_outputs(out_dir, tensorboard, source)  # before the evaluation, not after
    model, spec = source.model, source.spec
    model.eval()
    cfg = model.cfg
    data, options, manifest = validation_data(data, spec, endpoint_url, cfg)
    bos, eos = special_ids(manifest)
    try:
        counter = TokenBytes(tokenizer or shards_tokenizer(manifest, source), cfg.padded_vocab_size, eos)
    except TokenizerError as exc:
        exc.add_note("pass --tokenizer with the model the shards were made with")
        raise
    loader = rows_loader(
        data, options, rank=0, world_size=1, batch_size=batch_size, seq_len=int(manifest["seq_len"]),
        vocab_size=cfg.vocab_size,
    )  # fmt: skip
    counts = sorted(set(loops or DEFAULT_LOOPS)) if cfg.looped else None
    if protocol == "paper":
        rows_in_order = (
            row for _, b in zip(range(loader.batches_per_epoch(0)), loader, strict=False) for row in b.numpy()
        )
        docs = documents_from_rows(rows_in_order, eos, documents, packing_of(manifest) == "bos-aligned")
        batches = document_batches(docs, batch_size, cfg.max_seq_len, bos)
        n_bytes = sum(counter.document_bytes(t[t != IGNORE].numpy()) for _, targets in batches for t in targets)
        seeds = range(h0_seeds) if cfg.looped else range(1)
        described = {
            "name": "paper",
            "h0": f"like-init, {len(seeds)} seed(s)",
            "rows": f"one document per row ({len(docs)} documents, truncated to {cfg.max_seq_len} tokens)",
            "bytes": "the documents' text, special tokens excluded",
        }
    else:
        n_batches = min(loader.batches_per_epoch(0), max_batches)
        batches = [b for _, b in zip(range(n_batches), loader, strict=False)]
        n_bytes = sum(counter.count(b.numpy()) for b in batches)
        seeds = [None]
        described = {"name": "pipeline", "h0": "zeros", "rows": "the packed token stream", "bytes": "target tokens"}
    if n_bytes == 0:
        raise ParcaeError(f"{data}: the evaluated tokens decode to no bytes; is --tokenizer the shards' tokenizer?")
    with torch.no_grad():
        per_seed = [loss_sums(model, batches, counts, cfg.d_model, h0_seed=seed) for seed in seeds]
    results = seed_results(counts, per_seed, n_bytes)
    fit, fit_error = fit_results(results)
    report = {
        "source": source_name,
        "label": source.label,
        "step": source.step,
        "data": data,
        "rows": int(sum((b[0] if isinstance(b, tuple) else b).shape[0] for b in batches)),
        "tokens": int(per_seed[0][0, 1]),
        "bytes": n_bytes,
        "h0": described["h0"],
        "protocol": described,
        "results": results,
        "fit": fit,
        "fit_error": fit_error,
    }
    return write_eval(report, counts, source, out_dir, tensorboard)


def check_eval_settings(
    protocol: str, documents: int, h0_seeds: int, loops: list[int] | None, batch_size: int, max_batches: int
) -> None:
    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")
    if documents < 1 or h0_seeds < 1:
        raise UsageError("--documents and --h0-seeds must be >= 1")
    if loops and min(loops) < 1:
        raise UsageError(f"--loops: loop counts must be >= 1, got {loops}")
    if batch_size < 1 or max_batches < 1:
        raise UsageError("--batch-size and --max-batches must be >= 1")


def validation_data(
    data: str | None, spec: JobSpec | None, endpoint_url: str | None, cfg: Any
) -> tuple[str, Any, dict[str, Any]]:
    """(shard set, storage options, manifest) of the validation data: ``data``, else the spec's; its rows must
    fit the model's context and its tokenizer the model's vocabulary."""
    data = data or (default_validation(spec) if spec else None)
    if not data:
        raise ParcaeError(
            "no validation data: the spec has no data.val_url and no source a val_url; pass --data (a shard "
            "directory or s3:// prefix with manifest.json)"
        )
    options = s3_options(endpoint_url, spec)
    manifest = read_manifest(open_store(data, options))
    seq_len = int(manifest["seq_len"])
    if seq_len > cfg.max_seq_len:
        raise ParcaeError(f"{data}: rows of {seq_len} tokens, longer than the model's max_seq_len {cfg.max_seq_len}")
    vocab_in_data = int(manifest["tokenizer"].get("vocab_size", cfg.vocab_size))
    if vocab_in_data > cfg.vocab_size:
        raise ParcaeError(f"{data}: tokenizer vocabulary {vocab_in_data} is larger than the model's {cfg.vocab_size}")
    return data, options, manifest


def write_eval(
    report: dict[str, Any], counts: list[int] | None, source: Source, out_dir: Path, tensorboard: str | None
) -> Written:
    """eval.json, the loss curve (looped models) and TensorBoard; what was written where."""
    make_dir(out_dir)
    write_text(out_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    figure = None
    if counts:
        fit = report["fit"]
        curve = (counts, [r["loss"] for r in report["results"]], CurveFit(**fit) if fit else None)
        figure = plot_loop_curve(
            {source.label: curve}, f"{source.label}: loss vs test-time loops", out_dir / "eval.png"
        )
    tb_dir = tensorboard_dir(tensorboard, source, out_dir)
    if tb_dir:
        write_tensorboard(tb_dir, source.step, report, figure)
    return Written(report, out_dir / "eval.json", out_dir / "eval.png" if counts else None, tb_dir)


def shards_tokenizer(manifest: dict, source: Source) -> str:
    """The tokenizer a shard set was made with: the copy the run keeps when it is the same file (sha256), as
    it is wherever the run directory is; else the path the manifest records."""
    recorded = manifest["tokenizer"]
    kept = run_tokenizer(source.run_dir)
    if kept is not None and recorded.get("sha256") == file_sha256(kept):
        return str(kept)
    return str(recorded["path"])


def check_outputs(out_dir: Path, tensorboard: str | None, source: Source) -> None:
    """Before an evaluation: its report directory and its TensorBoard directory (the run's, unless
    --tensorboard says otherwise) can be written, or it stops naming which (a read-only run with --out
    elsewhere still logs into the run)."""
    check_writable(LocalStore(str(out_dir)))
    tb = tensorboard_dir(tensorboard, source, out_dir)
    if tb and not is_s3(tb):
        try:
            check_writable(LocalStore(tb))
        except StorageError as exc:
            raise StorageError(f"TensorBoard: {exc}; pass --tensorboard DIR, or --tensorboard none") from None


def tensorboard_dir(given: str | None, source: Source, out_dir: Path) -> str | None:
    """Where an evaluation's events go: ``--tensorboard`` (``none``: nowhere), the run's, or beside the output."""
    return None if given == "none" else (given or source.tensorboard_dir or str(out_dir / "tensorboard"))


@dataclass
class Written:
    """What an evaluation produced: its report (the data) and where it wrote it."""

    report: dict[str, Any]
    path: Path  # the JSON report
    figure: Path | None
    tensorboard: str | None

    def summary(self) -> str:
        figure = f", {self.figure}" if self.figure else ""
        return f"wrote {self.path}{figure}" + (f"; TensorBoard: {self.tensorboard}" if self.tensorboard else "")
