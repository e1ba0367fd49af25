"""A short resolved summary of a valid job spec (what `parcae validate` prints)."""

from __future__ import annotations

from typing import Any

from model.config import count_params, flops_per_token
from pipeline.ds_config import build_ds_config, load_base_config
from pipeline.spec import JobSpec


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
    fpt = flops_per_token(cfg, spec.data.seq_len)
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
        "flops_per_token": _human(fpt),
        "total_flops": _human(fpt * steps * spec.tokens_per_step),
        "zero": f"stage {spec.zero.stage}, base {spec.zero.base_config}, offload optimizer "
        f"{spec.zero.offload_optimizer}, params {spec.zero.offload_params}",
        "optimizer": f"{spec.optimizer.name}, lr {spec.optimizer.lr:g}, clip {spec.optimizer.grad_clip:g}",
    }
    return summary
