"""The Evaluator in process: validation records, the best so far and its checkpoint, a resumed
best, --no-eval; with a fake evaluation (a list of losses) and a list for a sink."""

import math

import pytest

from ultimate_trainer.training.evaluator import Evaluator, perplexity


class ListSink:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def _evaluator(losses, **kw):
    losses, sink, lines, bests = list(losses), ListSink(), [], []
    evaluator = Evaluator(lambda: losses.pop(0), sink, lines.append, on_best=bests.append, **kw)
    return evaluator, sink, lines, bests


def test_each_validation_is_logged_and_the_best_saved_when_it_improves():
    evaluator, sink, lines, bests = _evaluator([5.0, 4.0, 4.5, 3.0])
    assert evaluator.state() == {}, "no best before a validation after the start"
    records = [evaluator.validate(step) for step in (0, 2, 4, 6)]
    assert [r["val_loss"] for r in records] == [5.0, 4.0, 4.5, 3.0]
    assert records[1] == {"step": 2, "val_loss": 4.0, "val_perplexity": pytest.approx(math.exp(4.0))}
    assert sink.records == records
    assert lines[1] == f"eval step 2 | val_loss 4.0000 | val_ppl {math.exp(4.0):.2f}"
    assert bests == [2, 6], "the start step's validation is the baseline, never a best"
    assert (evaluator.best_val_loss, evaluator.best_step) == (3.0, 6)
    assert evaluator.state() == {"best": {"val_loss": 3.0, "step": 6}}


def test_a_resumed_run_keeps_the_checkpoints_better_best():
    evaluator, _, _, bests = _evaluator([3.5, 2.5], start_step=10, best={"val_loss": 3.0, "step": 8})
    evaluator.validate(10)
    evaluator.validate(12)  # worse than the checkpoint's best at first, then better
    assert bests == [12]
    evaluator, _, _, bests = _evaluator([3.5, 3.2], start_step=10, best={"val_loss": 3.0, "step": 8})
    evaluator.validate(10)
    evaluator.validate(12)
    assert bests == [] and evaluator.state() == {"best": {"val_loss": 3.0, "step": 8}}


def test_no_eval_evaluates_nothing():
    evaluator, sink, lines, bests = _evaluator([], enabled=False)
    assert evaluator.validate(4) == {"val_loss": None, "val_perplexity": None}
    assert sink.records == lines == bests == [] and evaluator.best_val_loss is None


def test_perplexity_of_a_diverged_loss_is_a_number():
    assert perplexity(0.0) == 1.0 and perplexity(1e9) == math.exp(50.0)
