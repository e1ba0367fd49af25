"""What a run's TensorBoard shows, laid out by purpose: the tags of the metrics, and the custom-scalars layout.

Tags are grouped in the order a reader looks: ``loss/`` (train, validation at the mean loop count),
``scaling/`` (validation loss at every evaluated loop count T), ``loops/`` (the injection's spectral
radius beside the stability limit 1, the state norm and its relative change at every loop index, the
sampled loop counts), ``optim/``, ``throughput/``, ``system/``; ``downstream/`` and ``eval/`` are written
by the evaluations. `LAYOUT` puts the related tags on one chart each (TensorBoard's custom-scalars plugin,
its first tab): the test-time scaling curve over training is one chart with a line per T. A chart holds
lines of one scale only (mean A_bar, in (0, 1), and the sampled loop counts, about 8, are two charts).

metrics.jsonl keeps the flat keys (``loss``, ``val_loss_loops_4``, ...); only TensorBoard's tags are laid out.
"""

from __future__ import annotations

import re

STABILITY_LIMIT = "loops/stability_limit"  # a constant 1.0 beside the spectral radius

# What TensorBoard's HParams plugin compares runs by (a sweep's table and parallel coordinates): the
# spec's fields, and these metrics, each the latest value of its tag in the run.
HPARAM_FIELDS = (
    "model.arch", "model.injection", "model.d_model", "model.n_core", "model.mean_recurrence",
    "model.mean_backprop_depth", "optimizer.name", "optimizer.lr", "training.global_batch_size",
    "training.precision", "training.seed", "data.seq_len",
)  # fmt: skip
HPARAM_METRICS = {
    "hparams/train_loss": "the latest training loss",
    "hparams/val_loss": "the latest validation loss (at the mean loop count)",
    "hparams/max_spectral_radius": "the largest spectral radius of A_bar so far",
}

_GROUPS = {
    "optim": ("lr", "grad_norm", "nonfinite_skipped", "spikes_skipped"),
    "loops": ("spectral_radius", "a_bar_mean", "loops_mean", "h_norm_last_loop", "h_relative_change_last_loop"),
    "throughput": ("tokens_per_s", "samples_per_s", "step_time_s", "data_wait_s", "mfu", "hfu", "tokens_seen"),
}


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key."""
    if "/" in key:  # already a tag (downstream/..., eval/...)
        return key
    if key == "loss":
        return "loss/train"
    if key == "val_loss":  # the GPT baseline: no loop count
        return "loss/val"
    if key == "val_fit_l_inf":  # the fitted L(T)'s limit, from a validation at three or more loop counts
        return "scaling/fit_l_inf"
    match = re.fullmatch(r"val_loss_loops_(\d+)(_std)?", key)
    if match:
        return f"scaling/val_loss_T{match[1]}{match[2] or ''}"
    if key.startswith("memory_"):
        return f"system/{key}"
    for group, keys in _GROUPS.items():
        if key in keys:
            return f"{group}/{key}"
    return f"other/{key}"


def source_val_key(source: str, key: str) -> str:
    """A data source's validation metric: ``val/<source>/loss_T<T>`` (``val/<source>/loss`` for GPT)."""
    match = re.fullmatch(r"val_loss_loops_(\d+)(_std)?", key)
    if match:
        return f"val/{source}/loss_T{match[1]}{match[2] or ''}"
    return f"val/{source}/{key.removeprefix('val_')}"


def hparams_of(spec_data: dict) -> dict[str, int | float | str | bool]:
    """The HParams of a run from its spec (``model_dump``), plus its name."""
    out: dict[str, int | float | str | bool] = {"name": spec_data.get("name", "")}
    for dotted in HPARAM_FIELDS:
        section, key = dotted.split(".")
        value = spec_data.get(section, {}).get(key)
        if isinstance(value, (int, float, str, bool)):
            out[dotted] = value
    return out


def loop_tags(stats: list[dict[str, float]]) -> dict[str, float]:
    """Per-loop statistics (one dict per loop: ``h_norm``, ``relative_change``) as tags by loop index."""
    out = {}
    for i, s in enumerate(stats, start=1):
        out[f"loops/h_norm_L{i:02d}"] = s["h_norm"]
        out[f"loops/h_change_L{i:02d}"] = s["relative_change"]
    return out


LAYOUT = {
    "loss": {
        "train and validation loss (validation at the mean loop count)": ["Multiline", [r"loss/train$", r"loss/val$"]],
        "downstream: CORE at each loop count": ["Multiline", [r"downstream/core_loops_\d+$"]],
    },
    "test-time scaling": {
        "validation loss at each loop count T, and the fitted L_inf": [
            "Multiline",
            [r"scaling/val_loss_T\d+$", r"scaling/fit_l_inf$"],
        ],
        "parcae eval: loss at each T, and the fitted L_inf": [
            "Multiline",
            [r"eval/loss_loops_\d+$", r"eval/fit_l_inf$"],
        ],
    },
    "loop health": {
        "spectral radius of A_bar (stable below 1)": ["Multiline", ["loops/spectral_radius$", STABILITY_LIMIT + "$"]],
        "state norm |h| at each loop": ["Multiline", [r"loops/h_norm_L\d+$"]],
        "relative change |h_t - h_t-1| / |h_t-1| at each loop": ["Multiline", [r"loops/h_change_L\d+$"]],
        "mean A_bar (in (0, 1))": ["Multiline", ["loops/a_bar_mean$"]],
        "sampled loops per sequence (mean)": ["Multiline", ["loops/loops_mean$"]],
    },
    "data mixture": {
        "share of the rows since the last log, per source": ["Multiline", [r"data/[^/]+/share$"]],
        "tokens seen per source": ["Multiline", [r"data/[^/]+/tokens$"]],
        "passes over each source (epochs)": ["Multiline", [r"data/[^/]+/epochs$"]],
        "validation loss per source, at each loop count T": ["Multiline", [r"val/[^/]+/loss(_T\d+)?$"]],
    },
    "optimisation": {
        "learning rate": ["Multiline", ["optim/lr$"]],
        "gradient norm": ["Multiline", ["optim/grad_norm$"]],
        "skipped micro-batches (non-finite, spikes)": ["Multiline", [r"optim/(nonfinite|spikes)_skipped$"]],
    },
    "throughput": {
        "tokens/s": ["Multiline", ["throughput/tokens_per_s$"]],
        "MFU and HFU": ["Multiline", ["throughput/(mfu|hfu)$"]],
        "step time and data wait (s)": ["Multiline", ["throughput/step_time_s$", "throughput/data_wait_s$"]],
    },
    "system": {
        "peak memory per rank (GB)": ["Multiline", [r"system/memory_\w+$"]],
    },
}
