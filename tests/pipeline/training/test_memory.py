"""The memory plan (`parcae validate --memory`): its arithmetic, its verdicts and advice, and a real ZeRO-3
run's measured peak beside it (the full comparison is bench/memory_plan.py's)."""

from __future__ import annotations

import json
import subprocess

import pytest

from parcae_errors import ParcaeError
from pipeline.jobspec import load_spec
from pipeline.training.memory import knobs, parse_size, plan_memory
from pipeline.training.memory_trace import live_peaks, peaks, records
from tests.conftest import CONFIGS, REPO, parcae_in_process, train_cmd

MiB = 2**20


def plan(*overrides: str, config: str = "demo-tiny.yaml", device: str = "cpu"):
    spec = load_spec(CONFIGS / config, ["tokenizer.path=x", *overrides]).spec
    return plan_memory(spec, device), spec


def test_zero3_partitions_shrink_with_the_world_size_and_buckets_come_from_the_spec():
    one, _ = plan("cluster.procs_per_node=1", "zero.reduce_bucket_size=1000000")
    two, _ = plan("cluster.procs_per_node=2", "zero.reduce_bucket_size=1000000")
    for part in ("parameters (this rank's partition)", "gradient partition (fp32)", "optimizer state"):
        assert two.static[part] == pytest.approx(one.static[part] / 2, rel=0.01), part
    assert one.static["reduce bucket (zero.reduce_bucket_size)"] == 4_000_000  # fp32 values
    assert "parameters kept whole (below the persistence threshold)" in two.static
    gathered = [p.phases["end of forward"]["gathered parameters"] for p in (one, two)]
    assert gathered[0] == 0 < gathered[1]  # one rank's partition is the whole parameter


def test_activations_grow_by_one_hidden_state_per_loop_with_checkpointing_and_by_the_core_without():
    unit = 8 * 64 * 64 * 4  # micro batch x seq_len x d_model, fp32
    depth = {k: plan(f"model.mean_backprop_depth={k}", "model.mean_recurrence=8")[0] for k in (1, 2, 4)}
    saved = {k: p.phases["end of forward"]["saved activations"] for k, p in depth.items()}
    assert saved[2] - saved[1] == unit and saved[4] - saved[2] == 2 * unit
    off, _ = plan("model.mean_backprop_depth=4", "model.mean_recurrence=8", "model.activation_checkpointing=false")
    # one core block (20 saved states, 21 with its value embedding) + its input, per loop instead of 1
    assert off.phases["end of forward"]["saved activations"] - saved[4] > 4 * 19 * unit


def test_the_loss_is_chunked_so_logits_stop_growing_with_the_rows():
    small, _ = plan("model.vocab_size=32768", "data.seq_len=64", "training.micro_batch_size=8")  # 512 rows: 1 chunk
    large, _ = plan("model.vocab_size=32768", "data.seq_len=128", "training.micro_batch_size=64")  # 8192 rows
    head_grads = {rows: rows * 64 * 4 + 32768 * 64 * 4 for rows in (512, 8192)}  # final states' and the head's
    assert large.phases["end of forward"]["logits and loss"] == 1024 * 32768 * 4 + head_grads[8192]  # one chunk
    assert small.phases["end of forward"]["logits and loss"] == 512 * 32768 * 4 + head_grads[512]
    assert large.phases["head backward"]["logits and loss"] == head_grads[8192]


def test_bf16_halves_parameters_and_adds_fp32_master_weights():
    fp32, _ = plan("training.precision=fp32", device="cuda")
    bf16, _ = plan("training.precision=bf16", device="cuda")
    key = "parameters (this rank's partition)"
    assert bf16.static[key] * 2 == fp32.static[key]
    assert bf16.static["fp32 master weights"] == fp32.static["fp32 master weights"] == fp32.static[key]


def test_advice_is_each_change_the_spec_accepts_planned_again():
    shipped, spec = plan(config="parcae-1.3b.yaml", device="cuda")
    assert 20 * 2**30 < shipped.peak_bytes < 80 * 2**30  # the shipped 1.3B fits an 80 GiB device
    assert knobs(shipped, spec, 80 * 2**30) == []
    advice = knobs(shipped, spec, 30 * 2**30)
    assert advice[0].startswith("training.micro_batch_size: 4 with gradient_accumulation_steps: 2")
    assert advice[0].endswith("fits")
    assert not any("offload" in a for a in advice)  # the reference's Muon cannot run with its state offloaded
    adamw, spec = plan("optimizer.name=adamw", config="parcae-1.3b.yaml", device="cuda")
    assert any(a.startswith("zero.offload_optimizer: true") for a in knobs(adamw, spec, 30 * 2**30))
    offloaded, _ = plan("optimizer.name=adamw", "zero.offload_optimizer=true", config="parcae-1.3b.yaml", device="cuda")
    assert "optimizer state" in offloaded.host and "optimizer state" not in offloaded.static
    assert offloaded.peak_bytes < adamw.peak_bytes
    on_cpu, _ = plan("zero.offload_optimizer=true")  # CPU ranks: offloading moves nothing out of their memory
    assert not on_cpu.host and "optimizer state" in on_cpu.static


@pytest.mark.parametrize(
    ("text", "value"), [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("24g", 24 * 10**9), ("1.5TiB", int(1.5 * 2**40))]
)
def test_sizes(text, value):
    assert parse_size(text, "--device-memory") == value


@pytest.mark.parametrize("text", ["eighty", "80XB", "-1GB", "0"])
def test_bad_sizes_name_the_option(text):
    with pytest.raises(ParcaeError, match="--device-memory"):
        parse_size(text, "--device-memory")


def run(*args: str) -> subprocess.CompletedProcess:
    return parcae_in_process(*args)


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_validate_memory_says_whether_it_fits_and_exits_1_when_not():
    spec = str(CONFIGS / "parcae-1.3b.yaml")
    fits = run("validate", spec, "--memory", "--device-memory", "80GiB")
    assert fits.returncode == 0, fits.stderr
    assert "memory plan per rank: 32 rank(s), ZeRO stage 3, bf16-mixed" in fits.stdout
    assert "fits 80 GiB of device memory" in fits.stdout and "recurrence backward" in fits.stdout
    small = run("validate", spec, "--memory", "--device-memory", "16GiB")
    assert small.returncode == 1
    assert "does NOT fit 16 GiB" in small.stdout
    assert "- training.micro_batch_size: 2 with gradient_accumulation_steps: 4" in small.stdout
    assert "does not fit the device" in small.stderr and "Traceback" not in small.stderr
    as_json = run("validate", spec, "--memory", "--device-memory", "80GiB", "--json")
    report = json.loads(as_json.stdout[as_json.stdout.index('{\n  "world_size"') :])
    assert report["fits"] and report["peak_phase"] == "recurrence backward" and report["zero_stage"] == 3
    bad = run("validate", spec, "--memory", "--device-memory", "eighty")
    assert bad.returncode == 2 and "--device-memory: a size like 80GB" in bad.stderr


@pytest.mark.slow
def test_a_zero3_run_measures_its_peak_near_the_plan(tmp_path, tiny_shards):
    """2 ranks, small buckets: each rank writes its measured peak, and the plan is near it: within the plan's
    15% target (bench/memory_plan.py holds the comparison at larger sizes). Measured 2026-12-07 over 14 runs,
    7 of them two at a time: peak 29.5-31.3 MiB against a plan of 29.1 (0.93-0.99). Before frees on gloo's
    threads were counted, 30.5-39.6 MiB by the threads' timing, once outside a 25% bound."""
    run_dir = tmp_path / "run"
    extra = ["logging.profile_memory_steps=2", "zero.reduce_bucket_size=200000", "zero.prefetch_bucket_size=200000",
             "model.d_model=128", "training.device=cpu", "eval.interval_steps=1000"]  # fmt: skip
    done = subprocess.run(train_cmd(tiny_shards, run_dir, 3, *extra), capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    measured = [json.loads((run_dir / "memory" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(m["steps"] == 2 and 0 < m["step_peak_bytes"] <= m["peak_bytes"] for m in measured)
    spec = load_spec(run_dir / "spec.yaml", []).spec
    planned = plan_memory(spec, "cpu").peak_bytes
    peak = max(m["step_peak_bytes"] for m in measured)
    assert 0.85 < planned / peak < 1.15, (planned / MiB, peak / MiB)
    assert "memory plan:" in done.stderr and "measured peak memory (rank 0)" in done.stderr


def test_a_block_freed_on_a_thread_the_profiler_does_not_see_stops_counting_when_its_address_is_reused():
    """A collective's worker thread (gloo's) can drop a tensor's last reference: the profiler records no free.
    Synthetic records first (time, bytes, address), then real ones: torch.profiler on this thread, the
    frees on another, as DeepSpeed's asynchronous reduce does them."""
    mib = 2**20
    synthetic = [(1, mib, 0xA), (2, mib, 0xB), (3, mib, 0xB), (4, -mib, 0xA), (5, 2 * mib, 0xC), (6, -mib, 0xD)]
    assert live_peaks(synthetic, [(5, 6)]) == {"peak_bytes": 3 * mib, "step_peak_bytes": 3 * mib}
    assert live_peaks(synthetic, [(1, 2)]) == {"peak_bytes": 3 * mib, "step_peak_bytes": 2 * mib}

    import threading

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for _ in range(8):
            box = [torch.ones(256 * 1024)]  # 1 MiB, freed on another thread
            drop = threading.Thread(target=box.clear)
            drop.start()
            drop.join()
    blocks = [(nbytes, address) for _, nbytes, address in records(profiler)[0] if abs(nbytes) == mib]
    assert len(blocks) == 8 and all(nbytes > 0 for nbytes, _ in blocks)  # no free recorded: another thread's
    # each address counted once: the allocator hands out a freed block's address again (how often is its
    # business: 8 addresses here would mean 8 MiB, as counting only the frees the profiler saw always said)
    reused = len({address for _, address in blocks})
    peak = peaks(profiler)["peak_bytes"]
    assert reused * mib <= peak < (reused + 1) * mib, (reused, peak / mib)
