"""Metric records: names for TensorBoard/W&B, the loss-curve PNG, and the W&B error paths."""

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
