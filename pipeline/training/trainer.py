"""The trainer of one rank: components built from their sub-specs, and a short loop around `train_step`.

engine       pipeline.training.engine      DeepSpeed, from the model config and the built DeepSpeed config
loader       pipeline.data                 this rank's rows of the data mixture; its position in every checkpoint
checkpointer pipeline.training.checkpoint  load() at start, save(step, state) on schedule and on signals
validator    pipeline.training.validation  validation loss at test-time loop counts
metrics      pipeline.training.metrics     the timing window, metrics.jsonl and TensorBoard (rank 0)
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.config import hardware_flops_per_token, recompute_flops_per_token
from model.sampling import expected_loop_counts
from parcae_errors import REQUEUE_EXIT_CODE, ParcaeError, ReportedElsewhere
from pipeline.data.loader import DataWaitInterrupted
from pipeline.data.mixture import train_loader
from pipeline.evaluation.dashboard import hparams_of, source_val_key
from pipeline.evaluation.text import document_start, open_tokenizer
from pipeline.jobspec import EvalSpec, JobSpec, LoadedSpec, LoggingSpec
from pipeline.jobspec.run_dir import keep_tokenizer, record_segment
from pipeline.training.checkpoint import Checkpointer, LayoutMismatch, plan_resume, set_aside
from pipeline.training.distributed import (
    PEER_FAILED_SIGNAL,
    RankInfo,
    accelerator_device,
    agree_on_failure,
    cpu_threads_per_rank,
    init_distributed,
    lost_a_peer,
    mark_peer_failed,
    memory_metrics,
    stopped_for_a_peer,
)
from pipeline.training.ds_config import build_ds_config, load_base_config
from pipeline.training.engine import build_engine, engine_metrics
from pipeline.training.guard import LossGuard
from pipeline.training.lock import RunLock
from pipeline.training.memory import device_memory_here, plan_memory
from pipeline.training.memory_trace import MemoryTrace
from pipeline.training.metrics import MetricsLogger
from pipeline.training.peak import gemm_peak
from pipeline.training.preflight import PREFLIGHT_ENV, preflight
from pipeline.training.resize import check_resume
from pipeline.training.schedule import lr_multiplier
from pipeline.training.step import DepthSampler, Progress, TrainingHalted, train_step
from pipeline.training.validation import DownstreamEvaluator, TextSamples, Validator
from pipeline.training.weights import initial_weights

log = logging.getLogger(__name__)


def engine_for_job(
    spec: JobSpec,
    world_size: int,
    rank: int,
    device_type: str,
    initial: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> Any:
    """The engine `parcae train` trains: the DeepSpeed config built from the spec's sections, the model
    (from ``initial()`` when given), its optimizer and learning-rate schedule (the one place that composes
    them from a whole job)."""
    t = spec.training
    base = load_base_config(spec.zero.base_config)
    ds_config = build_ds_config(t, spec.optimizer, spec.zero, base, world_size, device_type)
    return build_engine(
        spec.model.build(),
        ds_config,
        optimizer=spec.optimizer,
        zero=spec.zero,
        lr_multiplier=functools.partial(lr_multiplier, total_steps=spec.total_steps, spec=spec.schedule),
        total_steps=spec.total_steps,
        seed=t.seed,
        rank=rank,
        initial=initial,
        compile_units=t.compile == "on" or (t.compile == "auto" and device_type != "cpu"),
        seq_len=spec.data.seq_len,
    )


def validation_loops(loop_counts: list[int], mean_recurrence: int) -> int:
    """The evaluated loop count whose validation loss is the run's headline (``loss/val``): the mean
    recurrence if it is evaluated, else the nearest evaluated count below it (or the smallest)."""
    counts = sorted(loop_counts)
    below = [c for c in counts if c <= mean_recurrence]
    return below[-1] if below else counts[0]


class StopSignal:
    """SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) alike ask for a checkpoint and a requeue exit; every rank stops at
    the same step (a terminal's Ctrl-C reaches each rank twice, from the terminal and from the launcher, so a
    second one cannot mean "harder"). ``event`` is set too: a run waiting for data (a stalled endpoint, shards
    being retried) stops waiting and exits 75 without a checkpoint."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.event = threading.Event()

    def install(self) -> None:
        def handler(signum, _frame):
            # Only the first signal sets the event. A second one (the launcher forwards what the rank got
            # already) can come while the first handler is inside `Event.set`, holding the event's lock, which
            # is not reentrant: setting it again there waited forever in the main thread. Nothing else takes
            # that lock: the data waits poll `is_set` (`ShardLoader._wait`, `_prefetched`).
            first = self.received is None
            self.received = signum
            if first:
                self.event.set()

        def peer_failed(_signum, frame):  # the launcher: another rank failed; stop as on SIGTERM, quietly
            mark_peer_failed()
            handler(signal.SIGTERM, frame)

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, handler)
        signal.signal(PEER_FAILED_SIGNAL, peer_failed)

    def came(self) -> bool:
        """Whether a stop signal came, counting one whose handler has not run yet: a signal that comes while the
        main thread waits inside native code (a collective, a read) is handled at Python's next check, and the
        error that wait ends in (a peer that left for the same signal) can reach an ``except`` clause first."""
        signal.pthread_kill(threading.get_ident(), 0)  # sends nothing; CPython runs pending handlers on return
        return self.received is not None

    def agreed(self, lost_lease: bool = False) -> bool:
        """True on every rank if any rank got the signal (a collective: every rank calls it each step).
        A lost lease (another run took the checkpoint directory over) stops every rank without a save."""
        import torch.distributed as dist

        flag = torch.tensor([2.0 if lost_lease else 1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 2:
            raise ParcaeError(
                "checkpoint.dir: another run took over this run's lease (was this run stalled for over a "
                "minute?); stopping without writing so the two do not mix checkpoints"
            )
        if flag.item() > 0 and self.received is None:
            self.received = signal.SIGTERM
        return flag.item() > 0


def set_cpu_threads(procs_per_node: int) -> None:
    threads = cpu_threads_per_rank(procs_per_node)
    torch.set_num_threads(threads)
    log.info("CPU: %d intra-op thread(s) per rank (set OMP_NUM_THREADS to choose)", threads)


class Trainer:
    def __init__(self, loaded: LoadedSpec, info: RankInfo, resume_from: str | None = None, restart: bool = False):
        spec = self.spec = loaded.spec
        self.info, self.resume_from, self.restart = info, resume_from, restart
        self.device, device_type = accelerator_device(info.local_rank)
        memory_file = Path(spec.run_dir or ".") / "memory" / f"rank{info.rank}.json"
        self.memory_trace = MemoryTrace(device_type, spec.logging.profile_memory_steps, memory_file, info.rank)
        if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            set_cpu_threads(spec.cluster.procs_per_node)
        init_distributed(device_type, spec.training.collective_timeout_s)
        self.initial: dict[str, torch.Tensor] | None = None
        self.resume_tag: str | None = None  # the checkpoint to resume from (rank 0's resume plan), None: step 0
        self.start_from: str | None = None  # checkpoint.init_from, for a run that starts at step 0
        self.lock = self.claim_run(spec) if info.rank == 0 else None
        agree_on_failure(self.claim_failure)
        decided = [self.resume_tag, self.start_from]
        torch.distributed.broadcast_object_list(decided, src=0)
        self.resume_tag, self.start_from = decided
        torch.manual_seed(spec.training.seed)
        t, cfg = spec.training, spec.model.build()
        if info.rank == 0:
            self.log_memory_plan(spec, device_type)
        assert t.micro_batch_size is not None and t.gradient_accumulation_steps is not None
        self.total_steps = spec.total_steps
        initial = (lambda: self.initial) if self.start_from else None  # only rank 0 reads it
        self.engine = engine_for_job(spec, info.world_size, info.rank, device_type, initial)
        self.initial = None
        if self.start_from:
            log.info("weights from %s (checkpoint.init_from), a fresh optimizer", self.start_from)
        self.device_type = device_type
        options = spec.storage.s3_options()
        ranks = {"rank": info.rank, "world_size": info.world_size}
        self.loader = train_loader(
            spec.data,
            options,
            micro_batch_size=t.micro_batch_size,
            accumulation=t.gradient_accumulation_steps,
            seed=t.seed,
            vocab_size=cfg.vocab_size,  # every token id is checked against it as a shard is read
            **ranks,
        )
        self.validators = self.build_validators(spec, cfg, options, ranks)
        self.source_weights = {s.name: s.weight for s in spec.data.train_sources()}
        self.downstream, self.samples = self.prompted_evaluations(
            spec.eval, spec.logging, spec.tokenizer.path, cfg, options, ranks
        )
        self.checkpointer = Checkpointer(spec.checkpoint, options, loaded.to_yaml())
        self.sampler = DepthSampler.for_model(cfg, seed=t.seed, global_batch=self.loader.global_batch)
        self.guard = LossGuard(t.spike_zscore)
        self.progress = Progress()
        # what a checkpoint carries besides the engine (the depth sampler has none: its draws are a function
        # of the seed and the rows' positions, which the loader's state carries)
        for name, part in (("progress", self.progress), ("loader", self.loader), ("guard", self.guard)):
            self.checkpointer.register(name, part)
        self.run_dir = Path(spec.run_dir or ".")
        self.metrics = self.build_metrics(spec, cfg, device_type, ranks)
        self.stop = StopSignal()
        self.loaded = loaded

    def build_validators(self, spec: JobSpec, cfg, options, ranks: dict[str, int]) -> dict[str | None, Validator]:
        """The headline validation (``data.val_url``, key None) and one per source that names a validation set."""
        t = spec.training
        sets = [(None, spec.data.val_url)] + [(s.name, s.val_url) for s in spec.data.train_sources() if s.val_url]
        return {
            name: Validator(
                spec.eval,
                url,
                options,
                cfg,
                batch_size=t.micro_batch_size,
                seq_len=spec.data.seq_len,
                device=self.device,
                **ranks,
            )
            for name, url in sets
            if url
        }

    def build_metrics(self, spec: JobSpec, cfg, device_type: str, ranks: dict[str, int]) -> MetricsLogger:
        # MFU's FLOPs at the loop counts a long run averages (E[min(T, k)] < k), not the configured means
        means = expected_loop_counts(cfg.mean_recurrence, cfg.mean_backprop_depth) if cfg.looped else (None, None)
        measure_peak = device_type == "cpu" and not spec.logging.peak_flops_per_device  # the MFU denominator
        return MetricsLogger(
            spec.logging,
            self.run_dir,
            seq_len=spec.data.seq_len,
            tokens_per_step=spec.tokens_per_step,
            flops_per_token=hardware_flops_per_token(cfg, spec.data.seq_len, *means),
            recompute_flops_per_token=recompute_flops_per_token(cfg, spec.data.seq_len, *means),
            device_type=device_type,
            measured_peak=self.cpu_peak(spec.training.precision) if measure_peak else None,
            val_loops=validation_loops(spec.eval.loop_counts, cfg.mean_recurrence) if cfg.looped else None,
            **ranks,
        )

    claim_failure: ParcaeError | None = None
    change: str | None = None  # what resuming the checkpoint changes (another world size, ...), rank 0

    def claim_run(self, spec: JobSpec) -> RunLock | None:
        """Rank 0, before anything is built or written: the checks (unless the launcher ran them), then
        the run's lock. A failure is kept for `agree_on_failure`, so every rank stops together."""
        lock = None
        try:
            if os.environ.get(PREFLIGHT_ENV) != "done":
                preflight(spec)
            assert spec.run_dir and spec.checkpoint.dir
            options = spec.storage.s3_options()
            lock = RunLock(spec.run_dir, spec.checkpoint.dir, options).acquire()
            plan = plan_resume(spec.checkpoint.dir, options, self.resume_from, self.restart)
            self.change = check_resume(spec, plan.tag) if plan.tag else None  # refused before anything moves
            set_aside(spec.checkpoint.dir, plan.set_aside, options)  # nothing is ever written over
            self.resume_tag = plan.tag
            # checkpoint.init_from counts only for a run that starts at step 0
            self.start_from = spec.checkpoint.init_from if plan.tag is None else None
            if self.start_from:  # read and checked here, so a wrong file stops every rank before the engine
                self.initial = initial_weights(self.start_from, spec.model.build(), options)
            return lock
        except ParcaeError as exc:
            if lock is not None:
                lock.release()
            self.claim_failure = exc
            return None

    def run(self) -> int:
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> int:
        import torch.distributed as dist

        self.resume()
        progress = self.progress
        self.open_run(progress.step)
        self.stop.install()
        self.loader.interrupt_on(self.stop.event)
        batches = iter(self.loader)
        code = 0
        try:
            while progress.step < self.total_steps:
                step_start = time.perf_counter()
                result = self.one_step(batches, progress)
                last = progress.step == self.total_steps
                self.metrics.log_step(progress, result, step_start, last, self.details)
                self.evaluate_if_due(progress.step, last)
                stop = self.stop.agreed(lost_lease=self.lock is not None and self.lock.lost)
                if self.checkpointer.due(progress.step, last, stop):
                    self.checkpointer.save(self.engine, progress.step)
                if stop:
                    log.warning(
                        "signal %s: checkpoint written at step %d; exiting with %d for a requeue",
                        self.stop.received,
                        progress.step,
                        REQUEUE_EXIT_CODE,
                    )
                    code = REQUEUE_EXIT_CODE
                    break
        except TrainingHalted as exc:
            self.checkpointer.save(self.engine, progress.step)
            exc.saved_to = self.checkpointer.dir
            raise
        finally:
            self.memory_trace.finish()  # if the run ended within the traced steps
            batches.close()  # stops the loader's read-ahead thread before the process group goes away
            self.metrics.close()
        if code == 0 and self.info.rank == 0:
            log.info(
                "training finished: %d steps, %d tokens; logs in %s",
                progress.step,
                progress.tokens,
                self.spec.logging.tensorboard_dir,
            )
        dist.barrier()  # every rank is done with the group; run_train tears it down
        return code

    def open_run(self, step: int) -> None:
        """Before the first step: the run's spec and tokenizer into its directory (rank 0), the logs opened."""
        if self.info.rank == 0:
            self.loaded.save(self.run_dir / "spec.yaml")
            env, job = os.environ, {}
            if "SLURM_JOB_ID" in env:
                job = {"job": env["SLURM_JOB_ID"], "restart": int(env.get("SLURM_RESTART_COUNT", 0))}
            nodes = self.spec.cluster.nodes
            record_segment(self.run_dir, step=step, world_size=self.info.world_size, nodes=nodes, **job)
            location = self.spec.tokenizer.path or self.loader.manifest["tokenizer"].get("path")
            if location:  # the run carries its tokenizer: generate / eval of a copied run need it
                keep_tokenizer(str(location), self.run_dir, self.spec.storage.s3_options())
        self.metrics.open(step)
        self.metrics.write_text("spec", self.loaded.redact(self.loaded.to_yaml()), "yaml")  # URL passwords too
        self.metrics.write_hparams(hparams_of(self.spec.model_dump(mode="json")))
        ds_config = json.dumps(self.engine.config, indent=2, default=str)  # the dict the engine was built from
        self.metrics.write_text("deepspeed_config", self.loaded.redact(ds_config), "json")

    def one_step(self, batches, progress: Progress):
        """One optimizer step; ``progress`` advanced past it."""
        with self.memory_trace.step(progress.step + 1):
            try:
                result = self.train_step(batches, progress)
            except DataWaitInterrupted as exc:  # every rank got the signal: rank 0 says it
                raise exc if self.info.rank == 0 else ReportedElsewhere(exc.exit_code) from None
            except Exception as exc:
                # A stop signal came while another rank waited for data: that rank left mid-step (above) and
                # this one lost it in the step's collective. Rank 0 says why, whichever rank waited.
                if not self.stop.came() or stopped_for_a_peer() or not lost_a_peer(exc):
                    raise
                gone = DataWaitInterrupted("another rank's shards")
                raise gone if self.info.rank == 0 else ReportedElsewhere(gone.exit_code) from None
        progress.step += 1
        progress.tokens += self.spec.tokens_per_step
        self.guard.accept(result.loss)
        return result

    def evaluate_if_due(self, step: int, last: bool) -> None:
        """Validation, downstream scores and text samples, each on its own schedule."""
        if self.validators and self.validation_due(step, last):
            self.metrics.write_validation(step, self.validate(), self.spec.name)
        if self.downstream and self.downstream.due(step, last):
            started = time.perf_counter()
            scores = self.downstream.run(self.engine)
            scores["downstream/seconds"] = time.perf_counter() - started
            self.metrics.write({"step": step, **scores})
        if self.samples and self.samples.due(step, last):
            self.metrics.write_samples(step, self.samples.run(self.engine))

    def validation_due(self, step: int, last: bool) -> bool:
        return next(iter(self.validators.values())).due(step, last)

    def validate(self) -> dict[str, float]:
        """The headline validation (``data.val_url``) and each source's (``val/<name>/...``). Without a
        headline set, the headline is the sources' losses weighted as the mixture weighs them."""
        results: dict[str, float] = {}
        per_source: dict[str, dict[str, float]] = {}
        for name, validator in self.validators.items():
            losses = validator.run(self.engine)
            if name is None:
                results.update(losses)
            else:
                per_source[name] = losses
                results.update({source_val_key(name, key): value for key, value in losses.items()})
        if None not in self.validators and per_source:
            weights = {name: self.source_weights[name] for name in per_source}
            total = sum(weights.values())
            for key in next(iter(per_source.values())):
                if not key.endswith("_std"):
                    results[key] = sum(weights[n] * losses[key] for n, losses in per_source.items()) / total
        return results

    def log_memory_plan(self, spec: JobSpec, device_type: str) -> None:
        """The plan's peak per rank next to this device's memory (`parcae validate --memory` has the parts).
        Advice only: a plan that cannot be made is logged, never a reason to stop the run."""
        try:
            plan = plan_memory(spec, device_type)
            here = device_memory_here(device_type, spec.cluster.procs_per_node)
        except Exception as exc:  # the planner must not stop training
            log.warning("memory plan: not available (%s: %s)", type(exc).__name__, exc)
            return
        gib = plan.peak_bytes / 2**30
        if here is not None and plan.peak_bytes > here[0]:
            log.warning(
                "memory plan: %.3g GiB per rank at the peak (%s), more than the %.3g GiB of %s; this run may run "
                "out of memory (`parcae validate SPEC --memory` says what to turn)",
                gib,
                plan.peak_phase,
                here[0] / 2**30,
                here[1],
            )
        else:
            log.info("memory plan: %.3g GiB per rank at the peak (%s)", gib, plan.peak_phase)

    def cpu_peak(self, precision: str) -> float:
        """This rank's measured matmul peak (in the matmuls' dtype), the MFU denominator on CPU; every rank
        measures at once, each on its own threads."""
        dtype = torch.bfloat16 if precision in ("bf16", "bf16-mixed") else torch.float32
        peak = gemm_peak(dtype)
        if self.info.rank == 0:
            log.info(
                "CPU: %s matmul peak measured at %.1f GFLOP/s per rank; MFU is against it "
                "(logging.peak_flops_per_device overrides)",
                str(dtype).removeprefix("torch."),
                peak / 1e9,
            )
        return peak

    def prompted_evaluations(
        self,
        evaluation: EvalSpec,
        logging_spec: LoggingSpec,
        tokenizer: str | None,
        cfg,
        options,
        ranks: dict[str, int],
    ) -> tuple[DownstreamEvaluator | None, TextSamples | None]:
        """``eval.downstream`` and ``logging.sample_prompts``, built on every rank with the run's tokenizer
        (``tokenizer.path``, else the shards'; opened once, for both); a problem, which every rank finds, is
        said by rank 0."""
        if not (evaluation.downstream.bundle or logging_spec.sample_prompts):
            return None, None
        location = tokenizer or self.loader.manifest["tokenizer"]["path"]
        try:
            with tempfile.TemporaryDirectory() as tmp:
                text = open_tokenizer(location, options, Path(tmp))
            if text.vocab_size > cfg.vocab_size:
                raise ParcaeError(
                    f"tokenizer {location}: {text.vocab_size} tokens, more than model.vocab_size {cfg.vocab_size}"
                )
            start = document_start(text, self.loader.manifest).id  # as the training rows start documents
            downstream = None
            if evaluation.downstream.bundle:
                settings, counts = evaluation.downstream, evaluation.loop_counts
                downstream = DownstreamEvaluator(
                    settings, counts, cfg, text, start, options, device=self.device, **ranks
                )
        except ParcaeError as exc:
            raise exc if self.info.rank == 0 else ReportedElsewhere(exc.exit_code) from None
        samples = TextSamples(logging_spec, cfg, text, start, self.device) if logging_spec.sample_prompts else None
        return downstream, samples

    def train_step(self, batches, progress: Progress):
        return train_step(
            self.engine,
            batches,
            self.sampler,
            self.guard,
            progress,
            accumulation=self.spec.training.gradient_accumulation_steps or 1,
            max_nonfinite=self.spec.training.max_nonfinite_steps,
            device=self.device,
            collect_loop_stats=self.metrics.details_due(progress.step + 1),
        )

    def details(self) -> dict[str, Any]:
        return {**engine_metrics(self.engine), **memory_metrics(self.device_type), **self.loader.metrics()}

    def resume(self) -> None:
        """The checkpoint the resume plan chose, if any, into the engine and every registered part."""
        if self.change:
            log.warning("%s: %s", self.resume_tag, self.change)
        try:
            state = self.checkpointer.load(self.engine, self.resume_tag, local_rank=self.info.local_rank)
        except LayoutMismatch as exc:  # every rank finds it; rank 0 says it
            raise exc if self.info.rank == 0 else ReportedElsewhere(exc.exit_code) from None
        if state is not None:
            log.info("resuming at step %d (%d tokens seen)", self.progress.step, self.progress.tokens)
