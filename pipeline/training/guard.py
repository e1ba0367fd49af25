"""Which micro-batch losses are used: non-finite ones never, spikes optionally (a z-score on recent steps)."""

from __future__ import annotations

import math
from collections import deque
from typing import Any


class LossGuard:
    """Decides, before the backward pass, whether a micro-batch's loss (averaged over ranks) is used.

    "nonfinite": the loss is NaN or infinite. "spike": ``zscore`` is set and the loss exceeds the mean of
    the last ``window`` step losses by more than ``zscore`` standard deviations (checked once ``warmup``
    steps have been seen). Its window is part of every checkpoint, so a resumed run decides the same.
    """

    def __init__(self, zscore: float | None, window: int = 100, warmup: int = 20):
        self.zscore, self.warmup = zscore, warmup
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> str:
        if not math.isfinite(loss):
            return "nonfinite"
        if self.zscore is not None and len(self.recent) >= self.warmup:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
            if loss > mean + self.zscore * std:
                return "spike"
        return "ok"

    def accept(self, step_loss: float) -> None:
        if math.isfinite(step_loss):
            self.recent.append(step_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent.extend(state.get("recent", []))
