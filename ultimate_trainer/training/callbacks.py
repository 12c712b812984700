"""Callbacks: progress and metrics, periodic validation, periodic checkpoints,
and the host allocator's settings.

`fit` runs in Keras epochs of `StepClock.epoch_steps` optimizer steps: the
largest span that divides the log, eval and save intervals. Keras resets its
loss mean at every epoch, so the epoch logs give the exact mean loss of the
span without reading device values after every step (a host sync per step
is what slows a JAX loop down), and the epoch end is where JAX writes the
trained state back into the model's variables.
"""

import json
import math
import time

import keras

from ultimate_trainer import backend as backend_lib
from ultimate_trainer.training import mfu
from ultimate_trainer.training.reporting import format_seconds


class StepClock:
    """Counts optimizer steps during `fit` and lays out its Keras epochs.

    Keras epochs are `epoch_steps` long, the gcd of the log, eval and save
    intervals, aligned to multiples of it in absolute step numbers; a run
    that resumes between two of those boundaries first runs the short
    segment up to the next one. `step` is the absolute number of optimizer
    steps done, updated by `StepCounter`.

    Example:
        >>> clock = StepClock(total_steps=25, intervals=(10, 500, 1000))
        >>> clock.epoch_steps, clock.segments()
        (10, [(0, 10, 3)])
        >>> StepClock(total_steps=25, intervals=(10,), start_step=7).segments()
        [(7, 3, 1), (10, 10, 2)]
    """

    def __init__(self, total_steps, intervals, accumulation=1, start_step=0):
        self.total_steps = total_steps
        self.accumulation = accumulation
        self.start_step = start_step
        self.step = start_step
        self.epoch_steps = max(1, min(math.gcd(*intervals), total_steps))
        self.interrupted = False
        self.nonfinite_after = None  # last step whose loss was finite, once one was not

    def segments(self):
        """[(first_step, steps per Keras epoch, Keras epochs)], one `fit` call each."""
        out, step = [], self.start_step
        if step % self.epoch_steps and step < self.total_steps:
            aligned = min((step // self.epoch_steps + 1) * self.epoch_steps, self.total_steps)
            out.append((step, aligned - step, 1))
            step = aligned
        if step < self.total_steps:
            out.append((step, self.epoch_steps, math.ceil((self.total_steps - step) / self.epoch_steps)))
        return out

    def due(self, every):
        """Whether an `every`-step event falls at the current step (never the final step:
        the trainer handles that one after `fit`)."""
        return (
            self.step % every == 0 and self.start_step < self.step < self.total_steps and self.nonfinite_after is None
        )

    @property
    def done(self):
        return self.step >= self.total_steps


class StepCounter(keras.callbacks.Callback):
    """Advances the clock; stops `fit` at the last step or, after an interrupt
    request, at the next optimizer-step boundary."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self._micro = 0

    def on_train_batch_end(self, batch, logs=None):
        self._micro += 1
        if self._micro % self.clock.accumulation:
            return
        self.clock.step += 1
        if self.clock.done or self.clock.interrupted:
            self.model.stop_training = True


class KeepAllocatorSettings(keras.callbacks.Callback):
    """Restores `backend.tune_allocator`'s glibc settings before every batch,
    because tf.data's `from_generator` kernel resets them when an iterator
    starts (see `backend.restore_allocator`). Add it only where
    `tune_allocator()` returned True.

    Example:
        model.fit(dataset, callbacks=[KeepAllocatorSettings()])
    """

    def on_train_batch_begin(self, batch, logs=None):
        backend_lib.restore_allocator()

    def on_test_batch_begin(self, batch, logs=None):
        backend_lib.restore_allocator()


class MetricsLogger(keras.callbacks.Callback):
    """Prints a progress line and appends to metrics.jsonl every `log_every` steps.

    The logged loss is the mean per-token loss over the steps since the last
    line (with accumulation, over every micro-batch of those steps); the
    gradient norm is the mean global norm of those steps' updates (before
    clipping). It stops `fit` when more than `skip_nonfinite` updates had
    NaN or inf gradients, or the loss is not finite.

    With `moe_stats` (a callable such as `lambda: moe.read_stats(model)`),
    the record also holds the routing statistics of the same steps, and
    `loss` is the language-model cross-entropy alone (comparable with
    `val_loss`): the auxiliary losses Keras added to the training loss are
    taken out again and logged on their own.

    `peak` is the plan's `peak_flops` dict ({"total", "per_device",
    "source"}); MFU is against its total, never above 100% (`mfu.PeakGuard`
    raises a peak that training outran, in place, and says so once).
    """

    def __init__(self, clock, log_every, tokens_per_step, schedule, sink, printer=print,
                 flops_per_token=None, peak=None, skip_nonfinite=0, moe_stats=None):
        super().__init__()
        self.moe_stats = moe_stats
        self.skip_nonfinite = skip_nonfinite
        self._nonfinite_seen = 0
        self.flops_per_token = flops_per_token
        self.peak = mfu.PeakGuard(peak or {}, printer)
        self.clock = clock
        self.log_every = log_every
        self.tokens_per_step = tokens_per_step
        self.schedule = schedule
        self.sink = sink  # a reporting.MetricsSink
        self.printer = printer
        self.history = []
        self._loss_sum = 0.0
        self._steps = 0
        self._train_seconds = 0.0
        self._window_seconds = 0.0
        self._epoch_start = None
        self._epoch_first_step = 0
        self._run_start = None

    def on_train_begin(self, logs=None):
        if self._run_start is None:
            self._run_start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._epoch_first_step = self.clock.step

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._epoch_start
        step = self.clock.step
        steps = step - self._epoch_first_step
        if not steps:
            return
        optimizer = self.model.optimizer
        nonfinite = optimizer.nonfinite_count if hasattr(optimizer, "nonfinite_count") else 0
        if nonfinite > self.skip_nonfinite or not math.isfinite(float(logs["loss"])):
            # Without a skip the weights are already poisoned: stop before anything saves or evaluates them.
            self.clock.nonfinite_after = step - steps
            self.model.stop_training = True
            return
        if nonfinite > self._nonfinite_seen:
            self.printer(
                f"step {step}: skipped {nonfinite - self._nonfinite_seen} update(s) with NaN or inf gradients "
                f"({nonfinite} of --skip-nonfinite {self.skip_nonfinite} used); the weights kept their values"
            )
            self._nonfinite_seen = nonfinite
        self._loss_sum += float(logs["loss"]) * steps
        self._steps += steps
        self._window_seconds += seconds
        self._train_seconds += seconds
        if step % self.log_every and not self.clock.done and not self.clock.interrupted:
            return
        loss = self._loss_sum / max(self._steps, 1)
        tokens_per_sec = self._steps * self.tokens_per_step / max(self._window_seconds, 1e-9)
        remaining = (self.clock.total_steps - step) * self.tokens_per_step / max(tokens_per_sec, 1e-9)
        record = {
            "step": step,
            "loss": loss,
            "lr": float(self.schedule(step - 1)),
            "grad_norm": optimizer.pop_grad_norm() if hasattr(optimizer, "pop_grad_norm") else None,
            "skipped_updates": nonfinite,
            "tokens": step * self.tokens_per_step,
            "tokens_per_sec": tokens_per_sec,
            "mfu": self.peak.mfu(self.flops_per_token * tokens_per_sec) if self.flops_per_token else None,
            "elapsed_sec": time.perf_counter() - self._run_start,
        }
        moe = self.moe_stats() if self.moe_stats else None
        if moe:
            record["loss"] = loss = loss - moe["loss_terms"]
            record.update(moe_aux_loss=moe["aux_loss"], moe_z_loss=moe["z_loss"],
                          moe_dropped=moe["dropped_fraction"], moe_load_max=moe["load_max"],
                          **{f"expert_load_{i}": v for i, v in enumerate(moe["expert_load"])})
        self.history.append(record)
        self.sink.write(record)
        self.printer(
            f"step {step:>{len(str(self.clock.total_steps))}}/{self.clock.total_steps} | "
            f"loss {loss:.4f} | lr {record['lr']:.2e} | "
            + (f"grad-norm {record['grad_norm']:.3f} | " if record["grad_norm"] is not None else "")
            + (f"moe aux {moe['aux_loss']:.3f} z {moe['z_loss']:.2f} drop {100 * moe['dropped_fraction']:.1f}% "
               f"load-max {moe['load_max']:.2f} | " if moe else "")
            + f"{tokens_per_sec:,.0f} tok/s | "
            + (f"MFU {100 * record['mfu']:.1f}% | " if record["mfu"] is not None else "")
            + f"eta {format_seconds(remaining)}"
        )
        self._loss_sum, self._steps, self._window_seconds = 0.0, 0, 0.0

    @property
    def train_seconds(self):
        return self._train_seconds


class PeriodicEval(keras.callbacks.Callback):
    """Calls `validate(step)` every `eval_every` steps."""

    def __init__(self, clock, eval_every, validate):
        super().__init__()
        self.clock = clock
        self.eval_every = eval_every
        self.validate = validate

    def on_epoch_end(self, epoch, logs=None):
        if self.clock.due(self.eval_every):
            self.validate(self.clock.step)


class PeriodicCheckpoint(keras.callbacks.Callback):
    """Saves `checkpoint-{step}` every `save_every` steps through `save(step)`."""

    def __init__(self, clock, save_every, save):
        super().__init__()
        self.clock = clock
        self.save_every = save_every
        self.save = save

    def on_epoch_end(self, epoch, logs=None):
        if self.clock.due(self.save_every):
            self.save(self.clock.step)
