"""Learning-rate schedules."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine decay to `end` at `total_steps`.

    `lr(s) = peak * (s + 1) / warmup` for `s < warmup`, then
    `end + (peak - end) * (1 + cos(pi * p)) / 2` with
    `p = min(1, (s - warmup) / (total_steps - warmup))`. Step `s` counts
    optimizer updates from 0, so the first update already moves the weights.

    Example:
        >>> sched = WarmupCosine(peak=1e-3, end=1e-4, warmup_steps=10, total_steps=100)
        >>> round(float(sched(9)), 6)
        0.001
    """

    def __init__(self, peak, end, warmup_steps, total_steps):
        self.peak = float(peak)
        self.end = float(end)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = float(max(self.warmup_steps, 1))
        warm = self.peak * (step + 1.0) / warmup
        decay_len = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - self.warmup_steps) / decay_len, 0.0, 1.0)
        cosine = self.end + 0.5 * (self.peak - self.end) * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warm, cosine)

    def get_config(self):
        return dict(peak=self.peak, end=self.end, warmup_steps=self.warmup_steps, total_steps=self.total_steps)
