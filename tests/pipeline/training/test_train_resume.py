"""`parcae train` on 2 CPU ranks (ZeRO-3, gloo): a SIGKILLed run resumes to the same per-step losses as an
uninterrupted one; SIGUSR1 checkpoints and exits with the requeue code; the next start resumes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from parcae_errors import REQUEUE_EXIT_CODE
from tests.conftest import (
    REFERENCE_STEPS,
    parcae_in_process,
    start_run,
    step_losses,
    train_cmd,
    wait_for_step,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


STEPS = REFERENCE_STEPS


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    return tiny_shards


@pytest.fixture(scope="module")
def expected(reference_losses) -> dict[int, float]:
    return reference_losses


def test_killed_run_resumes_to_the_same_losses(tmp_path, shards, expected):
    steps = STEPS

    run_dir = tmp_path / "killed"
    proc = start_run(train_cmd(shards, run_dir, steps), tmp_path / "killed.log")
    wait_for_step(run_dir, proc, 12)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step-00000010"
    resumed = start_run(train_cmd(shards, run_dir, steps), tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resuming at step 10" in (tmp_path / "resumed.log").read_text()
    after = step_losses(run_dir)
    for step in range(11, steps + 1):
        assert after[step] == expected[step], (step, after[step], expected[step])
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == ["step-00000020", "step-00000024"]  # keep_last 2
    # the same run dir with another model: refused by name before DeepSpeed reads the checkpoint
    other = start_run(train_cmd(shards, run_dir, STEPS + 5, "model.injection=concat"), tmp_path / "other.log")
    assert other.wait(timeout=300) != 0
    log = (tmp_path / "other.log").read_text()
    assert "parameter layout differs" in log and "Traceback" not in log, log[-3000:]


def test_checkpoints_on_s3_resume_to_the_same_losses(tmp_path, shards, expected, s3_server):
    """checkpoint.dir on the S3 endpoint: staged, uploaded by the rank that wrote each file, marked; a
    SIGKILLed run downloads the newest one and continues with the uninterrupted run's losses."""
    bucket = s3_server.new_bucket("ckpt")
    url = f"s3://{bucket}/runs/x"
    extra = (f"checkpoint.dir={url}", f"storage.endpoint_url={s3_server.endpoint}")
    run_dir = tmp_path / "killed"
    proc = start_run(train_cmd(shards, run_dir, STEPS, *extra), tmp_path / "killed.log")
    wait_for_step(run_dir, proc, 12)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    client = s3_server.client()

    def keys() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="runs/x/")
        return sorted(o["Key"][len("runs/x/") :] for page in pages for o in page.get("Contents", []))

    latest = client.get_object(Bucket=bucket, Key="runs/x/LATEST")["Body"].read().decode().strip()
    assert latest == "step-00000010"
    names = [k for k in keys() if k.startswith("step-00000010/")]
    assert "step-00000010/spec.yaml" in names
    assert sum("zero_pp_rank_0_" in k for k in names) >= 1 and sum("zero_pp_rank_1_" in k for k in names) >= 1
    resumed = start_run(train_cmd(shards, run_dir, STEPS, *extra), tmp_path / "resumed.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resuming at step 10" in (tmp_path / "resumed.log").read_text()
    after = step_losses(run_dir)
    for step in range(11, STEPS + 1):
        assert after[step] == expected[step], (step, after[step], expected[step])
    assert sorted({k.split("/")[0] for k in keys() if k.startswith("step-")}) == ["step-00000020", "step-00000024"]
    staged = run_dir / "checkpoint-staging"
    assert not [p for p in staged.glob("step-*/**/*") if p.is_file()]  # uploaded copies are not kept
    # every command reaches the endpoint the same way: --endpoint-url, else the run's storage.endpoint_url,
    # never AWS's public one (no AWS_ENDPOINT_URL in the environment here); --tag works on a run directory too
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    flag = ["--endpoint-url", s3_server.endpoint]
    one = ["--loops", "1", "--max-batches", "1", "--tensorboard", "none"]
    commands = {
        "export": ["export", url, "--out", str(tmp_path / "model.safetensors"), *flag],
        "eval": ["eval", url, "--tag", "step-00000020", *one, "--data", f"{shards}/val", *flag],
        "eval run": ["eval", str(run_dir), "--tag", "step-00000020", *one, "--out", str(tmp_path / "e")],
        "generate": ["generate", str(run_dir), "--tag", "step-00000020", "--prompt", "The", "--json"],
    }
    for name, args in commands.items():
        done = parcae_in_process(*args, env=env)
        assert done.returncode == 0, (name, done.stderr[-2000:])
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["step"] == 20


def test_sigusr1_checkpoints_exits_for_requeue_and_resumes(tmp_path, shards):
    run_dir = tmp_path / "preempted"
    proc = start_run(train_cmd(shards, run_dir, 200), tmp_path / "first.log")
    wait_for_step(run_dir, proc, 3)
    os.kill(proc.pid, signal.SIGUSR1)  # what Slurm's --signal=B:USR1 sends to the batch step
    assert proc.wait(timeout=300) == REQUEUE_EXIT_CODE, (tmp_path / "first.log").read_text()[-3000:]
    assert " ERROR " not in (tmp_path / "first.log").read_text()  # a normal preemption is not an error
    stopped_at = max(step_losses(run_dir))
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step-{stopped_at:08d}"
    again = start_run(train_cmd(shards, run_dir, 200), tmp_path / "second.log")
    wait_for_step(run_dir, again, stopped_at + 1)
    os.killpg(again.pid, signal.SIGKILL)
    again.wait(timeout=60)
    assert f"resuming at step {stopped_at}" in (tmp_path / "second.log").read_text()


def test_export_gives_the_trained_model(tmp_path, shards, reference_run):
    """The reference run's checkpoints (a copy) exported: the weights give the validation loss the run logged
    at its last step; the run directory as a Hugging Face model. (This test trained a 10-step run of its own.)"""
    import itertools
    import shutil

    import torch

    from data_prep.storage import S3Options
    from model import load_pretrained
    from pipeline.data.loader import rows_loader

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    out = tmp_path / "model.safetensors"

    def export(checkpoints: Path, out: Path = out) -> subprocess.CompletedProcess:
        return parcae_in_process("export", str(checkpoints), "--out", str(out))

    result = export(run_dir / "checkpoints")
    assert result.returncode == 0, result.stderr[-2000:]
    model = load_pretrained(None, out)
    # The exported weights reproduce the validation loss the run logged at its last step (h_0 = 0, 4 loops).
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in logged if "val_loss_loops_4" in r][-1]["val_loss_loops_4"]
    total = count = 0.0
    for rank in range(2):
        loader = rows_loader(str(shards / "val"), S3Options(), rank=rank, world_size=2, batch_size=8, seq_len=32)
        n = min(loader.batches_per_epoch(0), 8)
        for batch in itertools.islice(iter(loader), n):
            with torch.no_grad():
                loss = model(batch[:, :-1], batch[:, 1:], loops=4, h0=torch.zeros(8, 32, model.cfg.d_model))
            total += float(loss) * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    assert abs(total / count - val) < 1e-4
    missing = export(tmp_path / "nowhere", tmp_path / "other.safetensors")
    assert missing.returncode == 1 and "nowhere: no such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    # the run directory as a Hugging Face model: the command checks transformers' logits against ours
    hf = parcae_in_process("export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert hf.returncode == 0 and "transformers loads it" in hf.stdout, hf.stderr[-2000:]


def run_variant(tmp_path, shards, name, steps, extra, env=None):
    run_dir = tmp_path / name
    cmd = train_cmd(shards, run_dir, steps) + [f"--set={o}" for o in extra]
    proc = start_run(cmd, tmp_path / f"{name}.log", env)
    assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_accumulation_and_stage2(tmp_path, shards):
    records = run_variant(tmp_path, shards, "accum", 30, ["training.gradient_accumulation_steps=2", "zero.stage=2"])
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert steps[-1]["tokens_seen"] == 30 * 2 * 8 * 2 * 32  # steps x accumulation x micro x ranks x seq_len
    assert sum(r["loss"] for r in steps[-5:]) / 5 < sum(r["loss"] for r in steps[:5]) / 5 - 0.5


def test_spike_guard_skips_and_replaces_micro_batches(tmp_path, shards):
    # A flat loss (tiny lr) and a strict guard: about half the micro-batches count as spikes after the warm-up.
    records = run_variant(tmp_path, shards, "spikes", 26, ["optimizer.lr=1e-7", "training.spike_zscore=0.01"])
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 27))  # every step still gets its micro-batches
    assert steps[-1]["spikes_skipped"] > 0
    assert all(r["loss"] <= max(x["loss"] for x in steps[:20]) for r in steps[20:])


def test_muon_with_auxiliary_adamw(tmp_path, shards):
    records = run_variant(
        tmp_path, shards, "muon", 12, ["optimizer.name=muon", "optimizer.lr=0.02", "optimizer.adam_lr=0.003"]
    )
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 12 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_deepspeeds_own_muon_trains(tmp_path, shards):
    """optimizer.name: muon-deepspeed needs DeepSpeed's Muon module, which the other optimizers replace by a
    stand-in to save its import (`pipeline.training.engine`): the real one is used here. One rank, 4 steps.
    DeepSpeed's Muon wraps its Newton-Schulz iteration in torch.compile: eager here (TORCH_COMPILE_DISABLE),
    since compiling DeepSpeed's own code from a cold cache took 2 of this test's 2 minutes in CI. Its Adam half
    is torch's AdamW on CPU (`ds_config`): DeepSpeed's FusedAdam built its C++ op at every start, 45 s of 50."""
    extra = ["optimizer.name=muon-deepspeed", "optimizer.lr=0.02", "optimizer.adam_lr=0.003"]
    extra += ["cluster.procs_per_node=1", "logging.log_interval=1"]
    records = run_variant(tmp_path, shards, "ds-muon", 4, extra, {"TORCH_COMPILE_DISABLE": "1"})
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16"])
def test_bf16_precisions_train_and_evaluate_under_zero3(tmp_path, shards, precision):
    """The GPU paths, run on CPU: the reference's bf16 mixed precision (fp32 weights under DeepSpeed's
    torch_autocast) and DeepSpeed's bf16 mode, through training, periodic evaluation and a checkpoint."""
    measured = [f"training.precision={precision}", "logging.peak_flops_per_device=null"]  # the CPU's own peak
    records = run_variant(tmp_path, shards, precision, 10, measured)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss_loops_4" in r]
    assert len(steps) == 10 and all(math.isfinite(r["loss"]) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3 and evals and math.isfinite(evals[-1]["val_loss_loops_4"])
    log = (tmp_path / f"{precision}.log").read_text()
    assert f"ZeRO stage 3, {precision}" in log
    # MFU on CPU is against the measured bf16 matmul peak
    assert "CPU: bfloat16 matmul peak measured at" in log and 0 < steps[-1]["mfu"] < 2
    assert steps[-1]["hfu"] > steps[-1]["mfu"]  # per-loop checkpointing's recomputation: in HFU only
    # the checkpoint round trip: a second start resumes from step 10 and goes on training
    records = run_variant(tmp_path, shards, precision, 12, [f"training.precision={precision}"])
    assert "resuming at step 10" in (tmp_path / f"{precision}.log").read_text()
    resumed = [r for r in records if "loss" in r and r["step"] > 10]
    assert [r["step"] for r in resumed] == [11, 12] and all(math.isfinite(r["loss"]) for r in resumed)


def test_continued_pretraining_starts_from_the_given_weights(tmp_path, shards):
    """checkpoint.init_from: the step-1 loss of a run started from weights (a released-format directory)
    is the loss those weights give, computed here in plain PyTorch, on the same rows with the same loop
    counts and h_0 draws; the run's own checkpoints then take precedence; another model is refused."""
    import torch

    from data_prep.storage import S3Options
    from model import ParcaeConfig, build_model
    from pipeline.data.mixture import train_loader
    from pipeline.jobspec import load_spec
    from pipeline.training.step import DepthSampler
    from tests.model.reference import write_released
    from tests.model.test_parcae import randomize

    # two core layers: with demo-tiny's one, the reference would gate value embeddings on other layers than
    # it holds their tables (a released directory of that shape is refused; tests/model/test_released.py)
    base = train_cmd(shards, tmp_path / "run", 6, "model.n_core=2")
    spec = load_spec(base[4], [a.removeprefix("--set=") for a in base[5:]]).spec
    cfg = spec.model.build()
    weights = randomize(build_model(cfg, seed=7), seed=8)
    released = write_released(tmp_path / "released", weights)
    proc = start_run([*base, f"--set=checkpoint.init_from={released}"], tmp_path / "init.log")
    assert proc.wait(timeout=600) == 0, (tmp_path / "init.log").read_text()[-3000:]
    expected = 0.0
    for rank in range(2):
        ranks = {"rank": rank, "world_size": 2}
        loader = train_loader(spec.data, S3Options(), micro_batch_size=8, seed=spec.training.seed, **ranks)
        batch = next(iter(loader))
        sampler = DepthSampler.for_model(cfg, seed=spec.training.seed, global_batch=16)
        n_nograd, n_grad, _ = sampler.loop_counts(batch)
        with torch.no_grad():
            loss = weights(
                batch.tokens[:, :-1],
                batch.tokens[:, 1:],
                loops=(n_nograd, n_grad),
                generator=sampler.h0_generators(batch, torch.device("cpu")),
            )
        expected += float(loss) / 2
    assert step_losses(tmp_path / "run")[1] == pytest.approx(expected, abs=1e-5)
    again = start_run(
        [*base, f"--set=checkpoint.init_from={released}", "--set=training.total_steps=8"], tmp_path / "again.log"
    )
    assert again.wait(timeout=600) == 0 and "resuming at step 6" in (tmp_path / "again.log").read_text()
    other = write_released(
        tmp_path / "other", build_model(ParcaeConfig(**{**cfg.__dict__, "d_model": 128, "n_head": 4}))
    )
    refused = start_run(
        [*train_cmd(shards, tmp_path / "fresh", 2, "model.n_core=2"), f"--set=checkpoint.init_from={other}"],
        tmp_path / "other.log",
    )
    assert refused.wait(timeout=300) == 1
    log = (tmp_path / "other.log").read_text()
    assert "holds another model than this spec's model section: d_model: 128" in log and "Traceback" not in log


def test_downstream_evaluation_during_training_matches_parcae_eval(tmp_path, shards, tokenizer):
    """eval.downstream: CORE and Core-Extended at the spec's loop counts, scored by the 2 ranks through the
    ZeRO-3 engine, logged to metrics.jsonl and TensorBoard; at the last step they equal what `parcae eval`
    scores from the run's last checkpoint on one rank. The same run validates with the paper's protocol
    (like-init h_0 seeds over whole documents, every 5 steps), once a run of its own
    (test_periodic_evaluation_with_the_papers_protocol)."""
    from tests.icl_bundles import make_bundle
    from tests.pipeline.jobs.test_eval import event_scalars

    bundle = make_bundle(tmp_path / "eval_bundle")
    extra = [
        f"eval.downstream.bundle={bundle}",
        "eval.downstream.tasks=[core, core-extended]",
        "eval.downstream.interval_steps=5",
        "eval.downstream.max_per_task=8",
        f"tokenizer.path={tokenizer}",
        "logging.sample_prompts=[The history of, one two three]",
        "logging.sample_interval=5",
        "logging.sample_tokens=8",
        *("eval.protocol=paper", "eval.h0_seeds=2", "eval.documents=40", "eval.interval_steps=5"),
    ]
    records = run_variant(tmp_path, shards, "downstream", 10, extra)
    evals = [r for r in records if "val_loss_loops_4" in r]
    assert [r["step"] for r in evals] == [5, 10] and evals[-1]["val_loss_loops_4_std"] > 0
    assert math.isfinite(evals[-1]["val_loss_loops_1"])
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [5, 10] and samples[-1]["samples"][1]["prompt"] == "one two three"
    assert "sample at step 10: The history of|" in (tmp_path / "downstream.log").read_text()
    # the greedy continuation the ranks wrote through the ZeRO-3 engine is what parcae generate gives
    generate = ["generate", str(tmp_path / "downstream"), "--prompt", "The history of", "--json"]
    done = parcae_in_process(*generate, "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    generated = json.loads(done.stdout)
    assert generated["completion"] == samples[-1]["samples"][0]["continuation"]
    assert generated["prompt_start"]["id"] == 3  # the tiny shards are concat-packed: documents follow <eos>
    scored = [r for r in records if "downstream/core_loops_4" in r]
    assert [r["step"] for r in scored] == [5, 10]
    last = scored[-1]
    assert {"downstream/core_extended_loops_1", "downstream/centered/counting_long_loops_4"} <= last.keys()
    assert last["downstream/seconds"] > 0
    out = tmp_path / "eval"
    cmd = ["eval", str(tmp_path / "downstream"), "--tasks", "core", "core-extended"]
    cmd += ["--bundle", str(bundle), "--max-per-task", "8", "--loops", "1", "4", "--out", str(out)]
    done = parcae_in_process(*cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "downstream.json").read_text())
    assert report["step"] == 10
    # concat shards hold no <bos>: prompts start with <eos> as in training, said once and recorded
    assert report["prompt_start"]["id"] == 3 and "no <bos>" in report["prompt_start"]["why"]
    assert done.stderr.count("prompts start with token 3, not <bos>") == 1
    for result in report["results"]:
        suffix = f"_loops_{result['loops']}"
        assert last[f"downstream/core{suffix}"] == pytest.approx(result["core"], abs=1e-9)
        assert last[f"downstream/core_extended{suffix}"] == pytest.approx(result["core_extended"], abs=1e-9)
    scalars, _ = event_scalars(tmp_path / "downstream" / "tensorboard")
    assert [s for s, _ in scalars["downstream/core_loops_1"]] == [5, 10, 10]  # the run's, then parcae eval's
    assert "scaling/val_loss_T4" in scalars  # beside the validation loss
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "downstream" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert any(tag.startswith("samples/prompt_1") for tag in events.Tags()["tensors"]), events.Tags()


def assert_no_compile_after_warm_up(log: str) -> None:
    """dynamo's recompile log (TORCH_LOGS=recompiles) shows rank 0's variants compiled before the warm-up's
    message and none after it (rank 1's lines may trail rank 0's message)."""
    warmed = log.index("torch.compile: 3 units (blocks outside the loop, the loop body) compiled for every grad mode")
    rank0 = [line for line in log[warmed:].splitlines() if line.startswith("[rank0]:")]
    assert "[rank0]:" in log[:warmed] and "Recompiling function" in log[:warmed]
    assert not any("Recompiling function" in line for line in rank0), rank0


# The compiled runs train on one rank accumulating two micro batches (the 2-rank global batch): each rank
# compiles the units itself, so a second rank doubles the cold compile of these tests; compiled training on
# 2 ZeRO-3 ranks is test_zero3_parity.py's block+compile case, gradient by gradient. (A fresh 1-rank run reads
# its rows in another order than a fresh 2-rank one, so its losses are compared with an eager 1-rank run.)
COMPILED_ONE_RANK = ("training.compile=on", "cluster.procs_per_node=1", "training.gradient_accumulation_steps=2")


@pytest.mark.heavy
def test_compiled_training_resumes_and_exports(tmp_path, shards):
    """training.compile on under ZeRO-3 (one rank, the 2-rank global batch) in bf16 mixed precision, the
    default on a GPU: every variant compiles before the first step (dynamo's own recompile log shows none
    after, through the steps, an evaluation and per-row loop counts), the losses are the same run's eager
    ones to 1e-3 (4e-5 apart when measured), a second start resumes from the checkpoint, and the export
    loads. Under autocast the coda's input is bf16: the warm-up compiles that variant too. Two core layers, as
    every shipped config has: a core layer with value embeddings reads the token ids, whose layout the loop
    body's variants then depend on (it compiled 4 more variants mid-run before the ids were made contiguous).
    (This test took in test_compiled_bf16_mixed_compiles_nothing_after_the_warm_up, which compiled the same
    run cold a second time, in fp32; fp32 compiled against eager to round-off is test_compile.py's and
    test_zero3_parity.py's.)"""
    run_dir = tmp_path / "run"
    bf16 = (*COMPILED_ONE_RANK, "training.precision=bf16-mixed", "model.n_core=2")
    first = start_run(train_cmd(shards, run_dir, 6, *bf16, "eval.interval_steps=3"), tmp_path / "first.log",
                      env={"TORCH_LOGS": "recompiles"})  # fmt: skip
    assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()[-3000:]
    log = (tmp_path / "first.log").read_text()
    assert_no_compile_after_warm_up(log)
    assert "val_loss" in (run_dir / "metrics.jsonl").read_text()
    again = start_run(train_cmd(shards, run_dir, 8, *bf16), tmp_path / "again.log")
    assert again.wait(timeout=900) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert "resuming at step 6" in (tmp_path / "again.log").read_text()
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    eager = start_run(train_cmd(shards, tmp_path / "eager", 8, *bf16[1:]), tmp_path / "eager.log")
    assert eager.wait(timeout=600) == 0, (tmp_path / "eager.log").read_text()[-3000:]
    assert losses == pytest.approx(step_losses(tmp_path / "eager"), rel=1e-3)
    out = tmp_path / "model.safetensors"
    done = parcae_in_process("export", str(run_dir), "--out", str(out))
    assert done.returncode == 0 and out.stat().st_size > 0, done.stderr[-2000:]


def test_a_deleted_newest_checkpoint_is_never_restarted_over(tmp_path, shards, expected, reference_run):
    """The newest checkpoint deleted by hand: `train` refuses, naming the intact one and the command that
    resumes from it, and writes nothing; that command continues to the uninterrupted run's losses, with
    the newer step directories moved aside, never written over; `--restart` starts at step 0 with every
    checkpoint moved aside into superseded-<time>/ (nothing deleted). On a copy of the session's reference
    run (this test trained 15 steps of its own before)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000024")
    before = sorted(p.name for p in checkpoints.iterdir())
    refused = start_run(train_cmd(shards, run_dir, STEPS), tmp_path / "refused.log")
    assert refused.wait(timeout=300) == 1
    log = (tmp_path / "refused.log").read_text()
    assert "names 'step-00000024', which is missing or incomplete" in log and "Traceback" not in log, log[-3000:]
    assert "resume from it with `parcae train SPEC --resume-from step-00000020`" in log and "--restart" in log
    assert sorted(p.name for p in checkpoints.iterdir()) == before  # nothing written, nothing moved
    resumed = start_run(train_cmd(shards, run_dir, STEPS) + ["--resume-from", "step-00000020"], tmp_path / "r.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "r.log").read_text()[-3000:]
    after = step_losses(run_dir)
    assert all(after[step] == expected[step] for step in range(21, STEPS + 1))
    restarted = start_run(train_cmd(shards, run_dir, 2, "checkpoint.keep_last=3") + ["--restart"], tmp_path / "s.log")
    assert restarted.wait(timeout=600) == 0, (tmp_path / "s.log").read_text()[-3000:]
    aside = [p for p in checkpoints.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and "moved step-00000020, step-00000024, LATEST aside" in (tmp_path / "s.log").read_text()
    assert sorted(p.name for p in aside[0].iterdir()) == ["LATEST", "step-00000020", "step-00000024"]
    assert [p.name for p in checkpoints.glob("step-*")] == ["step-00000002"]  # its own final checkpoint only
    assert "resuming" not in (tmp_path / "s.log").read_text()
