"""`parcae plan SPEC --flops C | --gpu-hours H`: compute-optimal mean recurrence and tokens, steps and
wall clock; or an isoFLOP design for `parcae sweep run --points`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from parcae_errors import ParcaeError, UsageError
from pipeline.cli.args import add_spec_args


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="compute-optimal mean recurrence and tokens for a FLOP or GPU-hour budget (power laws C^0.40, C^0.78)",
    )
    add_spec_args(p)
    p.add_argument("--flops", type=float, help="training compute budget in FLOPs")
    p.add_argument("--gpu-hours", type=float, help="budget in device-hours (times peak FLOP/s and MFU)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s per device (default: the spec's, or 989e12)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--loops-exponent", type=float, default=0.40, help="recurrence ~ C^a (default 0.40, the paper's)")
    p.add_argument("--tokens-exponent", type=float, default=0.78, help="tokens ~ C^b (default 0.78, the paper's)")
    p.add_argument("--anchor-flops", type=float, help="reference compute (default: the spec's own)")
    p.add_argument("--anchor-recurrence", type=float, help="optimal mean recurrence at the reference compute")
    p.add_argument("--anchor-tokens", type=float, help="optimal tokens at the reference compute")
    p.add_argument("--from-sweep", help="refit both exponents from a sweep directory's summary.json")
    p.add_argument(
        "--backprop-depth",
        type=int,
        help="loops with gradients at the planned recurrence R (default (R + 1) // 2, the reference's sweeps)",
    )
    p.add_argument(
        "--isoflop",
        metavar="R1,R2,...",
        help="print `parcae sweep run --points` YAML: one point per mean recurrence, each spending --flops",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.jobs.plan import DEFAULT_PEAK, check_positive, isoflop_points, plan, refit
    from pipeline.jobspec import load_spec

    spec = load_spec(args.spec, args.overrides).spec
    if args.isoflop:
        if args.flops is None:
            raise UsageError("--isoflop needs the budget as --flops C")
        try:
            recurrences = [int(x) for x in args.isoflop.split(",")]
        except ValueError:
            raise UsageError(f"--isoflop: comma-separated integers, got {args.isoflop!r}") from None
        import yaml

        print(
            yaml.safe_dump(isoflop_points(spec, args.flops, recurrences, args.backprop_depth), sort_keys=False), end=""
        )
        return 0
    loops_exponent, tokens_exponent = args.loops_exponent, args.tokens_exponent
    refitted = None
    if args.from_sweep:
        refitted = refit(args.from_sweep)
        loops_exponent = refitted["fits"]["mean_recurrence"]["exponent"]
        tokens_exponent = refitted["fits"]["tokens"]["exponent"]
    peak = args.peak_flops or spec.logging.peak_flops_per_device or DEFAULT_PEAK
    if (args.flops is None) == (args.gpu_hours is None):
        raise ParcaeError("give the budget as exactly one of --flops C or --gpu-hours H")
    if args.gpu_hours is not None:
        check_positive("--gpu-hours", args.gpu_hours)
        flops = args.gpu_hours * 3600 * peak * args.mfu
    else:
        flops = args.flops
    anchor_args = (args.anchor_flops, args.anchor_recurrence, args.anchor_tokens)
    if any(a is not None for a in anchor_args) and not all(a is not None for a in anchor_args):
        raise UsageError("--anchor-flops, --anchor-recurrence and --anchor-tokens go together (all three or none)")
    anchor = anchor_args if all(a is not None for a in anchor_args) else None
    result = plan(spec, flops, anchor, loops_exponent, tokens_exponent, peak, args.mfu, args.backprop_depth)
    if refitted:
        result["refit"] = refitted
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    a = result["anchor"]
    if refitted:
        print(f"exponents refitted from {refitted['summary']} ({len(refitted['optima'])} compute budgets)")
    print(f"compute budget        {flops:.4g} FLOPs")
    print(
        f"anchor                {a['flops']:.4g} FLOPs, mean recurrence {a['mean_recurrence']:g}, "
        f"{a['tokens']:.4g} tokens ({a['from']})"
    )
    print(f"power laws            recurrence ~ C^{loops_exponent:.3g}, tokens ~ C^{tokens_exponent:.3g}")
    print(
        f"mean recurrence       {result['mean_recurrence']:.3f} -> {result['mean_recurrence_rounded']} "
        f"(backprop depth {result['mean_backprop_depth']})"
    )
    print(f"tokens                {result['tokens']:.4g} -> {result['steps']} steps of {result['tokens_per_step']}")
    print(
        f"FLOPs of this plan    {result['plan_flops']:.4g} ({result['plan_flops_over_budget']:.2f}x the budget; "
        f"{result['flops_per_token']:.4g} per token, the paper's convention)"
    )
    print(
        f"wall clock            {result['wall_clock_hours']:.3g} h on {result['devices']} device(s) at "
        f"{peak:.3g} FLOP/s peak and MFU {args.mfu:g}"
    )
    print("set                   " + " ".join(f"--set {o}" for o in result["overrides"]))
    return 0
