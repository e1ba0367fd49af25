"""`parcae train SPEC`: the training loop (one process per rank), its logging, evaluation and checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import signal
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import flops_per_token, loop_generator, sample_loop_counts
from pipeline import checkpoint
from pipeline.distributed import (
    RankInfo,
    cpu_threads_per_rank,
    export_rank_env,
    free_port,
    launch_local,
    rank_info,
)
from pipeline.errors import REQUEUE_EXIT_CODE, ParcaeError
from pipeline.spec import JobSpec
from pipeline.spec_io import LoadedSpec, load_spec

log = logging.getLogger(__name__)


def run_train(spec_path: str, overrides: list[str]) -> int:
    loaded = load_spec(spec_path, overrides)
    spec = loaded.spec
    info = rank_info()
    if info is None:
        if spec.world_size > 1:
            if spec.cluster.nodes > 1:
                raise ParcaeError(
                    f"cluster.nodes={spec.cluster.nodes}: a multi-node run starts one process per rank under Slurm "
                    "(parcae submit) or torchrun; `parcae train` alone starts ranks on this machine only"
                )
            args = ["train", spec_path, *[f"--set={o}" for o in overrides]]
            return launch_local(args, spec.world_size)
        info = RankInfo(0, 0, 1, "127.0.0.1", free_port())
    if info.world_size != spec.world_size:
        raise ParcaeError(
            f"cluster: the spec asks for {spec.world_size} ranks (nodes {spec.cluster.nodes} x procs_per_node "
            f"{spec.cluster.procs_per_node}) but {info.world_size} were started"
        )
    export_rank_env(info)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return Trainer(loaded, info).run()


def loop_counts(spec: JobSpec, step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """This rank's slice of loop counts drawn for the whole global micro-batch.

    Every rank draws the same global counts from (seed, step, micro-step) and takes its own rows:
    sequences on different ranks get different depths, yet every rank knows the largest counts and
    runs that many iterations, so the ranks stay in step under ZeRO-3.
    """
    micro_batch, world = spec.training.micro_batch_size, spec.world_size
    assert micro_batch is not None
    n_nograd, n_grad = sample_loop_counts(
        micro_batch * world,
        spec.model.mean_recurrence,
        spec.model.mean_backprop_depth,
        loop_generator(spec.training.seed, -1, step, micro),
    )
    rows = slice(rank * micro_batch, (rank + 1) * micro_batch)
    return n_nograd[rows], n_grad[rows], (int(n_nograd.max()), int(n_grad.max()))


def h0_generator(seed: int, rank: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"parcae-h0:{seed}:{rank}:{step}:{micro}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    spikes_skipped: int = 0


class LossGuard:
    """Decides, before the backward pass, whether a micro-batch's loss (averaged over ranks) is used.

    "nonfinite": the loss is NaN or infinite. "spike": ``zscore`` is set and the loss exceeds the mean of
    the last ``window`` step losses by more than ``zscore`` standard deviations (checked once ``warmup``
    steps have been seen). Its window is part of every checkpoint, so a resumed run decides the same.
    """

    def __init__(self, zscore: float | None, window: int = 100, warmup: int = 20):
        self.zscore, self.warmup = zscore, warmup
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> str:
        if not math.isfinite(loss):
            return "nonfinite"
        if self.zscore is not None and len(self.recent) >= self.warmup:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
            if loss > mean + self.zscore * std:
                return "spike"
        return "ok"

    def accept(self, step_loss: float) -> None:
        if math.isfinite(step_loss):
            self.recent.append(step_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.extend(state.get("recent", []))


class Trainer:
    def __init__(self, loaded: LoadedSpec, info: RankInfo):
        self.loaded, self.spec, self.info = loaded, loaded.spec, info
        self.stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------
    def run(self) -> int:
        import torch.distributed as dist

        from pipeline.engine import accelerator_device, build_engine, init_distributed
        from pipeline.evaluate import evaluate
        from pipeline.loader import ShardLoader

        spec, info = self.spec, self.info
        _, device_type = accelerator_device(info.local_rank)
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            threads = cpu_threads_per_rank(spec.cluster.procs_per_node)
            torch.set_num_threads(threads)
            log.info("CPU: %d intra-op thread(s) per rank (set OMP_NUM_THREADS to choose)", threads)
        init_distributed(device_type)
        torch.manual_seed(spec.training.seed)
        built = build_engine(spec, info.world_size, info.local_rank, info.rank)
        engine, device = built.engine, built.device
        self.engine, self.device = engine, device
        options = self.options = self._s3_options()
        t = spec.training
        train_loader = ShardLoader(
            spec.data.train_url,
            rank=info.rank,
            world_size=info.world_size,
            micro_batch_size=t.micro_batch_size,
            seq_len=spec.data.seq_len,
            seed=t.seed,
            shuffle_buffer=spec.data.shuffle_buffer,
            options=options,
            on_bad_shard=spec.data.on_bad_shard,
            prefetch=spec.data.num_workers,
            max_retries=spec.storage.max_retries,
        )
        if spec.data.val_url:
            from pipeline.evaluate import val_loader

            val_loader(spec, info, options)  # a validation set that cannot work fails now, not at the first eval
        progress = Progress()
        guard = self.guard = LossGuard(t.spike_zscore)
        state = checkpoint.load(
            engine, spec.checkpoint.dir, spec.checkpoint.staging_dir, options, local_rank=info.local_rank
        )
        if state is not None:
            progress.step, progress.tokens = int(state["step"]), int(state["tokens"])
            progress.nonfinite_total = int(state.get("nonfinite_total", 0))
            progress.spikes_skipped = int(state.get("spikes_skipped", 0))
            guard.load_state_dict(state.get("guard", {}))
            train_loader.load_state_dict(state["loader"])
            log.info("resuming at step %d (%d tokens seen)", progress.step, progress.tokens)
        run_dir = Path(spec.run_dir or ".")
        writer = None
        if info.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.loaded.save(run_dir / "spec.yaml")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=spec.logging.tensorboard_dir, purge_step=progress.step or None)
        self._install_signals()
        total = spec.total_steps
        cfg = spec.model.build()
        fpt = flops_per_token(cfg, spec.data.seq_len)
        batches = iter(train_loader)
        code = 0
        window_start, window_tokens, wait_total = time.perf_counter(), 0, 0.0
        try:
            while progress.step < total:
                step_start = time.perf_counter()
                losses, counts, wait = [], [], 0.0
                collect = (progress.step + 1) % spec.logging.log_interval == 0
                loop_stats: list[dict[str, float]] | None = [] if collect else None
                micro, draw = 0, 0
                while micro < t.gradient_accumulation_steps:  # skipped micro-batches are replaced by the next ones
                    waited = time.perf_counter()
                    batch = next(batches).to(device, non_blocking=True)
                    wait += time.perf_counter() - waited
                    n_nograd, n_grad, at_least = loop_counts(spec, progress.step, draw, info.rank)
                    loss = engine(
                        batch[:, :-1],
                        batch[:, 1:],
                        loops=(n_nograd, n_grad),
                        min_iterations=at_least,
                        generator=h0_generator(t.seed, info.rank, progress.step, draw, device),
                        loop_stats=loop_stats if micro == 0 else None,
                    )
                    draw += 1
                    verdict = guard.check(self._global_mean(loss.detach().float()))
                    if verdict != "ok":
                        self._skipped(verdict, progress, engine, train_loader)
                        if draw >= 10 * t.gradient_accumulation_steps + t.max_nonfinite_steps:
                            self._save(engine, progress, train_loader)
                            raise ParcaeError(
                                f"step {progress.step + 1}: {draw - micro} of {draw} micro-batches skipped "
                                "(loss spikes or non-finite); training.spike_zscore may be too strict"
                            )
                        continue
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.detach().float())
                    counts.append(n_nograd + n_grad)
                    micro += 1
                    progress.nonfinite_in_a_row = 0
                progress.step += 1
                progress.tokens += spec.tokens_per_step
                window_tokens += spec.tokens_per_step
                wait_total += wait
                loss_value = self._global_mean(torch.stack(losses).mean())
                guard.accept(loss_value)
                record: dict[str, Any] = {"step": progress.step, "loss": loss_value}
                if collect or progress.step == total:
                    elapsed = time.perf_counter() - window_start
                    record.update(
                        self._metrics(
                            engine,
                            built,
                            progress,
                            elapsed,
                            window_tokens,
                            wait_total,
                            fpt,
                            torch.cat(counts),
                            loop_stats,
                            step_start,
                        )
                    )
                    window_start, window_tokens, wait_total = time.perf_counter(), 0, 0.0
                if info.rank == 0:
                    self._write(run_dir, writer, record, torch.cat(counts) if collect else None)
                if spec.data.val_url and (progress.step % spec.eval.interval_steps == 0 or progress.step == total):
                    results = evaluate(engine, spec, info, options, device)
                    if info.rank == 0:
                        self._write(run_dir, writer, {"step": progress.step, **results}, None)
                stop = self._agreed_stop()
                if progress.step % spec.checkpoint.interval_steps == 0 or progress.step == total or stop:
                    self._save(engine, progress, train_loader)
                if stop:
                    log.warning(
                        "signal %s: checkpoint written at step %d; exiting with %d for a requeue",
                        self.stop_signal,
                        progress.step,
                        REQUEUE_EXIT_CODE,
                    )
                    code = REQUEUE_EXIT_CODE
                    break
        finally:
            if writer is not None:
                writer.close()
        if code == 0 and info.rank == 0:
            log.info(
                "training finished: %d steps, %d tokens; logs in %s",
                progress.step,
                progress.tokens,
                spec.logging.tensorboard_dir,
            )
        dist.barrier()
        dist.destroy_process_group()
        return code

    # ------------------------------------------------------------------------------------------
    def _s3_options(self):
        from data_prep.storage import S3Options

        s = self.spec.storage
        return S3Options.from_env(s.endpoint_url, s.region, s.max_retries)

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    def _agreed_stop(self) -> bool:
        """Every rank stops at the same step if any rank got the signal."""
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM
        return flag.item() > 0

    def _global_mean(self, value: torch.Tensor) -> float:
        import torch.distributed as dist

        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return float(total) / self.info.world_size

    def _skipped(self, verdict: str, progress: Progress, engine, loader) -> None:
        """A micro-batch whose loss is not used: counted; too many non-finite ones in a row stop the run."""
        if verdict == "spike":
            progress.spikes_skipped += 1
            log.warning(
                "step %d: loss spike, micro-batch skipped (%d so far)", progress.step + 1, progress.spikes_skipped
            )
            return
        progress.nonfinite_in_a_row += 1
        progress.nonfinite_total += 1
        log.warning(
            "step %d: non-finite loss, micro-batch skipped (%d in a row)",
            progress.step + 1,
            progress.nonfinite_in_a_row,
        )
        if progress.nonfinite_in_a_row >= self.spec.training.max_nonfinite_steps:
            self._save(engine, progress, loader)
            raise ParcaeError(
                f"training stopped at step {progress.step}: the loss was not finite for "
                f"{progress.nonfinite_in_a_row} micro-batches in a row (training.max_nonfinite_steps); "
                f"checkpoint written to {self.spec.checkpoint.dir}"
            )

    def _save(self, engine, progress: Progress, loader) -> None:
        state = {
            "step": progress.step,
            "tokens": progress.tokens,
            "loader": loader.state_dict(),
            "nonfinite_total": progress.nonfinite_total,
            "spikes_skipped": progress.spikes_skipped,
            "guard": self.guard.state_dict(),
        }
        checkpoint.save(
            engine,
            self.spec.checkpoint.dir,
            progress.step,
            state,
            self.spec.checkpoint.keep_last,
            self.loaded.to_yaml(),
            self.spec.checkpoint.staging_dir,
            self.options,
        )

    def _spectral(self) -> dict[str, float]:
        """max and mean of A_bar (collective under ZeRO-3: every rank calls it)."""
        import deepspeed

        if self.spec.model.arch != "parcae":
            return {}
        adapter, injection = self.engine.module.transformer.recurrence.adapter, self.spec.model.injection
        if injection == "add":  # u = h + e: A is the identity
            return {"spectral_radius": 1.0}
        if injection == "concat":  # u = W [h; e]: A is the block of W acting on h
            d = self.spec.model.d_model
            if d > 4096:
                return {}
            with deepspeed.zero.GatheredParameters([adapter.weight]), torch.no_grad():
                return {"spectral_radius": float(torch.linalg.eigvals(adapter.weight[:, :d].float()).abs().max())}
        with deepspeed.zero.GatheredParameters([adapter.A_log, adapter.dt_bias]), torch.no_grad():
            a_bar, _ = adapter.discretize()
            return {"spectral_radius": float(a_bar.max()), "a_bar_mean": float(a_bar.mean())}

    def _metrics(self, engine, built, progress, elapsed, tokens, wait, fpt, counts, loop_stats, step_start):
        spec = self.spec
        tokens_per_s = tokens / max(elapsed, 1e-9)
        metrics: dict[str, Any] = {
            "lr": engine.get_lr()[0],
            "tokens_seen": progress.tokens,
            "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / spec.data.seq_len,
            "step_time_s": time.perf_counter() - step_start,
            "data_wait_s": wait,
            "loops_mean": float(counts.float().mean()),
            "nonfinite_skipped": progress.nonfinite_total,
            "spikes_skipped": progress.spikes_skipped,
        }
        norm = engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm.detach()) if torch.is_tensor(norm) else float(norm)
        peak = spec.logging.peak_flops_per_device or (None if built.device_type == "cpu" else 989e12)
        if peak:
            metrics["mfu"] = fpt * tokens_per_s / (peak * self.info.world_size)
        if built.device_type == "cpu":
            metrics["memory_max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        else:
            metrics["memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        metrics.update(self._spectral())
        if loop_stats:
            metrics["h_norm_last_loop"] = loop_stats[-1]["h_norm"]
            metrics["h_relative_change_last_loop"] = loop_stats[-1]["relative_change"]
        return metrics

    def _write(self, run_dir: Path, writer, record: dict[str, Any], counts: torch.Tensor | None) -> None:
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                group = "val" if key.startswith("val_") else "train"
                writer.add_scalar(f"{group}/{key}", value, step)
        if counts is not None:
            writer.add_histogram("train/sampled_loops", counts, step)
        if "lr" in record:
            log.info("step %d loss %.4f lr %.3g %.0f tok/s", step, record["loss"], record["lr"], record["tokens_per_s"])
        writer.flush()
