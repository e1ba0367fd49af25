from __future__ import annotations

import itertools

import pytest

from pipeline.jobspec import ScheduleSpec
from pipeline.training.schedule import lr_multiplier


def curve(total=100, **kw):
    spec = ScheduleSpec(**kw)
    return [lr_multiplier(s, total, spec) for s in range(total)]


def test_trapezoid_is_constant_then_linear_to_zero_over_the_last_half():
    c = curve(kind="trapezoid", decay_fraction=0.5)
    assert c[:50] == [1.0] * 50
    assert c[75] == pytest.approx(0.5) and c[99] == pytest.approx(0.02)
    assert all(a >= b for a, b in itertools.pairwise(c))


def test_warmup_then_shapes():
    assert curve(kind="constant", warmup_steps=10)[:10] == [pytest.approx((i + 1) / 10) for i in range(10)]
    cos = curve(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert cos[10] == pytest.approx(1.0) and cos[55] == pytest.approx(0.55) and min(cos) >= 0.1
    lin = curve(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5)
