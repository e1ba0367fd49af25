"""`parcae import` (reference-format weights in) and `parcae export` (a run's checkpoint out)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.cli.args import add_overrides


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
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export",
        help="consolidate a run's sharded DeepSpeed checkpoint into one fp32 safetensors file in the reference naming",
    )
    p.add_argument("checkpoint_dir", help="the run's checkpoint.dir (e.g. runs/NAME/checkpoints)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--tag", help="which checkpoint (default: the newest complete one, named by LATEST)")
    p.set_defaults(func=cmd_export)


def cmd_import(args: argparse.Namespace) -> int:
    from model import WeightsError
    from pipeline.jobspec import load_spec
    from pipeline.training.weights import import_weights

    cfg = load_spec(args.spec, args.overrides).spec.model.build() if args.spec else None
    try:
        print(import_weights(args.weights, cfg, args.out, args.loops))
    except WeightsError as exc:
        if args.spec:
            exc.add_note(f"(the model comes from {args.spec}: model section)")
        raise
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.training.weights import export_checkpoint

    print(export_checkpoint(args.checkpoint_dir, args.out, args.tag))
    return 0
