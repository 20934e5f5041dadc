"""Loss-spike detection: a step whose loss is more than `factor` times the
median loss of the `window` steps before it.

The median (not the mean) keeps one earlier spike from hiding the next, and
a few noisy batches from raising the bar. Steps before `start` (the warmup,
when the loss falls by itself) are recorded but never flagged. The Trainer
logs a warning for each spike (TrainConfig.spike_factor, spike_window) and,
with TrainConfig.skip_spikes, skips that step's optimizer update, as PaLM
(section 5.1) and OLMo 2 do for the batches around a spike.
"""
from __future__ import annotations

import math
import statistics
from collections import deque


class SpikeDetector:
    def __init__(self, factor: float = 1.3, window: int = 20, start: int = 0):
        if factor <= 1.0 or window < 1 or start < 0:
            raise ValueError(f"SpikeDetector: need factor > 1, window >= 1 and start >= 0, "
                             f"got {factor}, {window}, {start}")
        self.factor, self.window, self.start = factor, window, start
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, step: int, loss: float) -> float | None:
        """Record the loss of `step` (0-based); return the median it exceeds
        by more than `factor` when it is a spike, else None. Non-finite
        losses are neither flagged (the Trainer skips those steps anyway) nor
        recorded."""
        if not math.isfinite(loss):
            return None
        median = statistics.median(self.recent) if len(self.recent) == self.window else None
        self.recent.append(loss)
        if step >= self.start and median is not None and loss > self.factor * median:
            return median
        return None
