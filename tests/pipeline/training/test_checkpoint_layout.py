"""Where a run resumes (the resume plan: nothing written over, nothing restarted silently), and a checkpoint
whose parameter layout differs from the model's refused before DeepSpeed reads it
(ZeRO checkpoints are flat partitions in parameter order: a changed order loads silently scrambled, a
changed set fails inside DeepSpeed). A real engine's refusal is in test_train_resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch.distributed

from data_prep.storage import S3Options
from model import build_model
from parcae_errors import ParcaeError
from pipeline.jobspec import CheckpointSpec
from pipeline.training import checkpoint
from pipeline.training.step import Progress
from tests.model.test_parcae import TINY


class FakeEngine:
    """Only what Checkpointer.load touches: the module, and load_checkpoint's (path, client state)."""

    def __init__(self, module, client_state):
        self.module, self.client_state = module, client_state

    def load_checkpoint(self, directory, tag):
        return f"{directory}/{tag}", self.client_state


def load(engine, directory):
    tag = checkpoint.plan_resume(str(directory)).tag
    return checkpoint.Checkpointer(CheckpointSpec(dir=str(directory)), S3Options(), "").load(engine, tag)


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
    state = load(FakeEngine(model, {"progress": {"step": 5}}), str(tmp_path))
    assert state["progress"]["step"] == 5
    other = build_model(dataclasses.replace(TINY, injection="concat"))
    with pytest.raises(
        ParcaeError,
        match=r"parameter layout differs .*first difference at #10: checkpoint transformer.recurrence.adapter.A_log",
    ):
        load(FakeEngine(other, {"step": 5}), str(tmp_path))
    (tmp_path / "step-00000005" / checkpoint.LAYOUT).unlink()
    with pytest.raises(ParcaeError, match="before checkpoints recorded their parameter layout"):
        load(FakeEngine(model, {"step": 5}), str(tmp_path))


def make_checkpoints(directory, complete, partial=(), latest=None):
    for tag in [*complete, *partial]:
        (directory / tag).mkdir(parents=True)
        (directory / tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    for tag in complete:
        (directory / tag / "spec.yaml").write_text("name: x\n")
    if latest:
        (directory / checkpoint.LATEST).write_text(latest + "\n")


def test_the_resume_plan_never_restarts_beside_checkpoints_and_never_writes_over_one(tmp_path):
    d = tmp_path / "c"
    make_checkpoints(d, ["step-00000020", "step-00000040"], latest="step-00000060")  # step 60 deleted by hand
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.plan_resume(str(d))
    message = str(info.value)
    assert "names 'step-00000060', which is missing or incomplete" in message
    assert "`parcae train SPEC --resume-from step-00000040`" in message and "--restart" in message
    (d / checkpoint.LATEST).unlink()  # no LATEST beside complete checkpoints: refused too, not step 0
    with pytest.raises(checkpoint.CheckpointError, match="but no LATEST names one; the newest complete"):
        checkpoint.plan_resume(str(d))
    assert checkpoint.plan_resume(str(d), resume_from="step-00000020").set_aside == ("step-00000040",)
    with pytest.raises(checkpoint.CheckpointError, match=r"--resume-from step-00000030: .*\(step-00000020, step"):
        checkpoint.plan_resume(str(d), resume_from="step-00000030")
    restart = checkpoint.plan_resume(str(d), restart=True)
    assert restart == checkpoint.ResumePlan(None, ("step-00000020", "step-00000040"))
    with pytest.raises(checkpoint.CheckpointError, match="give one of them"):
        checkpoint.plan_resume(str(d), resume_from="step-00000020", restart=True)


def test_a_newer_complete_checkpoint_than_latest_and_partial_ones(tmp_path):
    d = tmp_path / "c"
    make_checkpoints(d, ["step-00000020", "step-00000040"], partial=["step-00000060"], latest="step-00000020")
    with pytest.raises(checkpoint.CheckpointError, match="names step-00000020, but step-00000040 is complete too"):
        checkpoint.plan_resume(str(d))
    (d / checkpoint.LATEST).write_text("step-00000040\n")
    assert checkpoint.plan_resume(str(d)) == checkpoint.ResumePlan("step-00000040", ("step-00000060",))
    fresh = tmp_path / "fresh"
    make_checkpoints(fresh, [], partial=["step-00000010"])  # a first save cut off: nothing complete
    assert checkpoint.plan_resume(str(fresh)) == checkpoint.ResumePlan(None, ("step-00000010",))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_set_aside_moves_and_deletes_nothing(tmp_path, where, request):
    if where == "local":
        directory, options = tmp_path / "c", S3Options()
        make_checkpoints(directory, ["step-00000020", "step-00000040"], latest="step-00000040")
        url = str(directory)
    else:
        s3 = request.getfixturevalue("s3_server")
        make_checkpoints(tmp_path / "src", ["step-00000020", "step-00000040"], latest="step-00000040")
        bucket, options = s3.new_bucket("ckpt"), S3Options(s3.endpoint)
        for file in sorted((tmp_path / "src").rglob("*")):
            if file.is_file():
                s3.client().upload_file(str(file), bucket, f"run/{file.relative_to(tmp_path / 'src')}")
        url = f"s3://{bucket}/run"
    before = sorted(checkpoint._store(url, options).list())
    where_to = checkpoint.set_aside(url, ("step-00000040", checkpoint.LATEST), options)
    after = sorted(checkpoint._store(url, options).list())
    folder = where_to.rstrip("/").rsplit("/", 1)[1]
    assert folder.startswith("superseded-")
    moved = {f"{folder}/{n}" if n.startswith(("step-00000040", "LATEST")) else n for n in before}
    assert set(after) == moved  # every file still there, under its new name


def test_a_save_never_writes_over_a_complete_checkpoint(tmp_path):
    make_checkpoints(tmp_path, ["step-00000020"], latest="step-00000020")
    saver = checkpoint.Checkpointer(CheckpointSpec(dir=str(tmp_path)), S3Options(), "")
    with pytest.raises(checkpoint.CheckpointError, match="step-00000020: a complete checkpoint is there"):
        saver.save(FakeEngine(build_model(TINY), {}), 20)
    assert (tmp_path / "step-00000020" / "mp_rank_00_model_states.pt").read_bytes() == b"x"


class Counter:
    """A stateful part as a future one would be (a data scheduler, say): registered, nothing else."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class SavingEngine(FakeEngine):
    """Also what Checkpointer.save touches: save_checkpoint writes the client state where load finds it."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        self.client_state = client_state
        (Path(directory) / tag).mkdir(parents=True)


def test_registered_parts_are_saved_and_given_back_and_the_flat_layout_still_loads(tmp_path, monkeypatch):
    """Every registered part's state goes into a checkpoint and comes back on resume, with no change to
    the checkpointer or the trainer for a new part. Checkpoints written before the parts registered
    themselves (progress fields at the top level: step, tokens, nonfinite_total, spikes_skipped, beside
    loader and guard) load the same way."""
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    model = build_model(TINY)
    engine = SavingEngine(model, None)
    saver = checkpoint.Checkpointer(CheckpointSpec(dir=str(tmp_path), interval_steps=5), S3Options(), "name: x\n")
    progress, counter = Progress(step=10, tokens=640, spikes_skipped=2), Counter()
    counter.seen = 7
    saver.register("progress", progress)
    saver.register("counter", counter)
    assert [s for s in range(1, 13) if saver.due(s)] == [5, 10] and saver.due(12, last=True) and saver.due(3, stop=True)
    saver.save(engine, 10)
    assert engine.client_state == {"progress": progress.state_dict(), "counter": {"seen": 7}}

    again, fresh = Progress(), Counter()
    loader = checkpoint.Checkpointer(CheckpointSpec(dir=str(tmp_path)), S3Options(), "")
    loader.register("progress", again)
    loader.register("counter", fresh)
    loader.load(engine, "step-00000010")
    assert (again, fresh.seen) == (progress, 7)

    flat = {"step": 10, "tokens": 640, "nonfinite_total": 1, "spikes_skipped": 2, "loader": {"format": 2}, "guard": {}}
    older = Progress()
    reader = checkpoint.Checkpointer(CheckpointSpec(dir=str(tmp_path)), S3Options(), "")
    reader.register("progress", older)
    state = reader.load(FakeEngine(model, flat), "step-00000010")
    assert older == Progress(step=10, tokens=640, nonfinite_total=1, spikes_skipped=2)
    assert state["loader"] == {"format": 2} and state["guard"] == {}
