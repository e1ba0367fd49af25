from __future__ import annotations

import math

from pipeline.training.guard import LossGuard


def test_nonfinite_is_always_refused():
    guard = LossGuard(None)
    assert guard.check(math.nan) == "nonfinite" and guard.check(math.inf) == "nonfinite"
    assert guard.check(1e6) == "ok"  # no spike guard without a z-score


def test_spikes_after_warmup_and_state_round_trip():
    guard = LossGuard(3.0, window=50, warmup=5)
    for value in (2.0, 2.1, 1.9, 2.0, 2.05):
        assert guard.check(value) == "ok"
        guard.accept(value)
    assert guard.check(2.2) == "ok" and guard.check(5.0) == "spike"
    guard.accept(math.nan)  # never enters the window
    again = LossGuard(3.0, window=50, warmup=5)
    again.load_state_dict(guard.state_dict())
    assert again.check(5.0) == "spike" and list(again.recent) == list(guard.recent)
