"""Metric records: names for TensorBoard/W&B, the loss-curve PNG, the W&B error paths, and the run summary."""

import dataclasses
import json
import sys

import pytest

from ultimate_trainer.errors import UserError
from ultimate_trainer.training import reporting


def test_scalars_are_grouped_and_keep_only_finite_numbers():
    train = {"step": 4, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "mfu": float("nan"), "tokens": 512,
             "skipped_updates": 0}
    assert reporting.scalars(train) == {"train/loss": 2.5, "train/lr": 1e-3}
    assert reporting.scalars({"step": 4, "val_loss": 2.0, "val_perplexity": 7.39}) == {
        "val/loss": 2.0, "val/perplexity": 7.39}


def test_sink_writes_jsonl_and_the_curve_is_a_png(tmp_path):
    sink = reporting.MetricsSink(tmp_path)
    assert reporting.plot_loss_curve(sink.path, tmp_path / "empty.png") is None  # nothing logged yet
    for step, loss in ((2, 3.0), (4, 2.5)):
        sink.write({"step": step, "loss": loss})
    sink.write({"step": 4, "val_loss": 2.7})
    sink.close()
    train, val = reporting.read_metrics(sink.path)
    assert [r["loss"] for r in train] == [3.0, 2.5] and [r["val_loss"] for r in val] == [2.7]
    png = reporting.plot_loss_curve(sink.path, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert not (tmp_path / "tensorboard").exists(), "TensorBoard only when asked"


def test_wandb_missing_or_failing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(UserError, match="--wandb-project needs the wandb package; pip install wandb"):
        reporting.MetricsSink(tmp_path, wandb_project="demo")

    class Broken:
        @staticmethod
        def init(**kwargs):
            raise RuntimeError("api_key not configured (no-tty)\nmore detail")

    monkeypatch.setitem(sys.modules, "wandb", Broken)
    with pytest.raises(UserError, match=r"W&B did not start \(api_key not configured \(no-tty\)\); run `wandb login`"):
        reporting.MetricsSink(tmp_path, wandb_project="demo")


def test_wandb_keeps_one_run_id_per_output_dir(tmp_path, monkeypatch):
    seen = []

    class Recorder:
        @staticmethod
        def init(**kwargs):
            seen.append(kwargs)
            return None

    monkeypatch.setitem(sys.modules, "wandb", Recorder)
    reporting.MetricsSink(tmp_path, wandb_project="demo", config={"secret": "[redacted]"})
    reporting.MetricsSink(tmp_path, wandb_project="demo", wandb_entity="my-team")
    assert seen[0]["id"] == seen[1]["id"] and seen[0]["resume"] == "allow"
    assert seen[0]["entity"] is None and seen[1]["entity"] == "my-team"  # --wandb-entity, the guide's wandb.entity
    assert seen[0]["name"] == tmp_path.name and seen[0]["config"] == {"secret": "[redacted]"}
    assert json.dumps(seen[0]["dir"]) and (tmp_path / reporting.WANDB_ID_FILE).read_text().strip() == seen[0]["id"]


class _Logger:
    """What RunSummary reads of a callbacks.MetricsLogger."""

    def __init__(self, train_seconds, history, peak):
        from ultimate_trainer.training.mfu import PeakGuard

        self.train_seconds, self.history, self.peak = train_seconds, history, PeakGuard(peak, printer=lambda _: None)


class _Best:
    best_val_loss, best_step = 2.5, 4


def _plan(total_steps, peak=None):
    from tests.training.test_plan import _plan as plan_of

    plan, _ = plan_of({"training.max_steps": total_steps})
    return plan if peak is None else dataclasses.replace(plan, peak_flops=peak)


def test_run_summary_counts_this_process_tokens_and_writes_the_file(tmp_path):
    plan = _plan(6, peak={"total": 1e12, "per_device": 1e12, "source": "--peak-flops"})
    tokens = plan.schedule.tokens_per_step
    logger = _Logger(train_seconds=2.0, history=[{"loss": 3.0}, {"loss": 2.75}], peak=dict(plan.peak_flops))
    summary = reporting.RunSummary(plan, start_step=2, resumed=True)
    record = summary.record(10.0, logger, {"val_loss": 4.0}, {"val_loss": 3.0, "val_perplexity": 20.1}, _Best(),
                            tmp_path / "checkpoint-6")
    assert record["tokens"] == 6 * tokens and record["tokens_per_sec"] == 4 * tokens / 2.0  # resumed at step 2
    assert record["mfu"] == pytest.approx(plan.flops_per_token * record["tokens_per_sec"] / 1e12)
    assert (record["resumed_from_step"], record["wall_seconds"], record["final_train_loss"]) == (2, 10.0, 2.75)
    assert record["val_loss_reduction"] == pytest.approx(0.25) and (record["best_val_loss"], record["best_step"]) == (
        2.5, 4)
    assert record["parameters"]["total"] == plan.parameters.total and record["checkpoint"].endswith("checkpoint-6")
    path = reporting.RunSummary.write(record, tmp_path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(record)) and path.name == "training_summary.json"
    assert reporting.RunSummary.line(record) == (
        f"done: 6 steps in 10s, {record['tokens_per_sec']:,.0f} tok/s; val_loss 4.0000 -> 3.0000 (25% lower); "
        f"checkpoint {tmp_path / 'checkpoint-6'}")


def test_run_summary_reports_a_raised_peak_and_no_eval():
    plan = _plan(2, peak={"total": 1.0, "per_device": 1.0, "source": "--peak-flops"})  # far below any real rate
    logger = _Logger(train_seconds=1.0, history=[], peak=dict(plan.peak_flops))
    record = reporting.RunSummary(plan, eval_enabled=False).record(
        3725.0, logger, {"val_loss": None}, {"val_loss": None, "val_perplexity": None}, _Best(), "c")
    assert record["mfu"] == 1.0 and record["peak_flops"]["raised_to_achieved"] is True
    assert plan.peak_flops["total"] == 1.0, "the plan itself stays as planned"
    assert record["resumed_from_step"] is None and record["val_loss_reduction"] is None
    assert record["final_train_loss"] is None
    assert reporting.RunSummary.line(record).startswith("done: 2 steps in 1h02m, ")
    assert "no validation (--no-eval); checkpoint c" in reporting.RunSummary.line(record)


def test_format_seconds():
    assert [reporting.format_seconds(s) for s in (42, 187, 7500)] == ["42s", "3m07s", "2h05m"]
