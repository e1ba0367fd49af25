"""Every command's error paths, as a user meets them: the exit code, one message naming the field, file or
shard (and what would be accepted), no traceback, nothing partial left behind, no secret in any output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model import ParcaeConfig, build_model, save_reference
from model.weights import reference_state_dict
from tests.conftest import CONFIGS, REPO, parcae_cmd

TINY = CONFIGS / "demo-tiny.yaml"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})}
    return subprocess.run(
        [*parcae_cmd(), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, env=full_env
    )


def assert_one_clean_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == code, (result.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    assert result.stderr.count("error: ") == 1, result.stderr[-3000:]  # one message, once
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr[-3000:])


def partial_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".partial", ".tmp"))]


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    return tiny_shards


def tiny(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [f"data.train_url={shards / 'train'}", f"data.val_url={shards / 'val'}", "data.seq_len=32"]
    sets += [f"run_dir={run_dir}", "training.total_steps=4", "tokenizer.path=null", *extra]  # the shards' own
    return [str(TINY), *[f"--set={s}" for s in sets]]


def test_spec_files_that_are_not_utf8_or_repeat_a_key(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(TINY.read_bytes() + "\n# caf\xe9\n".encode("latin-1"))
    assert_one_clean_error(run("validate", str(latin)), 2, "not UTF-8", "save", str(latin))
    twice = tmp_path / "twice.yaml"
    twice.write_text(TINY.read_text() + "\nmodel:\n  d_model: 32\n")
    assert_one_clean_error(run("validate", str(twice)), 2, "key 'model' appears twice", "first at line")


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "model.mean_recurrence=100000000000000000000000",
            "model.mean_recurrence: Input should be less than or equal to 1024; accepted: 1 to 1024",
        ),
        ("eval.loop_counts=[1, 5000]", "eval.loop_counts.1: Input should be less than or equal to 1024"),
        ("optimizer.lr=.nan", "optimizer.lr: Input should be a finite number"),
        ("training.micro_batch_size=1e9", "training.micro_batch_size"),
        ("storage.endpoint_url=not-a-url", "storage.endpoint_url: must be an http:// or https:// URL"),
        ("data.num_workers=2", "data.num_workers: renamed: write data.prefetch_batches"),
    ],
)
def test_values_out_of_range_are_refused_with_the_range(override, needle):
    assert_one_clean_error(run("validate", str(TINY), "--set", override), 2, needle)


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_shards_of_a_larger_vocabulary_are_refused_before_training(tmp_path, shards):
    """Shards of a 512-token tokenizer, a model of vocab 256: validate and train both refuse, by name, at once."""
    args = tiny(shards, tmp_path / "run", "model.vocab_size=256")
    needle = "was tokenized with a 512-token vocabulary, larger than model.vocab_size 256"
    assert_one_clean_error(run("validate", *args), 2, "data.train_url", needle)
    result = run("train", *args, timeout=120)
    assert_one_clean_error(result, 2, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing started
    wrong_tokenizer = tiny(shards, tmp_path / "run", f"tokenizer.path={TINY}")
    assert_one_clean_error(run("validate", *wrong_tokenizer), 2, "was made with another tokenizer")
    wrong_kind = tiny(shards, tmp_path / "run", "tokenizer.kind=huggingface")
    needle = "was made with a sentencepiece tokenizer, but tokenizer.kind is huggingface"
    assert_one_clean_error(run("validate", *wrong_kind), 2, needle)


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_a_downstream_bundle_that_cannot_work_is_refused_before_training(tmp_path, shards, tokenizer):
    from tests.icl_bundles import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "core.yaml").write_text((bundle / "core.yaml").read_text().replace("schema", "ranking"))
    args = tiny(shards, tmp_path / "run", f"eval.downstream.bundle={bundle}", f"tokenizer.path={tokenizer}")
    needle = "eval.downstream.bundle: " + str(bundle / "core.yaml") + ": icl_tasks[1] (pets): icl_task_type 'ranking'"
    assert_one_clean_error(run("validate", *args), 2, needle)
    result = run("train", *args, timeout=120)
    assert_one_clean_error(result, 2, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing started
    extended = tiny(
        shards,
        tmp_path / "run",
        f"eval.downstream.bundle={bundle}",
        "eval.downstream.tasks=[core-extended]",
        f"tokenizer.path={tmp_path / 'no' / 'demo.model'}",
    )
    (bundle / "core_extended.yaml").unlink()
    assert_one_clean_error(run("validate", *extended), 2, "core_extended.yaml: no such file", "set tokenizer.path")


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_outputs_that_cannot_be_written_are_found_before_training(tmp_path, shards, s3_server):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    through_file = run("train", *tiny(shards, tmp_path / "run", f"checkpoint.dir={blocker}/ckpt"), timeout=120)
    assert_one_clean_error(through_file, 2, "checkpoint.dir:", str(blocker / "ckpt"), "cannot write")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    no_bucket = tiny(shards, tmp_path / "run2", "checkpoint.dir=s3://no-such-bucket/x")
    no_bucket.append(f"--set=storage.endpoint_url={s3_server.endpoint}")
    assert_one_clean_error(run("train", *no_bucket, env=env, timeout=120), 2, "checkpoint.dir: s3://no-such-bucket/x")
    run_through_file = run("train", *tiny(shards, blocker / "run"), timeout=120)
    assert_one_clean_error(run_through_file, 2, "run_dir:", "logging.tensorboard_dir:")


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_prep_of_inputs_that_hold_nothing(tmp_path, tokenizer):
    out = tmp_path / "out"
    missing = run(
        "prep", "shards", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tokenizer), "--out", str(out)
    )
    assert_one_clean_error(missing, 1, "nope.jsonl: no such file or directory")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nothing = run("prep", "shards", "--input", str(empty), "--tokenizer", str(tokenizer), "--out", str(out))
    assert_one_clean_error(nothing, 1, "no documents in the inputs", str(empty))
    assert not (out / "train" / "manifest.json").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    through = run("prep", "shards", "--input", str(empty), "--tokenizer", str(tokenizer), "--out", str(blocker / "o"))
    assert_one_clean_error(through, 1, str(blocker / "o"), "cannot write")


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_weights_written_atomically_where_they_can_be(tmp_path):
    cfg = ParcaeConfig(vocab_size=128, d_model=32, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=32)
    model = build_model(cfg)
    os.umask(0o022)
    path = save_reference(model, tmp_path / "w.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the group like any other output
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: w\nmodel: {vocab_size: 128, d_model: 32, n_head: 2, n_prelude: 1, n_core: 1, n_coda: 1, "
        "max_seq_len: 32}\ndata: {train_url: x, seq_len: 16}\ntraining: {micro_batch_size: 1, total_steps: 1}\n"
    )
    (tmp_path / "taken").mkdir()
    to_dir = run("import", str(path), "--spec", str(spec), "--out", str(tmp_path / "taken"))
    assert_one_clean_error(to_dir, 1, str(tmp_path / "taken"), "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    through = run("import", str(path), "--spec", str(spec), "--out", str(blocker / "w.safetensors"))
    assert_one_clean_error(through, 1, str(blocker / "w.safetensors"), "cannot write")
    assert partial_files(tmp_path) == []


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_secrets_stay_hidden_on_every_path(tmp_path, shards):
    password = "hunter2-very-secret"
    env = {"MINIO_PASSWORD": password, "AWS_SECRET_ACCESS_KEY": password + "-aws", "AWS_ACCESS_KEY_ID": "id"}
    url_spec = tiny(shards, tmp_path / "run", "storage.endpoint_url=http://user:${MINIO_PASSWORD}@127.0.0.1:9")
    url_spec[1:1] = ["--set=data.train_url=s3://bucket/train", "--set=storage.max_retries=0"]
    for command in ("validate", "train"):
        result = run(command, *url_spec, env=env, timeout=120)
        assert password not in result.stdout + result.stderr, (command, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
    as_url = tiny(shards, tmp_path / "run", "storage.endpoint_url=${AWS_SECRET_ACCESS_KEY}")
    result = run("validate", *as_url, env=env)
    assert_one_clean_error(result, 2, "storage.endpoint_url", "${AWS_SECRET_ACCESS_KEY}")
    assert password not in result.stdout + result.stderr
    secret_dir = tiny(shards, tmp_path / "${MINIO_PASSWORD}", "training.total_steps=2", "cluster.procs_per_node=1")
    result = run("train", *secret_dir, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert password not in result.stdout + result.stderr  # the checkpoint log lines name the run dir
    saved = (tmp_path / password / "spec.yaml").read_text()
    assert password not in saved and "${MINIO_PASSWORD}" in saved


def test_output_piped_into_a_closed_reader_is_quiet():
    done = subprocess.run(
        f"{' '.join(parcae_cmd())} schema | head -c 10", shell=True, capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0 and "Error" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_sweep_points_with_a_repeated_key(tmp_path):
    points = tmp_path / "points.yaml"
    points.write_text("- name: a\n  model.d_model: 64\n  model.d_model: 128\n")
    result = run("sweep", "run", str(TINY), "--points", str(points), "--dry-run")
    assert_one_clean_error(result, 1, f"--points {points}", "appears twice")


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_manifests_and_weights_that_are_not_what_they_claim(tmp_path, tiny_shards):
    broken = tmp_path / "train"
    broken.mkdir()
    manifest = json.loads((tiny_shards / "train" / "manifest.json").read_text())
    del manifest["shards"][1]["sha256"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = run("prep", "inspect", str(broken), "--verify")
    assert_one_clean_error(result, 1, "shards[1] lacks sha256")
    cfg = ParcaeConfig(vocab_size=128, d_model=32, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=32)
    reference = {k: v.contiguous() for k, v in reference_state_dict(build_model(cfg)).items()}
    weights = {k: v.to(torch.int64) if "ln_f" in k else v for k, v in reference.items()}
    save_file(weights, str(tmp_path / "int.safetensors"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: w\nmodel: {vocab_size: 128, d_model: 32, n_head: 2, n_prelude: 1, n_core: 1, n_coda: 1, "
        "max_seq_len: 32}\ndata: {train_url: x, seq_len: 16}\ntraining: {micro_batch_size: 1, total_steps: 1}\n"
    )
    result = run("import", str(tmp_path / "int.safetensors"), "--spec", str(spec), "--out", str(tmp_path / "o.st"))
    assert_one_clean_error(result, 1, "weights must be floating point", "transformer.ln_f.weight: torch.int64")
    assert "(the model comes from" in result.stderr  # the note added on the way up


def test_a_missing_tokenizer_is_refused_before_training(tmp_path, shards):
    """tokenizer.path that is not there: refused at start (it was a warning, and `generate` failed after the
    run); null uses the tokenizer the shards' manifest names."""
    args = tiny(shards, tmp_path / "run", f"tokenizer.path={tmp_path / 'gone.model'}")
    result = run("train", *args, timeout=120)
    assert_one_clean_error(result, 2, "tokenizer.path:", "gone.model", "set tokenizer.path to null")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_outputs_that_exist_are_not_replaced_without_force(tmp_path, tokenizer):
    """import --out FILE, export --format hf --out DIR (not empty) and prep tokenizer --out PREFIX refuse to
    replace what is there, naming it (exit 2, the file untouched); --force replaces."""
    from model import save_reference

    cfg = ParcaeConfig(vocab_size=128, d_model=32, n_head=2, n_prelude=1, n_core=2, n_coda=1, max_seq_len=32)
    weights = save_reference(build_model(cfg), tmp_path / "w.safetensors")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"precious")
    assert_one_clean_error(run("import", str(weights), "--out", str(taken)), 2, f"--out {taken}: exists", "--force")
    assert taken.read_bytes() == b"precious"
    assert run("import", str(weights), "--out", str(taken), "--force").returncode == 0
    full = tmp_path / "hf"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    refused = run("export", str(weights), "--format", "hf", "--out", str(full))
    assert_one_clean_error(refused, 2, f"--out {full}: a directory that is not empty (notes.txt)", "--force")
    prefix = tokenizer.with_suffix("")  # the session's tokenizer: shards and runs depend on it
    before = tokenizer.read_bytes()
    again = run("prep", "tokenizer", "--out", str(prefix), "--vocab-size", "300")
    assert_one_clean_error(again, 2, f"{prefix}.model", "already there", "--force")
    assert tokenizer.read_bytes() == before


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_a_rendezvous_port_in_use_is_named(tmp_path, shards):
    """MASTER_PORT taken by another process on the node (a Slurm job's id-derived port once collided so): rank
    0 cannot listen, and says so with the address, instead of stopping as if it had lost a peer (exit 1, no
    word: the ranks all saw a DistNetworkError). A rank started torchrun-style, on a port this test holds."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        ranks["MASTER_PORT"] = str(port)
        result = run("train", *tiny(shards, tmp_path / "run", "cluster.procs_per_node=1"), env=ranks, timeout=120)
    assert_one_clean_error(result, 1, f"rendezvous: rank 0 cannot listen on 127.0.0.1:{port}, the port is in use")
