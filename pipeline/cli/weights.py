"""`parcae import` (reference-format weights in) and `parcae export` (a run's checkpoint out)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.args import add_endpoint, add_force, add_overrides, refuse_existing


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "import",
        help="check released Parcae weights (a reference model directory, or reference-named safetensors) and "
        "write them with their model config, ready to load, and the job spec's model section",
    )
    p.add_argument(
        "weights",
        help="a released model directory (config.json + model.pt or pytorch_model.bin; local or s3://), or a "
        "safetensors / torch file in the reference naming",
    )
    p.add_argument(
        "--spec", help="job spec whose model section describes the weights (needed without a config; else checked)"
    )
    add_overrides(p)
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--loops", type=int, default=4, help="loop count of the smoke forward (default 4)")
    add_endpoint(p)
    add_force(p, "an existing file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export",
        help="a run's sharded DeepSpeed checkpoint as one fp32 safetensors file in the reference naming, or "
        "(--format hf) any model `parcae eval` reads as a Hugging Face remote-code model directory",
    )
    p.add_argument(
        "source",
        help="safetensors: a run directory or its checkpoint.dir (e.g. runs/NAME/checkpoints); hf: also a "
        "safetensors file or released model directory",
    )
    p.add_argument("--out", required=True, help="output .safetensors path (hf: a directory)")
    p.add_argument("--format", choices=("safetensors", "hf"), default="safetensors", help="default safetensors")
    p.add_argument("--tag", help="which checkpoint (default: the newest complete one, named by LATEST)")
    p.add_argument("--tokenizer", help="hf: the tokenizer to ship (default: the run's tokenizer.path)")
    p.add_argument("--loops", type=int, help="hf: the forward's default loop count (default: the mean recurrence)")
    p.add_argument("--h0", default="zeros", help="hf: initial state, zeros (default) or like_init")
    add_endpoint(p)
    add_force(p, "an existing file (hf: write into a directory that is not empty)")
    p.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    from model import WeightsError
    from pipeline.jobspec import load_spec, s3_options
    from pipeline.training.weights import import_weights

    refuse_existing(args.out, args.force)
    spec = load_spec(args.spec, args.overrides).spec if args.spec else None
    cfg = spec.model.build() if spec else None
    try:
        print(import_weights(args.weights, cfg, args.out, args.loops, s3_options(args.endpoint_url, spec)))
    except WeightsError as exc:
        if args.spec:
            exc.add_note(f"(the model comes from {args.spec}: model section)")
        raise
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    refuse_existing(args.out, args.force)
    if args.format == "safetensors":
        from pipeline.jobs.evaluate import locate_checkpoints
        from pipeline.jobspec import load_run_spec, s3_options
        from pipeline.training.weights import export_checkpoint

        run_dir, source = locate_checkpoints(args.source)
        spec = load_run_spec(run_dir) if run_dir else None
        print(export_checkpoint(source, args.out, args.tag, s3_options(args.endpoint_url, spec)))
        return 0
    from pathlib import Path

    from parcae_errors import ParcaeError
    from pipeline.jobs.evaluate import load_source

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ParcaeError(
            "--format hf needs transformers: install the project's [hf] extra (make setup does)"
        ) from None
    from pipeline.jobs.hf_export import check_loads, export_hf

    source = load_source(args.source, None, args.tag, args.endpoint_url)
    tokenizer = args.tokenizer or (source.spec.tokenizer.path if source.spec else None)
    if not tokenizer and (Path(args.source) / "tokenizer.json").is_file():  # a released directory ships its own
        tokenizer = str(Path(args.source) / "tokenizer.json")
    if tokenizer and not args.tokenizer and not Path(tokenizer).is_file():
        tokenizer = None  # the run's tokenizer is not here: export without one, and say so
    out = export_hf(source.model, Path(args.out), tokenizer, args.loops, args.h0)
    loops = args.loops or source.model.cfg.mean_recurrence
    difference = check_loads(out, source.model, loops)
    if difference > 1e-4:
        raise ParcaeError(f"{out}: transformers' logits differ from the model's by {difference:.2e} (relative)")
    print(
        f"exported {args.source} -> {out}: transformers loads it (trust_remote_code) and its logits at {loops} "
        f"loops equal ours to {difference:.1e}; " + (f"tokenizer {tokenizer}" if tokenizer else "no tokenizer")
    )
    return 0
