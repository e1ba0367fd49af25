"""Training metrics: the timing window, `metrics.jsonl` and TensorBoard, written by rank 0.

`MetricsLogger` is called by every rank after every step (the detailed metrics every ``log_interval``
steps include collectives, such as gathering the injection under ZeRO-3 for its spectral radius), and
writes on rank 0 only: one JSON line per step (plus evaluations) and the same numbers as TensorBoard
scalars laid out by purpose (`pipeline.evaluation.dashboard`: tags, the custom-scalars layout), the
per-loop state statistics at every loop index, the sampled loop counts as a histogram, and the run's
spec and DeepSpeed config as text.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.evaluation.curves import plot_loop_curve
from pipeline.evaluation.dashboard import HPARAM_METRICS, LAYOUT, STABILITY_LIMIT, loop_tags, tag
from pipeline.evaluation.losses import try_fit
from pipeline.jobspec import LoggingSpec
from pipeline.training.step import Progress, StepResult

log = logging.getLogger(__name__)

H100_BF16_PEAK = 989e12  # FLOP/s: logging.peak_flops_per_device's default on GPU


class MetricsLogger:
    def __init__(
        self,
        spec: LoggingSpec,
        run_dir: Path,
        *,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_step: int,
        flops_per_token: float,
        device_type: str,
        recompute_flops_per_token: float = 0.0,
        measured_peak: float | None = None,
        val_loops: int | None = None,
    ):
        self.interval, self.tensorboard_dir = spec.log_interval, spec.tensorboard_dir
        self.run_dir, self.rank, self.world_size, self.seq_len = run_dir, rank, world_size, seq_len
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.recompute_flops_per_token = recompute_flops_per_token  # checkpointing's: in HFU, not in MFU
        # a CPU's peak is measured (`pipeline.training.peak`); a GPU's is the published one unless given
        self.peak = spec.peak_flops_per_device or (measured_peak if device_type == "cpu" else H100_BF16_PEAK)
        self.val_loops = val_loops  # the loop count whose validation loss is loss/val (the mean recurrence)
        self.max_radius = 0.0  # the largest spectral radius logged by this process (an HParams metric)
        self.writer: Any = None
        self._restart_window()

    def open(self, start_step: int) -> None:
        """Start writing (rank 0); events after ``start_step`` from an earlier attempt are dropped."""
        self._restart_window()
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=start_step or None)
        self.writer.add_custom_scalars(LAYOUT)

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        """The run's hyperparameters for TensorBoard's HParams plugin, with the metrics it shows beside them
        (`dashboard.HPARAM_METRICS`, updated as the run goes); rank 0 only."""
        if self.rank != 0:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        writer = self.writer._get_file_writer()
        experiment, session_start, _session_end = hparams_summaries(hparams, dict.fromkeys(HPARAM_METRICS, 0.0))
        writer.add_summary(experiment)  # the metrics' names; their values are the scalars of those tags
        writer.add_summary(session_start)
        self.writer.flush()

    def write_text(self, name: str, text: str, language: str = "") -> None:
        """A text card (``run/<name>``: the spec, the DeepSpeed config), as a fenced block; rank 0 only."""
        if self.rank == 0:
            self.writer.add_text(f"run/{name}", f"```{language}\n{text}\n```", 0)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def details_due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) reports the detailed metrics (and so collects loop statistics)."""
        return step % self.interval == 0

    def _restart_window(self) -> None:
        self.window_start, self.window_tokens, self.window_wait = time.perf_counter(), 0, 0.0

    def log_step(
        self,
        progress: Progress,
        result: StepResult,
        step_start: float,
        last_step: bool,
        details: Callable[[], dict[str, Any]],
    ) -> None:
        """Every rank, after each step. ``details()`` (engine metrics: lr, gradient norm, spectral radius,
        memory) runs on every rank when the detailed metrics are due."""
        self.window_tokens += self.tokens_per_step
        self.window_wait += result.data_wait_s
        record: dict[str, Any] = {"step": progress.step, "loss": result.loss}
        due = self.details_due(progress.step)
        if due or last_step:
            elapsed = time.perf_counter() - self.window_start
            tokens_per_s = self.window_tokens / max(elapsed, 1e-9)
            record.update(
                {
                    "tokens_seen": progress.tokens,
                    "tokens_per_s": tokens_per_s,
                    "samples_per_s": tokens_per_s / self.seq_len,
                    "step_time_s": time.perf_counter() - step_start,
                    "data_wait_s": self.window_wait,
                    "nonfinite_skipped": progress.nonfinite_total,
                    "spikes_skipped": progress.spikes_skipped,
                }
            )
            if result.loop_counts is not None:  # None: the GPT baseline
                record["loops_mean"] = float(result.loop_counts.float().mean())
            if self.peak:
                record["mfu"] = self.flops_per_token * tokens_per_s / (self.peak * self.world_size)
                executed = self.flops_per_token + self.recompute_flops_per_token
                record["hfu"] = executed * tokens_per_s / (self.peak * self.world_size)
            record.update(details())
            if result.loop_stats:
                record["h_norm_last_loop"] = result.loop_stats[-1]["h_norm"]
                record["h_relative_change_last_loop"] = result.loop_stats[-1]["relative_change"]
            self._restart_window()
        tensorboard_only = loop_tags(result.loop_stats) if (due or last_step) and result.loop_stats else {}
        if "spectral_radius" in record:
            tensorboard_only[STABILITY_LIMIT] = 1.0
        self.write(record, result.loop_counts if due else None, tensorboard_only)

    def write_validation(self, step: int, results: dict[str, float], name: str) -> None:
        """A validation's losses; with three or more loop counts also the fitted L(T) = L_inf + k exp(-z T)
        (``val_fit_l_inf``) and its plot as an image (``scaling/loss_vs_loops``), as `parcae eval` makes
        them; rank 0 only."""
        if self.rank != 0:
            return
        counts = sorted(int(m[1]) for k in results if (m := re.fullmatch(r"val_loss_loops_(\d+)", k)))
        losses = [results[f"val_loss_loops_{t}"] for t in counts]
        fit = try_fit(counts, losses)[0] if len(counts) >= 3 else None
        record = {"step": step, **results, **({"val_fit_l_inf": fit.l_inf} if fit else {})}
        self.write(record)
        if len(counts) >= 2:
            figure = plot_loop_curve({f"step {step}": (counts, losses, fit)}, f"{name}: validation loss vs loops")
            self.writer.add_figure("scaling/loss_vs_loops", figure, step)
            self.writer.flush()

    def _hparam_metrics(self, record: dict[str, Any]) -> dict[str, float]:
        out = {}
        if "loss" in record and "tokens_per_s" in record:  # the detailed steps (and the last): enough for HParams
            out["hparams/train_loss"] = record["loss"]
        val = record.get(f"val_loss_loops_{self.val_loops}", record.get("val_loss"))
        if val is not None:
            out["hparams/val_loss"] = val
        if "spectral_radius" in record:
            self.max_radius = max(self.max_radius, record["spectral_radius"])
            out["hparams/max_spectral_radius"] = self.max_radius
        return out

    def write_samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Text samples to the log, metrics.jsonl and TensorBoard (``samples/prompt_N``); rank 0 only."""
        if self.rank != 0:
            return
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(
                json.dumps({"step": step, "samples": [{"prompt": p, "continuation": c} for p, c in samples]}) + "\n"
            )
        for i, (prompt, continuation) in enumerate(samples):
            log.info("sample at step %d: %s|%s", step, prompt, continuation)
            self.writer.add_text(f"samples/prompt_{i}", f"**{prompt}**{continuation}", step)
        self.writer.flush()

    def write(self, record: dict[str, Any], loop_counts: Any = None, tensorboard_only: dict | None = None) -> None:
        """One record (``step`` and numbers) to metrics.jsonl and TensorBoard (with ``tensorboard_only``
        tags beside it); rank 0 only."""
        if self.rank != 0:
            return
        with (self.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(tag(key), value, step)
                if key == f"val_loss_loops_{self.val_loops}":
                    self.writer.add_scalar("loss/val", value, step)
        for name, value in (tensorboard_only or {}).items():
            self.writer.add_scalar(name, value, step)
        for name, value in self._hparam_metrics(record).items():
            self.writer.add_scalar(name, value, step)
        if loop_counts is not None:
            self.writer.add_histogram("loops/sampled", loop_counts, step)
        if "lr" in record:
            log.info("step %d loss %.4f lr %.3g %.0f tok/s", step, record["loss"], record["lr"], record["tokens_per_s"])
        self.writer.flush()
