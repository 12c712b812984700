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

    A resume that changes the schedule on purpose (`--allow-changed-config`)
    continues it from the LR the checkpoint's schedule had at `from_step`
    (`from_lr`), so the LR does not jump: before `warmup - 1` (where the
    plain warmup reaches the peak) it rises linearly from `from_lr` to
    `peak` there and then decays as above; later it decays by cosine from
    `from_lr` to `end` over the steps left. Steps before `from_step` read
    `from_lr`.

    Example:
        >>> sched = WarmupCosine(peak=1e-3, end=1e-4, warmup_steps=10, total_steps=100)
        >>> round(float(sched(9)), 6)
        0.001
        >>> later = WarmupCosine(1e-3, 1e-4, 10, 200, from_step=50, from_lr=float(sched(50)))
        >>> round(float(later(50)), 6) == round(float(sched(50)), 6)
        True
    """

    def __init__(self, peak, end, warmup_steps, total_steps, from_step=None, from_lr=None):
        if (from_step is None) != (from_lr is None):
            raise ValueError("from_step and from_lr go together")
        self.peak = float(peak)
        self.end = float(end)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.from_step = None if from_step is None else int(from_step)
        self.from_lr = None if from_lr is None else float(from_lr)

    def _cosine(self, step, start, start_lr):
        """Cosine from `start_lr` at step `start` to `end` at `total_steps`."""
        progress = ops.clip((step - start) / float(max(self.total_steps - start, 1)), 0.0, 1.0)
        return self.end + 0.5 * (start_lr - self.end) * (1.0 + ops.cos(math.pi * progress))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        decay = self._cosine(step, self.warmup_steps, self.peak)
        if self.from_step is None:
            warm = self.peak * (step + 1.0) / float(max(self.warmup_steps, 1))
            return ops.where(step < self.warmup_steps, warm, decay)
        start, top = self.from_step, self.warmup_steps - 1  # the plain warmup reaches the peak at step `top`
        step = ops.maximum(step, float(start))
        if start >= top:  # warmup done: decay from where the checkpoint's schedule was
            return self._cosine(step, start, self.from_lr)
        rise = self.from_lr + (self.peak - self.from_lr) * (step - start) / float(top - start)
        return ops.where(step < top, rise, decay)

    def get_config(self):
        return dict(peak=self.peak, end=self.end, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                    from_step=self.from_step, from_lr=self.from_lr)


def continued(old, step, new):
    """The config of the `WarmupCosine` that follows `new` (a config) from
    `step` on, starting at the LR the schedule `old` (a config) has there.

    Example:
        >>> old = {"peak": 1e-3, "end": 1e-4, "warmup_steps": 10, "total_steps": 100}
        >>> later = continued(old, 55, dict(old, total_steps=200))
        >>> later["from_step"], round(later["from_lr"], 7)
        (55, 0.00055)
    """
    lr = float(ops.convert_to_numpy(WarmupCosine.from_config(old)(step)))
    return dict(new, from_step=int(step), from_lr=lr)
