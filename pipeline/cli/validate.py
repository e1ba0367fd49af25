"""`parcae validate SPEC` (every problem, or a short resolved summary) and `parcae schema`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from model.config import count_params, hardware_flops_per_token, paper_flops_per_token
from pipeline.cli.args import add_spec_args
from pipeline.jobspec import JobSpec, load_spec
from pipeline.training.ds_config import build_ds_config, load_base_config


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("validate", help="check a job spec; print every problem, or a resolved summary")
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--show-spec", action="store_true", help="also print the resolved spec (secrets hidden)")
    p.add_argument(
        "--memory",
        action="store_true",
        help="estimate the peak device memory per rank (ZeRO partitions, gathered units, activations, logits, "
        "buffers) and check it against --device-memory; exit 1 when it does not fit",
    )
    p.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory of one device, e.g. 80GB or 80GiB (default: this machine's device of the spec's kind, if any)",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of job specs (for editor completion)")
    p.set_defaults(func=cmd_schema)


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.training.preflight import PreflightError, data_problems

    loaded = load_spec(args.spec, args.overrides)
    summary = spec_summary(loaded.spec)
    problems, unreadable = data_problems(loaded.spec)
    if problems:
        raise PreflightError(problems)
    summary["data"] = "shards fit the model" + (
        f"; not checked (unreadable here): {'; '.join(unreadable)}" if unreadable else ""
    )
    sources = source_lines(loaded.spec)
    if sources:
        summary["sources"] = sources
    resume = resume_line(loaded.spec)
    if resume:
        summary["resume"] = resume
    if args.json:
        print(loaded.redact(json.dumps(summary, indent=2)))
    else:
        print(f"{args.spec}: valid")
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            lines = value if isinstance(value, list) else [value]
            for i, line in enumerate(lines):
                print(loaded.redact(f"  {key if i == 0 else '':<{width}}  {line}"))
    if args.show_spec:
        print(loaded.to_yaml(), end="")
    if args.memory or args.device_memory:
        return memory_plan(loaded.spec, args.device_memory, args.json)
    return 0


def resume_line(spec: JobSpec) -> str | None:
    """What `parcae train` would resume, and what that changes (a refused change raises, exit 2); None when
    the checkpoint directory holds no checkpoint or cannot be read from here."""
    from data_prep.storage import StorageError
    from pipeline.training.checkpoint import CheckpointError, latest_tag
    from pipeline.training.resize import check_resume

    assert spec.checkpoint.dir is not None
    try:
        tag = latest_tag(spec.checkpoint.dir, spec.storage.s3_options())
    except (CheckpointError, StorageError, OSError):
        return None  # `train` says what is wrong with the checkpoints, with the way out
    if tag is None:
        return None
    return f"{tag}: " + (check_resume(spec, tag) or "same world size and batch split")


def source_lines(spec: JobSpec) -> list[str]:
    """One line per training source (weight, share, limit, rows, packing), when every manifest is readable."""
    from data_prep.inspect import read_manifest
    from data_prep.storage import open_store
    from parcae_errors import ParcaeError
    from pipeline.data.manifests import describe_sources

    sources = spec.data.train_sources()
    try:
        manifests = [read_manifest(open_store(s.url, spec.storage.s3_options())) for s in sources]
    except ParcaeError:
        return []
    return describe_sources(sources, manifests)


def memory_plan(spec: JobSpec, device_memory: str | None, as_json: bool) -> int:
    from parcae_errors import ParcaeError
    from pipeline.training.memory import device_memory_here, parse_size, plan_device_type, plan_memory, report

    plan = plan_memory(spec)
    source = ""
    if device_memory:
        device_bytes: int | None = parse_size(device_memory, "--device-memory")
    else:
        here = device_memory_here(plan_device_type(spec), spec.cluster.procs_per_node)
        device_bytes, source = here if here else (None, "")
    lines, fits = report(plan, device_bytes, spec, source)
    if as_json:
        print(json.dumps({**plan.as_dict(), "device_bytes": device_bytes, "fits": fits}, indent=2))
    else:
        print("\n".join(lines))
    if not fits:
        raise ParcaeError(
            f"{spec.name}: the memory plan ({plan.peak_bytes / 2**30:.3g} GiB per rank) does not fit the device "
            f"({device_bytes / 2**30:.3g} GiB); see the plan above for what to turn"
        )
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}{unit}"
    return f"{n:.4g}{unit}"


def spec_summary(spec: JobSpec) -> dict[str, Any]:
    """Derived numbers, after checking that the DeepSpeed config can be built for this spec."""
    base = load_base_config(spec.zero.base_config)
    build_ds_config(spec.training, spec.optimizer, spec.zero, base, spec.world_size)
    cfg = spec.model.build()
    params = count_params(cfg)
    fpt = paper_flops_per_token(cfg, spec.data.seq_len)
    hardware = hardware_flops_per_token(cfg, spec.data.seq_len)
    steps = spec.total_steps
    t = spec.training
    model = f"{cfg.arch}, injection {cfg.injection}" if cfg.looped else "gpt (fixed depth)"
    layers = f"{cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda}" if cfg.looped else f"{cfg.n_layers}"
    summary: dict[str, Any] = {
        "name": spec.name,
        "run_dir": spec.run_dir,
        "model": f"{model}, layers {layers}, d_model {cfg.d_model}, heads {cfg.n_head}",
        "parameters": f"{_human(params['total'])} ({_human(params['value_embeddings'])} value embeddings, "
        f"{_human(params['core'])} in the looped core)",
        "loops": f"mean recurrence {cfg.mean_recurrence}, backprop depth {cfg.mean_backprop_depth}"
        if cfg.looped
        else "none",
        "world_size": f"{spec.world_size} ({spec.cluster.nodes} node(s) x {spec.cluster.procs_per_node})",
        "batch": f"global {t.global_batch_size} = micro {t.micro_batch_size} x accumulation "
        f"{t.gradient_accumulation_steps} x world {spec.world_size} sequences of {spec.data.seq_len} tokens",
        "tokens_per_step": spec.tokens_per_step,
        "total_steps": steps,
        "total_tokens": _human(steps * spec.tokens_per_step),
        "flops_per_token": f"{_human(fpt)} (the paper's convention; the devices compute {_human(hardware)}: MFU)",
        "total_flops": _human(fpt * steps * spec.tokens_per_step) + " (the paper's convention)",
        "zero": f"stage {spec.zero.stage}, base {spec.zero.base_config}, offload optimizer "
        f"{spec.zero.offload_optimizer}, params {spec.zero.offload_params}",
        "optimizer": f"{spec.optimizer.name}, lr {spec.optimizer.lr:g}, clip {spec.optimizer.grad_clip:g}",
    }
    return summary
