"""Validation during a run, and the best validation loss so far.

The best is kept across a resume (it is saved in each checkpoint's state), so
a worse first evaluation after a resume does not replace a better
`best_checkpoint/`.
"""

import math


class Evaluator:
    """Runs validation, logs it, and tracks the best.

    `evaluate()` returns the validation loss; records go to `sink` (a
    `reporting.MetricsSink`); `on_best(step)` runs when a step after
    `start_step` beats the best so far (it saves `best_checkpoint/`). With
    `enabled` False (--no-eval) nothing is evaluated. `best` is the best a
    resumed checkpoint recorded ({"val_loss", "step"}).

    Example:
        evaluator = Evaluator(lambda: model.evaluate(val_ds, return_dict=True)["loss"], sink)
        evaluator.validate(100)["val_loss"], evaluator.best_val_loss
    """

    def __init__(self, evaluate, sink, say=print, enabled=True, start_step=0, best=None, on_best=None):
        self.evaluate, self.sink, self.say = evaluate, sink, say
        self.enabled, self.start_step, self.on_best = enabled, start_step, on_best
        self.best = {"val_loss": math.inf, **(best or {})}

    def validate(self, step):
        """The validation record of `step` ({"step", "val_loss", "val_perplexity"})."""
        if not self.enabled:
            return {"val_loss": None, "val_perplexity": None}
        loss = float(self.evaluate())
        record = {"step": step, "val_loss": loss, "val_perplexity": perplexity(loss)}
        self.sink.write(record)
        self.say(f"eval step {step} | val_loss {loss:.4f} | val_ppl {record['val_perplexity']:.2f}")
        if step > self.start_step and loss < self.best["val_loss"]:
            self.best.update(record)
            if self.on_best is not None:
                self.on_best(step)
        return record

    @property
    def best_val_loss(self):
        return self.best["val_loss"] if self.enabled else None

    @property
    def best_step(self):
        return self.best.get("step")

    def state(self):
        """What a checkpoint keeps of the best, so that a resumed run continues it ({} before any)."""
        if not math.isfinite(self.best["val_loss"]):
            return {}
        return {"best": {"val_loss": self.best["val_loss"], "step": self.best.get("step")}}


def perplexity(loss):
    """exp(loss), capped so that a diverged loss gives a number, not an overflow.

    Example:
        >>> perplexity(0.0), perplexity(1e9) == perplexity(50.0)
        (1.0, True)
    """
    return math.exp(min(loss, 50.0))
