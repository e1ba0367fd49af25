"""A checkpoint whose parameter layout differs from the model's is refused before DeepSpeed reads it
(ZeRO checkpoints are flat partitions in parameter order: a changed order loads silently scrambled, a
changed set fails inside DeepSpeed). A real engine's refusal is in test_train_resume."""

from __future__ import annotations

import dataclasses
import json

import pytest

from data_prep.storage import S3Options
from model import build_model
from parcae_errors import ParcaeError
from pipeline.jobspec import CheckpointSpec
from pipeline.training import checkpoint
from tests.model.test_parcae import TINY


class FakeEngine:
    """Only what Checkpointer.load touches: the module, and load_checkpoint's (path, client state)."""

    def __init__(self, module, client_state):
        self.module, self.client_state = module, client_state

    def load_checkpoint(self, directory, tag):
        return f"{directory}/{tag}", self.client_state


def load(engine, directory):
    return checkpoint.Checkpointer(CheckpointSpec(dir=str(directory)), S3Options(), "").load(engine)


def write_marker(tmp_path, tag="step-00000005"):
    (tmp_path / tag).mkdir()
    (tmp_path / tag / "spec.yaml").write_text("name: x\n")  # written last of a checkpoint's files
    (tmp_path / checkpoint.LATEST).write_text(tag + "\n")


def test_matching_layout_loads_and_a_different_one_is_named(tmp_path):
    write_marker(tmp_path)
    model = build_model(TINY)
    layout = checkpoint.param_layout(model)
    assert layout[0].startswith("transformer.wte.weight:") and any("recurrence.adapter" in x for x in layout)
    (tmp_path / "step-00000005" / checkpoint.LAYOUT).write_text(json.dumps(layout))
    state = load(FakeEngine(model, {"step": 5}), str(tmp_path))
    assert state["step"] == 5
    other = build_model(dataclasses.replace(TINY, injection="concat"))
    with pytest.raises(
        ParcaeError,
        match=r"parameter layout differs .*first difference at #10: checkpoint transformer.recurrence.adapter.A_log",
    ):
        load(FakeEngine(other, {"step": 5}), str(tmp_path))
    (tmp_path / "step-00000005" / checkpoint.LAYOUT).unlink()
    with pytest.raises(ParcaeError, match="before checkpoints recorded their parameter layout"):
        load(FakeEngine(model, {"step": 5}), str(tmp_path))
