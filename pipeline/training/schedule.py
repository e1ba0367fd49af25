"""Learning-rate shapes as pure functions of the step: a multiplier of the spec's lr."""

from __future__ import annotations

import math

from pipeline.jobspec import ScheduleSpec


def lr_multiplier(step: int, total_steps: int, spec: ScheduleSpec) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then the kind's shape, ending at ``min_lr_ratio``.

    constant: 1. cosine: half a cosine from 1 to min_lr_ratio after warmup. linear: a straight line
    from 1 to min_lr_ratio after warmup. trapezoid (the paper's): constant, then linear to
    min_lr_ratio over the last ``decay_fraction`` of the steps.
    """
    if spec.warmup_steps and step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    floor = spec.min_lr_ratio
    if spec.kind == "constant":
        return 1.0
    if spec.kind == "trapezoid":
        decay_start = total_steps * (1.0 - spec.decay_fraction)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(total_steps - decay_start, 1)
    else:
        progress = (step - spec.warmup_steps) / max(total_steps - spec.warmup_steps, 1)
    progress = min(max(progress, 0.0), 1.0)
    if spec.kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - floor) * progress
