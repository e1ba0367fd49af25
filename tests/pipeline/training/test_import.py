"""`parcae import` as a user runs it: good weights land with their config; bad ones are named."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import save_file

from model import ParcaeConfig, build_model, load_pretrained
from model.weights import reference_state_dict
from tests.conftest import REPO, parcae_cmd, parcae_in_process

SPEC = """
name: imp
model: {vocab_size: 200, d_model: 64, n_head: 2, n_prelude: 1, n_core: 1, n_coda: 1, max_seq_len: 64}
data: {train_url: x, seq_len: 32}
training: {micro_batch_size: 1, total_steps: 1}
"""


def run(*args):
    return parcae_in_process(*args)


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_import_reference_weights(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    cfg = ParcaeConfig(vocab_size=200, d_model=64, n_head=2, n_prelude=1, n_core=1, n_coda=1, max_seq_len=64)
    model = build_model(cfg, seed=4)
    reference = {k: v.contiguous() for k, v in reference_state_dict(model).items()}  # as other tooling writes it
    save_file(reference, str(tmp_path / "ref.safetensors"))
    result = run("import", str(tmp_path / "ref.safetensors"), "--spec", str(spec), "--out", str(tmp_path / "o.st"))
    assert result.returncode == 0, result.stderr
    loaded = load_pretrained(None, tmp_path / "o.st")
    assert loaded.cfg == cfg
    assert torch.equal(loaded.transformer.recurrence.adapter.B, model.transformer.recurrence.adapter.B)

    wrong = run(
        "import",
        str(tmp_path / "ref.safetensors"),
        "--spec",
        str(spec),
        "--set",
        "model.d_model=128",
        "--out",
        str(tmp_path / "x.st"),
    )
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert (
        "does not fit the model" in wrong.stderr
        and "shape transformer.C.weight: file (64, 64), model (128, 128)" in wrong.stderr
    )
    assert not (tmp_path / "x.st").exists()
    missing = run("import", str(tmp_path / "nope.st"), "--spec", str(spec), "--out", str(tmp_path / "y.st"))
    assert missing.returncode == 1 and "no such weights file" in missing.stderr


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_import_a_released_directory_without_a_spec(tmp_path):
    import yaml

    from pipeline.jobspec import ModelSpec
    from tests.model.reference import write_released
    from tests.model.test_parcae import TINY, randomize

    model = randomize(build_model(TINY, seed=2), seed=5)
    directory = write_released(tmp_path / "parcae-tiny", model, "pytorch_model.bin")
    result = run("import", str(directory), "--out", str(tmp_path / "tiny.safetensors"))
    assert result.returncode == 0, result.stderr
    loaded = load_pretrained(tmp_path / "tiny.safetensors")
    assert loaded.cfg == TINY and torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    exported = run("export", str(directory), "--format", "hf", "--out", str(tmp_path / "tiny-hf"))
    assert exported.returncode == 0 and "transformers loads it" in exported.stdout, exported.stderr[-2000:]
    again = load_pretrained(tmp_path / "tiny-hf")  # an HF export is read back too (eval, generate, import)
    assert again.cfg == TINY and torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    section = yaml.safe_load((tmp_path / "tiny.model.yaml").read_text())["model"]
    assert ModelSpec(**section).build() == TINY  # ready to paste into a job spec
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)  # another model: the directory's config.json disagrees with it, named field by field
    refused = run("import", str(directory), "--spec", str(spec), "--out", str(tmp_path / "x.safetensors"))
    assert (
        refused.returncode == 1
        and "its config differs from the one given: n_core: 2 in the weights, 1 given" in refused.stderr
    )
    assert "Traceback" not in refused.stderr and not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow  # parcae subprocesses or a training run: not in the fast tier
def test_import_a_released_directory_from_s3(tmp_path, s3_server):
    """The released directory on a real S3 endpoint (moto's server on loopback), read through boto3."""
    import os

    from tests.model.reference import write_released
    from tests.model.test_parcae import TINY, randomize

    model = randomize(build_model(TINY, seed=2), seed=6)
    directory = write_released(tmp_path / "parcae-tiny", model, "model.pt")
    bucket = s3_server.new_bucket("released")
    for path in directory.iterdir():
        s3_server.client().upload_file(str(path), bucket, f"models/parcae-tiny/{path.name}")
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": s3_server.endpoint}
    cmd = [*parcae_cmd(), "import", f"s3://{bucket}/models/parcae-tiny", "--out", str(tmp_path / "t.safetensors")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    loaded = load_pretrained(tmp_path / "t.safetensors")
    assert loaded.cfg == TINY and torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    cmd[cmd.index("import") + 1] = f"s3://{bucket}/models/no-such-model"
    cmd[cmd.index("--out") + 1] = str(tmp_path / "other.safetensors")
    missing = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)
    assert missing.returncode == 1 and "no-such-model: no such weights object or prefix" in missing.stderr
    assert "Traceback" not in missing.stderr
