"""`parcae check-gpu`: does the GPU path work on this node, and how fast is it? One command, one GPU, no
network, no S3 and no Slurm; about 5-8 minutes on an H100, compiles included (docs/gpu.md).

1. the environment: torch, CUDA, the GPU, DeepSpeed's accelerator, and DeepSpeed's ops (installed, or
   JIT-compiled when a run needs one: whether ninja and nvcc are there to do it);
2. the embedded corpus tokenised and packed into local shards (in the run: no download);
3. training with `parcae train` (one rank, ZeRO-3), each run its own process as a user's would be:
   the parcae-140m shape (vocab and widths as shipped) bf16-mixed and compiled, timed (tokens/s; MFU and
   HFU against a bf16 matmul peak measured here first) with its peak memory measured; the same steps in
   fp32 (loss against bf16's); a resume from its last-but-one checkpoint (the next step's loss again); a
   few steps of the parcae-1.3b shape (peak memory against `parcae validate --memory`'s plan);
4. KV-cached generation against uncached at T = 1, 4 and 8, and CORE on the sample bundle, from the
   trained 140m;
and writes ``report.json`` and ``report.md`` (a table for BENCHMARKS.md). It exits 1 when a check fails
(loss not finite or not falling, bf16 far from fp32, a resume that does not continue the run); the targets
(MFU, memory against the plan) are measured and reported, not asserted.

``tiny`` runs the same code on CPU with configs/demo-tiny.yaml's shape (and a wider one for the "large"
run), fp32 matmul peak, no compile, in under a minute: the test suite runs it, so the command cannot rot.
Only `environment` and the device handling in `device_setup` differ between GPU and CPU.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parcae_errors import ParcaeError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
Say = Callable[[str], None]


@dataclass(frozen=True)
class Shape:
    """One model shape of the check: its spec, the overrides that make it fit one device, its steps."""

    name: str
    spec: Path
    overrides: tuple[str, ...]
    steps: int


@dataclass(frozen=True)
class Plan:
    tiny: bool
    device: str  # "cuda" or "cpu"
    seq_len: int
    main: Shape
    large: Shape
    compile: bool
    profile_steps: int  # measured-memory steps of each run (CPU: through the profiler, slow)
    prompt: int
    new_tokens: int
    bf16_tolerance: float  # largest mean |bf16 - fp32| loss over the second half of the steps


def acceptance_plan(tiny: bool, steps: int | None = None, seq_len: int | None = None) -> Plan:
    if tiny:
        seq = seq_len or 64
        common = (f"data.seq_len={seq}", f"model.max_seq_len={seq}", "training.micro_batch_size=4")
        return Plan(
            tiny=True,
            device="cpu",
            seq_len=seq,
            main=Shape("demo-tiny", CONFIGS / "demo-tiny.yaml", common, steps or 8),
            large=Shape("demo-tiny d=128", CONFIGS / "demo-tiny.yaml", (*common, "model.d_model=128"), 2),
            compile=False,
            profile_steps=2,
            prompt=16,
            new_tokens=16,
            bf16_tolerance=0.1,
        )
    seq = seq_len or 2048
    common = (f"data.seq_len={seq}", f"model.max_seq_len={seq}")
    return Plan(
        tiny=False,
        device="cuda",
        seq_len=seq,
        main=Shape("parcae-140m", CONFIGS / "parcae-140m.yaml", common, steps or 30),
        large=Shape("parcae-1.3b", CONFIGS / "parcae-1.3b.yaml", common, 3),
        compile=True,
        profile_steps=steps or 30,
        prompt=256,
        new_tokens=128,
        bf16_tolerance=0.1,
    )


def run_acceptance(out: str, plan: Plan, say: Say = lambda _: None) -> dict[str, Any]:
    """Every step of the check; the report (also written as ``OUT/report.json`` and ``OUT/report.md``)."""
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise ParcaeError(f"--out {root}: not empty; give a new directory (the check keeps every file it makes)")
    started = time.monotonic()
    report: dict[str, Any] = {"tiny": plan.tiny, "seq_len": plan.seq_len}
    lap = Laps(report)
    say("[1/5] environment")
    report["environment"] = environment(plan.device)  # no GPU: stops here, before anything is written
    root.mkdir(parents=True, exist_ok=True)
    for key, value in report["environment"].items():
        say(f"      {key}: {value}")
    peak = matmul_peak(plan.device)
    report["matmul_peak_flops"] = peak
    say(f"      {'bf16' if plan.device == 'cuda' else 'fp32'} matmul peak measured: {peak / 1e12:.1f} TFLOP/s")
    lap("environment")
    say("[2/5] data: the embedded corpus, tokenised and packed into local shards")
    data = prepare_data(root, plan.seq_len, 300_000 if plan.tiny else 10_000_000)
    lap("data")
    say(f"      {data['shards']}: {data['tokens']} training tokens")
    base = [
        f"tokenizer.path={data['tokenizer']}",
        f"data.train_url={data['shards']}/train",
        f"data.val_url={data['shards']}/val",
        f"training.device={plan.device}",
        "cluster.nodes=1",
        "cluster.procs_per_node=1",
        "training.gradient_accumulation_steps=1",
        "training.global_batch_size=null",
        "logging.log_interval=1",
        "eval.interval_steps=1000000",
        f"logging.peak_flops_per_device={peak:.6g}",
    ]
    main, large, bf16_mixed, compiled = plan.main, plan.large, "bf16-mixed", plan.compile

    def runs(precision: str, compile_on: bool, checkpoint_every: int, *more: str) -> list[str]:
        mode = [f"training.precision={precision}", f"training.compile={_on(compile_on)}"]
        return [*base, *mode, f"checkpoint.interval_steps={checkpoint_every}", *more]

    # one micro batch for all runs of the main shape (the same batches in bf16 and fp32): fp32's must fit
    base.append(fitting_micro_batch(main, runs("fp32", False, main.steps), plan.device))

    say(f"[3/5] training {main.name}, {main.steps} steps: bf16-mixed{', compiled' if compiled else ''}")
    profile = f"logging.profile_memory_steps={plan.profile_steps}"
    bf16 = train(root / "bf16", main, runs(bf16_mixed, compiled, main.steps - 1, "checkpoint.keep_last=2", profile))
    say(f"      {_speed_line(bf16)}")
    lap("train bf16")
    say("      the same steps in fp32")
    fp32 = train(root / "fp32", main, runs("fp32", False, main.steps))
    lap("train fp32")
    say(f"      resume from step {main.steps - 1}: the step after again")
    tag = f"step-{main.steps - 1:08d}"
    resumed = train(root / "bf16", main, runs(bf16_mixed, compiled, main.steps), resume_from=tag)
    lap("resume")
    say(f"      {large.name}, {large.steps} steps, for its peak memory")
    large_runs = runs(bf16_mixed, False, large.steps, f"logging.profile_memory_steps={large.steps}")
    big = train(root / "large", large, [*large_runs, fitting_micro_batch(large, large_runs, plan.device)])
    lap("train large")
    report["training"] = training_report(plan, bf16, fp32, resumed, big)
    say("[4/5] generation and CORE, from the trained model")
    from pipeline.jobs.evaluate import load_source

    source = load_source(str(root / "bf16"), None, None)
    report["generation"] = generation_speed(source.model, plan)
    lap("generation")
    for row in report["generation"]:
        say(f"      T={row['loops']}: cached {row['cached_tokens_per_s']:.1f} tok/s, "
            f"uncached {row['uncached_tokens_per_s']:.1f} tok/s ({row['speedup']:.1f}x)")  # fmt: skip
    report["core"] = core_score(source, root, plan)
    say(f"      CORE on the sample bundle: {report['core']}")
    lap("core")
    report["seconds"] = round(time.monotonic() - started, 1)
    report["checks"] = checks(report["training"], plan)
    (root / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (root / "report.md").write_text(markdown(report))
    say(f"[5/5] report: {root / 'report.json'}, {root / 'report.md'} ({report['seconds']:.0f} s)")
    return report


class Laps:
    """Seconds per part of the check, into ``report["parts_s"]`` (the GPU budget is 8 minutes in all)."""

    def __init__(self, report: dict[str, Any]):
        self.parts = report.setdefault("parts_s", {})
        self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.parts[name] = round(now - self.last, 1)
        self.last = now


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def environment(device: str) -> dict[str, Any]:
    """What the GPU path depends on, read here: versions, the device, DeepSpeed's accelerator and ops."""
    import platform

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed.__version__,
        "accelerator": get_accelerator().device_name(),
    }
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ParcaeError(
                f"check-gpu: torch {torch.__version__} sees no GPU (CUDA build: {torch.version.cuda or 'no'}); "
                "run it on a GPU node with a CUDA build of torch (docs/gpu.md), or --tiny for the CPU dry run"
            )
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible"
    ninja, nvcc = is_ninja_available(), bool(CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists())
    env["jit_compile"] = f"ninja {'yes' if ninja else 'no'}, nvcc {'at ' + str(CUDA_HOME) if nvcc else 'no'}"
    env["ops_installed"] = sorted(name for name, built in installed_ops.items() if built) or "none (JIT when needed)"
    # the ops a run of this pipeline may ask for: fused AdamW (adamw on a GPU) and CPU Adam (optimizer offload)
    env["ops_used"] = {
        "fused_adam (optimizer adamw on GPU)": _op_state("FusedAdamBuilder", installed_ops, ninja, nvcc),
        "cpu_adam (zero.offload_optimizer)": _op_state("CPUAdamBuilder", installed_ops, ninja, nvcc),
        "muon (the shipped configs)": "no op: the pipeline's own optimizer",
    }
    return env


def _op_state(builder_name: str, installed: dict[str, bool], ninja: bool, nvcc: bool) -> str:
    """An op's state: installed, or whether a JIT compile can run here (ninja; on a GPU also nvcc)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    builder_class = accelerator.get_op_builder(builder_name)
    if builder_class is None:
        return "not offered by this accelerator"
    builder = builder_class()
    if installed.get(builder.name):
        return "installed"
    needs = {"ninja": ninja, "nvcc": nvcc or accelerator.device_name() == "cpu"}  # a CPU op needs gcc only
    missing = [name for name, there in needs.items() if not there]
    if not builder.is_compatible(verbose=False):
        missing.append("incompatible: see `ds_report`")
    if not missing:
        return "JIT-compiles on first use (can here)"
    return f"JIT-compiles on first use: cannot here ({', '.join(missing)})"


def matmul_peak(device: str) -> float:
    import torch

    from pipeline.training.peak import gemm_peak

    if device == "cuda":
        return gemm_peak(torch.bfloat16, size=8192, seconds=2.0, device="cuda")
    return gemm_peak(torch.float32, size=512, seconds=0.3)


def prepare_data(root: Path, seq_len: int, sample_chars: int) -> dict[str, Any]:
    """The embedded corpus (standard-library docstrings) as a 2048-token SentencePiece (trained on
    ``sample_chars`` of it) and local shards."""
    from data_prep.corpus import BUILTIN, CorpusSpec, Problems, iter_documents
    from data_prep.shards import ShardSettings, build_shards
    from data_prep.tokenizer import TokenizerSettings, train_tokenizer

    documents = iter_documents(CorpusSpec((BUILTIN,)), Problems())
    train_tokenizer(
        documents, TokenizerSettings(vocab_size=2048, max_sample_chars=sample_chars), root / "tokenizer" / "corpus"
    )
    tokenizer = root / "tokenizer" / "corpus.model"
    settings = ShardSettings(seq_len=seq_len, shard_bytes=4_000_000, val_fraction=0.02, packing="bos-aligned")
    summary = build_shards([BUILTIN], str(tokenizer), str(root / "shards"), settings, workers=0, progress=False)
    return {"tokenizer": tokenizer, "shards": root / "shards", "tokens": summary["train"]["tokens"]}


@dataclass
class Trained:
    """What one `parcae train` process left: its run directory and per-step records."""

    run_dir: Path
    records: dict[int, dict[str, Any]]
    memory: dict[str, Any] | None
    spec: Any  # the resolved job spec (for the memory plan)

    def speed(self) -> dict[str, float]:
        """Median tokens/s, MFU and HFU of the steps past the first third (compiles and warm-up)."""
        timed = [self.records[s] for s in sorted(self.records)[len(self.records) // 3 :]]
        return {key: statistics.median(r.get(key, math.nan) for r in timed) for key in ("tokens_per_s", "mfu", "hfu")}


def train(run_dir: Path, shape: Shape, overrides: list[str], resume_from: str | None = None) -> Trained:
    from pipeline.jobspec import load_spec

    sets = [*shape.overrides, *overrides, f"run_dir={run_dir}", f"training.total_steps={shape.steps}"]
    cmd = [sys.executable, "-m", "pipeline", "train", str(shape.spec), *[f"--set={s}" for s in sets]]
    cmd += ["--resume-from", resume_from] if resume_from else []
    log = run_dir.parent / f"{run_dir.name}{'-resume' if resume_from else ''}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ParcaeError(f"check-gpu: `parcae train` of {shape.name} exited {code}; its log: {log}\n{tail}")
    records: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record  # a resumed step replaces the first
    memory_file = run_dir / "memory" / "rank0.json"
    memory = json.loads(memory_file.read_text()) if memory_file.exists() else None
    return Trained(run_dir, records, memory, load_spec(str(shape.spec), sets).spec)


def fitting_micro_batch(shape: Shape, overrides: list[str], device: str) -> str:
    """The micro batch of the shape's spec with ``overrides``, halved until `parcae validate --memory`'s plan
    fits 90% of this device."""
    from pipeline.jobspec import load_spec
    from pipeline.training.memory import device_memory_here, plan_memory

    here = device_memory_here(device, 1)
    spec = load_spec(str(shape.spec), [*shape.overrides, *overrides]).spec
    micro = spec.training.micro_batch_size
    while here and micro > 1:
        trial = load_spec(str(shape.spec), [*shape.overrides, *overrides, f"training.micro_batch_size={micro}"]).spec
        if plan_memory(trial, device).peak_bytes <= 0.9 * here[0]:
            break
        micro //= 2
    return f"training.micro_batch_size={micro}"


def training_report(plan: Plan, bf16: Trained, fp32: Trained, resumed: Trained, large: Trained) -> dict[str, Any]:
    from pipeline.training.memory import plan_memory

    steps = sorted(bf16.records)
    losses = {s: bf16.records[s]["loss"] for s in steps}
    half = steps[len(steps) // 2 :]
    last = steps[-1]

    def memory(run: Trained) -> dict[str, Any]:
        planned = plan_memory(run.spec, plan.device).peak_bytes
        measured = run.memory["step_peak_bytes"] if run.memory else None
        return {
            "planned_gib": planned / 2**30,
            "measured_gib": measured / 2**30 if measured else None,
            "measured_over_planned": measured / planned if measured else None,
            "micro_batch": run.spec.training.micro_batch_size,
        }

    return {
        "shape": plan.main.name,
        "compiled": plan.compile,
        "steps": len(steps),
        **bf16.speed(),
        "loss_first": losses[steps[0]],
        "loss_last": losses[last],
        "loss_finite": all(math.isfinite(v) for v in losses.values()),
        "fp32_loss_last": fp32.records[last]["loss"],
        "bf16_fp32_mean_abs_diff": statistics.mean(abs(losses[s] - fp32.records[s]["loss"]) for s in half),
        "resume_step": last,
        "loss_before_resume": losses[last],
        "loss_after_resume": resumed.records[last]["loss"],
        "memory": {plan.main.name: memory(bf16), plan.large.name: memory(large)},
    }


def checks(training: dict[str, Any], plan: Plan) -> dict[str, bool]:
    first, last = training["loss_first"], training["loss_last"]
    before, after = training["loss_before_resume"], training["loss_after_resume"]
    return {
        "loss finite": training["loss_finite"],
        "loss falls": last < first,
        f"bf16 within {plan.bf16_tolerance} of fp32": training["bf16_fp32_mean_abs_diff"] <= plan.bf16_tolerance,
        "resume continues the run": abs(after - before) <= 1e-3 * max(1.0, abs(before)),
    }


def generation_speed(model: Any, plan: Plan) -> list[dict[str, Any]]:
    """Greedy tokens/s of the trained model (its newest checkpoint), KV-cached against uncached."""
    import torch

    model = model.to(plan.device).eval()
    prompt = torch.randint(0, 2048, (1, plan.prompt), generator=torch.Generator().manual_seed(0)).to(plan.device)
    rows = []
    for loops in (1, 4, 8):
        rates = {}
        for cached in (True, False):
            model.generate(prompt, 2, loops=loops, use_cache=cached)  # warm-up
            _sync(plan.device)
            start = time.perf_counter()
            model.generate(prompt, plan.new_tokens, loops=loops, use_cache=cached)
            _sync(plan.device)
            rates[cached] = plan.new_tokens / (time.perf_counter() - start)
        rows.append({"loops": loops, "cached_tokens_per_s": rates[True], "uncached_tokens_per_s": rates[False],
                     "speedup": rates[True] / rates[False]})  # fmt: skip
    return rows


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def core_score(source: Any, root: Path, plan: Plan) -> dict[str, float]:
    """CORE per loop count on the sample bundle (pipeline/evaluation/sample_bundle.py)."""
    import torch

    from pipeline.evaluation.sample_bundle import make_bundle
    from pipeline.jobs.downstream import run_downstream

    bundle = make_bundle(root / "bundle")
    written = run_downstream(
        source,
        source_arg=str(root / "bf16"),
        bundle=str(bundle),
        suites=["core"],
        loops=[1, 4, 8],
        max_per_task=None,
        seeds=None,
        tokenizer=None,
        out=str(root / "core"),
        tensorboard=None,
        endpoint_url=None,
        device=torch.device(plan.device),
    )
    assert written is not None  # rank 0
    return {f"T={r['loops']}": round(r["core"], 4) for r in written.report["results"] if "core" in r}


def _speed_line(run: Trained) -> str:
    speed = run.speed()
    first, last = run.records[min(run.records)]["loss"], run.records[max(run.records)]["loss"]
    return f"{speed['tokens_per_s']:,.0f} tokens/s, MFU {speed['mfu']:.3f}; loss {first:.3f} -> {last:.3f}"


def markdown(report: dict[str, Any]) -> str:
    env, t = report["environment"], report["training"]
    lines = [
        f"GPU acceptance (`parcae check-gpu{' --tiny' if report['tiny'] else ''}`): {env.get('gpu', 'CPU')}; "
        f"torch {env['torch']}, CUDA {env['cuda']}, DeepSpeed {env['deepspeed']}; sequence {report['seq_len']}; "
        f"{report['seconds']:.0f} s in all ({', '.join(f'{k} {v:.0f} s' for k, v in report['parts_s'].items())}).",
        "",
        "| measured | value |",
        "|---|---|",
        f"| matmul peak (measured) | {report['matmul_peak_flops'] / 1e12:.1f} TFLOP/s |",
        f"| {t['shape']} bf16-mixed{', compiled' if t['compiled'] else ''}: tokens/s | {t['tokens_per_s']:,.0f} |",
        f"| MFU / HFU (against the measured peak) | {t['mfu']:.3f} / {t['hfu']:.3f} |",
        f"| loss, step 1 -> {t['steps']} | {t['loss_first']:.3f} -> {t['loss_last']:.3f} |",
        f"| bf16 against fp32: mean abs loss difference, second half | {t['bf16_fp32_mean_abs_diff']:.4f} |",
        f"| step {t['resume_step']} loss before / after a resume | {t['loss_before_resume']:.5f} / "
        f"{t['loss_after_resume']:.5f} |",
    ]
    for shape, m in t["memory"].items():
        measured = f"{m['measured_gib']:.2f} GiB" if m["measured_gib"] else "not measured"
        ratio = f" ({m['measured_over_planned']:.2f}x)" if m["measured_over_planned"] else ""
        lines.append(f"| {shape} peak memory, micro batch {m['micro_batch']}: measured / planned | "
                     f"{measured} / {m['planned_gib']:.2f} GiB{ratio} |")  # fmt: skip
    for row in report["generation"]:
        lines.append(f"| generation T={row['loops']}: cached / uncached tokens/s | {row['cached_tokens_per_s']:.1f}"
                     f" / {row['uncached_tokens_per_s']:.1f} ({row['speedup']:.1f}x) |")  # fmt: skip
    lines.append(f"| CORE, sample bundle | {', '.join(f'{k} {v:.3f}' for k, v in report['core'].items())} |")
    lines += [
        "",
        "Checks: " + ", ".join(f"{name}: {'ok' if ok else 'FAILED'}" for name, ok in report["checks"].items()),
    ]
    return "\n".join(lines) + "\n"
