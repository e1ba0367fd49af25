"""`parcae eval SOURCE --tasks core|core-extended`: CORE and Core-Extended at test-time loop counts.

The model is any source `parcae eval` reads; the tokenizer is ``--tokenizer``, else the copy a run
keeps (``RUN/tokenizer/``), else the spec's ``tokenizer.path``, else a released directory's
``tokenizer.json``, else the one the run's shards were made with (their manifest). Items are split
over the ranks (``--procs N`` starts N on this machine; under Slurm or torchrun the launched ranks take
part) and gathered; rank 0 prints the table (tasks x loop counts) and writes ``downstream.json``,
``downstream.png`` (CORE against loops, with the fitted S(T) = S_inf + k exp(-z T) when there are
three loop counts or more) and TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from data_prep.inspect import read_manifest
from data_prep.storage import (
    S3Options,
    make_dir,
    open_store,
    write_text,
)
from data_prep.tokenizer import TextTokenizer, TokenizerError
from parcae_errors import ParcaeError, ReportedElsewhere, UsageError
from pipeline.evaluation.bundle import Bundle
from pipeline.evaluation.curves import CurveFit, plot_loop_curve
from pipeline.evaluation.downstream import DEFAULT_BATCH_TOKENS, DEFAULT_SEED, Suite, evaluate_downstream, forward_at
from pipeline.evaluation.losses import try_fit
from pipeline.evaluation.report import write_downstream_tensorboard
from pipeline.evaluation.text import PromptStart, document_start, open_tokenizer
from pipeline.jobs.evaluate import Source, Written, check_outputs, tensorboard_dir
from pipeline.jobspec import s3_options
from pipeline.jobspec.run_dir import run_tokenizer
from pipeline.training.distributed import (
    accelerator_device,
    close_distributed,
    dump_stacks_on_request,
    export_rank_env,
    init_distributed,
    launch_local,
    rank_info,
)

log = logging.getLogger(__name__)

DEFAULT_LOOPS = (1, 2, 4, 8, 16)
LABELS = {"core": "CORE", "core_extended": "Core-Extended"}


def source_tokenizer(given: str | None, source: Source, source_arg: str, options: S3Options) -> str:
    """Where the tokenizer of ``source`` is (see the module doc), or a clear error."""
    spec = source.spec
    if given:
        return given
    kept = run_tokenizer(source.run_dir)
    if kept is not None:  # the copy the run trained with: found wherever the run directory is now
        return str(kept)
    if spec and spec.tokenizer.path:
        return spec.tokenizer.path
    if (Path(source_arg) / "tokenizer.json").is_file():
        return str(Path(source_arg) / "tokenizer.json")
    manifest = source_manifest(source, options)
    if manifest is not None and "path" in manifest.get("tokenizer", {}):
        return str(manifest["tokenizer"]["path"])
    raise ParcaeError(
        f"{source_arg}: no tokenizer found for it; pass --tokenizer (a SentencePiece .model or tokenizer.json)"
    )


def source_manifest(source: Source, options: S3Options) -> dict[str, Any] | None:
    """The manifest of the shard set that stands for a run's data (its validation set, else its first
    training source), or None: weights without a run, or shards that cannot be read from here."""
    spec = source.spec
    for url in (spec.data.val_url, spec.data.first_url()) if spec else ():
        if url:
            try:
                return read_manifest(open_store(url, options))
            except (ParcaeError, OSError):
                continue
    return None


def prompt_start_of(source: Source, options: S3Options, text: TextTokenizer, rank: int = 0) -> PromptStart:
    """How prompts start for ``source`` (`document_start`), said once by rank 0 where the run's shards hold
    no <bos>."""
    start = document_start(text, source_manifest(source, options))
    if rank == 0 and "no <bos>" in start.why:
        log.warning("prompts start with token %d, not <bos>: %s", start.id, start.why)
    return start


def run_downstream(
    source: Source,
    *,
    source_arg: str,
    bundle: str,
    suites: Sequence[str],
    loops: list[int] | None,
    max_per_task: int | None,
    seeds: list[int] | None,
    tokenizer: str | None,
    out: str | None,
    tensorboard: str | None,
    endpoint_url: str | None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> Written | None:
    """Score the suites; rank 0 writes the outputs and returns the report and where it went, the other
    ranks return None."""
    seeds = check_downstream_settings(loops, max_per_task, batch_tokens, seeds)
    out_dir = Path(out or source.out_dir)
    if rank == 0:
        check_outputs(out_dir, tensorboard, source)  # before the evaluation, not after
    options = s3_options(endpoint_url, source.spec)
    model = source.model.to(device or torch.device("cpu"))
    model.eval()
    cfg = model.cfg
    location, text = model_tokenizer(tokenizer, source, source_arg, options, cfg.vocab_size)
    suite = Suite.load(Bundle(bundle, options), suites, max_per_task)
    counts = sorted(set(loops or DEFAULT_LOOPS)) if cfg.looped else None
    start = prompt_start_of(source, options, text, rank)
    with torch.no_grad():
        scored = evaluate_downstream(
            forward_at(model, cfg.d_model),
            suite,
            encode=text.encode,
            prefix=start.id,
            pad=start.id,
            max_len=cfg.max_seq_len,
            loop_counts=counts,
            seeds=seeds,
            device=device,
            batch_tokens=batch_tokens,
            rank=rank,
            world_size=world_size,
        )
    if rank != 0:
        return None
    results = scored["results"]
    fits = {name: curve_fit(results, name) for name in suite.aggregates}
    report = {
        "source": source_arg,
        "label": source.label,
        "step": source.step,
        "bundle": bundle,
        "suites": list(suites),
        "tokenizer": location,
        "prompt_start": start.to_dict(),
        "seeds": seeds,
        "max_per_task": max_per_task,
        "h0": "zeros",
        "ranks": world_size,
        "rows": scored["rows"],
        "cropped_items": scored["cropped_items"],
        "tasks": [t.to_dict() for t in suite.tasks],
        "aggregates": suite.aggregates,
        "results": results,
        "fit": {name: (fit.to_dict() if fit else None) for name, (fit, _) in fits.items()},
        "fit_error": {name: error for name, (_, error) in fits.items()},
    }
    return write_downstream(report, counts, fits, source, out_dir, tensorboard)


def check_downstream_settings(
    loops: list[int] | None, max_per_task: int | None, batch_tokens: int, seeds: list[int] | None
) -> list[int]:
    """Refuse, naming the flag, what cannot be scored; the few-shot seeds (the default one when none)."""
    if loops and min(loops) < 1:
        raise UsageError(f"--loops: loop counts must be >= 1, got {loops}")
    if max_per_task is not None and max_per_task < 1:
        raise UsageError(f"--max-per-task: at least 1 item per task, got {max_per_task}")
    if batch_tokens < 1:
        raise UsageError(f"--batch-tokens: at least 1, got {batch_tokens}")
    seeds = seeds or [DEFAULT_SEED]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: each few-shot seed once, got {seeds}")
    return seeds


def model_tokenizer(
    given: str | None, source: Source, source_arg: str, options: S3Options, vocab_size: int
) -> tuple[str, TextTokenizer]:
    """(location, tokenizer) of the model's tokenizer, which must fit the model's vocabulary."""
    with tempfile.TemporaryDirectory() as tmp:
        location = source_tokenizer(given, source, source_arg, options)
        try:
            text = open_tokenizer(location, options, Path(tmp))
        except TokenizerError as exc:
            exc.add_note("pass --tokenizer with the model's tokenizer")
            raise
    if text.vocab_size > vocab_size:
        raise ParcaeError(f"tokenizer {location}: vocabulary {text.vocab_size} is larger than the model's {vocab_size}")
    return location, text


def write_downstream(
    report: dict[str, Any],
    counts: list[int] | None,
    fits: dict[str, Any],
    source: Source,
    out_dir: Path,
    tensorboard: str | None,
) -> Written:
    """downstream.json, the curves (looped models) and TensorBoard; what was written where."""
    make_dir(out_dir)
    write_text(out_dir / "downstream.json", json.dumps(report, indent=2) + "\n")
    figure = None
    if counts:
        curves = {
            f"{source.label} {LABELS[name]}": (counts, [r[name] for r in report["results"]], fits[name][0])
            for name in report["aggregates"]
        }
        figure = plot_loop_curve(
            curves,
            f"{source.label}: downstream vs test-time loops",
            out_dir / "downstream.png",
            ylabel="centered accuracy",
        )
    tb_dir = tensorboard_dir(tensorboard, source, out_dir)
    if tb_dir:
        write_downstream_tensorboard(tb_dir, source.step, report, figure)
    return Written(report, out_dir / "downstream.json", out_dir / "downstream.png" if counts else None, tb_dir)


def curve_fit(results: list[dict[str, Any]], name: str) -> tuple[CurveFit | None, str | None]:
    if results[0]["loops"] is None:
        return None, None
    return try_fit([r["loops"] for r in results], [r[name] for r in results])


def downstream_table(report: dict[str, Any]) -> list[str]:
    """A downstream report as text: what was scored, per task accuracy / centered accuracy at every loop count,
    the aggregates and their fits."""
    lines: list[str] = []
    results = report["results"]
    seeds = report["seeds"]
    lines.append(
        f"{report['label']}: {', '.join(LABELS[a] for a in report['aggregates'])} from {report['bundle']}; "
        f"{len(report['tasks'])} tasks, {report['rows']} scored rows, few-shot seed(s) {', '.join(map(str, seeds))}"
        + (f", at most {report['max_per_task']} items per task" if report["max_per_task"] else "")
        + (f"; {report['cropped_items']} prompt(s) cut to the context" if report["cropped_items"] else "")
    )
    heads = ["-" if r["loops"] is None else f"T={r['loops']}" for r in results]
    lines.append(f"  {'task':<34} {'type':<6} {'shots':>5}  " + "  ".join(f"{h:>13}" for h in heads))
    kinds = {"multiple_choice": "mc", "schema": "schema", "language_modeling": "lm"}
    for task in report["tasks"]:
        cells = [
            f"{100 * r['tasks'][task['label']]['accuracy']:5.1f} /{100 * r['tasks'][task['label']]['centered']:6.1f}"
            for r in results
        ]
        lines.append(
            f"  {task['label'][:34]:<34} {kinds[task['type']]:<6} {task['num_fewshot']:>5}  "
            + "  ".join(f"{c:>13}" for c in cells)
        )
    lines.append("  (accuracy / centered accuracy, in %)")
    for name in report["aggregates"]:
        cells = []
        for r in results:
            cell = f"{100 * r[name]:.2f}"
            if f"{name}_std" in r:
                cell += f"±{100 * r[f'{name}_std']:.2f}"
            cells.append(cell)
        lines.append(f"  {LABELS[name]:<47} " + "  ".join(f"{c:>13}" for c in cells))
        fit = report["fit"].get(name)
        if fit:
            lines.append(
                f"  {LABELS[name]} fit S(T) = S_inf + k exp(-z T): S_inf {100 * fit['l_inf']:.2f}, "
                f"k {100 * fit['k']:.2f}, z {fit['z']:.3g}"
            )
        elif report["fit_error"].get(name):
            lines.append(f"  {LABELS[name]}: no fit: {report['fit_error'][name]}")
    return lines


@contextlib.contextmanager
def eval_ranks() -> Iterator[tuple[int, int, torch.device]]:
    """(rank, world size, device) of this process: one process, or a rank started by `--procs`, Slurm or
    torchrun (the process group is formed here and torn down after). An error on a rank other than 0 is
    reported by rank 0 (every rank reads the same inputs), so it is said once."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    info = rank_info()
    if info is None or info.world_size == 1:
        yield 0, 1, accelerator_device(0)[0]
        return
    export_rank_env(info)
    dump_stacks_on_request()  # the launcher asks a rank that will not leave where it waits
    device, device_type = accelerator_device(info.local_rank)
    init_distributed(device_type)
    try:
        yield info.rank, info.world_size, device
    except ParcaeError as exc:
        if info.rank == 0:
            raise
        raise ReportedElsewhere(exc.exit_code) from None
    finally:
        close_distributed()


def launch_ranks(argv: list[str], procs: int) -> int | None:
    """With ``procs`` > 1 and no ranks launched yet: start them on this machine and return the exit code."""
    if procs < 1:
        raise UsageError(f"--procs: at least 1, got {procs}")
    if procs == 1 or rank_info() is not None:
        return None
    return launch_local(argv, procs)
