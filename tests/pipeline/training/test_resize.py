"""What a resume on other ranks changes: the global batch is kept, or the resume is refused with the sizes that
keep it; the world-size policy and the ZeRO stages whose checkpoints cannot be rewritten."""

from __future__ import annotations

import pytest

from pipeline.training.resize import Layout, ResumeRefused, resume_change, splits


def test_splits_of_a_global_batch():
    assert splits(16, 1) == [(16, 1), (8, 2), (4, 4), (2, 8), (1, 16)]
    assert splits(16, 3) == []


def test_a_kept_global_batch_is_described_and_a_changed_one_refused():
    saved = Layout(world_size=2, micro_batch_size=8, accumulation=1, zero_stage=3)
    assert resume_change(saved, saved, "step-00000010") is None
    change = resume_change(saved, Layout(1, 8, 2, 3), "step-00000010")
    assert change.startswith("world size 2 -> 1, micro batch 8 -> 8, accumulation 1 -> 2, global batch 16 kept")
    assert "rewritten for the new ranks" in change
    assert resume_change(saved, Layout(2, 4, 2, 3), "t") == (
        "world size 2 -> 2, micro batch 8 -> 4, accumulation 1 -> 2, global batch 16 kept"
    )
    with pytest.raises(ResumeRefused, match=r"global batch of 16 rows, this run's is 8.*global_batch_size=16"):
        resume_change(saved, Layout(1, 8, 1, 3), "t")
    with pytest.raises(ResumeRefused, match=r"cannot be split over 3 ranks; world sizes that can: 1, 2, 4, 8, 16"):
        resume_change(saved, Layout(3, 5, 1, 3), "t")
    with pytest.raises(ResumeRefused, match=r"on_world_size_change: refuse.*resume on 2 rank\(s\)"):
        resume_change(saved, Layout(1, 8, 2, 3), "t", policy="refuse")
    with pytest.raises(ResumeRefused, match=r"only ZeRO-3 \(and stage 0\) checkpoints are rewritten"):
        resume_change(Layout(2, 8, 1, 2), Layout(1, 8, 2, 2), "t")
    assert resume_change(Layout(2, 8, 1, 0), Layout(1, 8, 2, 0), "t").endswith("global batch 16 kept")


def test_a_load_failure_with_intact_files_does_not_advise_an_earlier_checkpoint(tmp_path):
    """An earlier checkpoint is the way out only when a file of this one is damaged; when every file reads back,
    the earlier one would fail the same way (a world-size refusal used to be answered with "resume from it")."""
    import torch

    from pipeline.training.checkpoint import unreadable

    tag = tmp_path / "step-00000010"
    tag.mkdir()
    torch.save({"x": torch.zeros(3)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    how = "resume from it with `parcae train SPEC --resume-from {tag}`"
    intact = str(unreadable("dir/step-00000010", tag, RuntimeError("world size 2, now 1"), ["step-00000005"], how))
    assert "read back intact" in intact and "world size 2, now 1" in intact and "step-00000005" not in intact
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"PK\x03\x04 truncated")
    damaged = str(unreadable("dir/step-00000010", tag, RuntimeError("bad"), ["step-00000005"], how))
    assert "is corrupt or truncated" in damaged and "--resume-from step-00000005" in damaged


def test_deepspeeds_muon_module_is_a_stand_in_unless_the_run_uses_it():
    """DeepSpeed's ZeRO only asks isinstance(optimizer, MuonWithAuxAdam); importing the real module imports
    inductor (a second of every rank's start-up). The stand-in goes when muon-deepspeed needs the real class."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys, torch\n"
        "from pipeline.training.engine import _deepspeed_muon_stand_in, _DEEPSPEED_MUON\n"
        "_deepspeed_muon_stand_in(needed=False)\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam\n"
        "assert not isinstance(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), MuonWithAuxAdam)\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules\n"
        "_deepspeed_muon_stand_in(needed=True)\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam as Real\n"
        "assert Real is not MuonWithAuxAdam and hasattr(sys.modules[_DEEPSPEED_MUON], 'MuonWithAuxAdam')\n"
        "assert not getattr(sys.modules[_DEEPSPEED_MUON], 'PARCAE_STAND_IN', False)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
