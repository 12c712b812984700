"""End-to-end runs through the CLI, in process (`run_main`), which saves the seconds of imports
each process start costs. What only a real process shows stays elsewhere: the exit status and
one-line errors (tests/test_cli.py), a default run as a user starts it (tests/test_default_run.py),
signals (tests/training/test_resume.py). The trainer's parts are tested alone in
tests/checkpoint/test_manager.py, tests/training/test_evaluator.py, test_plan.py and test_reporting.py."""

import json

import numpy as np
import pytest

from tests.conftest import run_main, tiny_model_flags


def _metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "val_loss" in r]


def _tensorboard_scalars(directory):
    """{tag: [(step, value)]} read back from the event files, with tensorflow's own parser."""
    import tensorflow as tf

    found = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for raw in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(raw.numpy())
            for value in event.summary.value:
                number = float(tf.make_ndarray(value.tensor)) if value.HasField("tensor") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, number))
    return found


def test_run_writes_every_artifact_and_loads_back(tmp_path):
    out = tmp_path / "run"
    result = run_main([*tiny_model_flags(), "--max-steps", "6", "--log-every", "2", "--eval-every", "3",
                       "--save-every", "4", "--output-dir", str(out), "--wandb-project", "ut-tests"],
                      env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("training_args.json", "ut_tokenizer.json", "metrics.jsonl", "training_summary.json", "samples.txt",
                 "loss_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = _tensorboard_scalars(out / "tensorboard")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6] and [s for s, _ in scalars["val/loss"]] == [0, 3, 6]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in logged if "loss" in r])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_sec", "val/perplexity"} <= set(scalars)
    offline = list((out / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "W&B wrote its offline run"
    assert (out / "checkpoint-4" / "model.keras").is_file()
    assert (out / "checkpoint-6" / "model.keras").is_file()
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6
    train, val = _metrics(out)
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in val] == [0, 3, 6]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 32
    assert json.loads((out / "training_args.json").read_text())["model"]["d_model"] == 32
    assert "backend: jax" in result.stdout and "devices:" in result.stdout
    assert "parameters:" in result.stdout and "step 6/6" in result.stdout

    from ultimate_trainer import load_model

    model, tokenizer = load_model(out / "checkpoint-6")
    logits = np.asarray(model(np.array([tokenizer.encode("def f(x):")], dtype="int32")))
    assert logits.shape == (1, 9, tokenizer.vocab_size)

    again = run_main([*tiny_model_flags(), "--max-steps", "2", "--output-dir", str(out)])
    assert again.returncode == 2 and "already holds a run" in again.stderr
    over = run_main([*tiny_model_flags(), "--max-steps", "2", "--log-every", "1", "--output-dir", str(out),
                     "--overwrite"])
    assert over.returncode == 0, over.stderr[-3000:]
    previous = list((out / "previous-runs").iterdir())
    assert len(previous) == 1 and (previous[0] / "checkpoint-6" / "model.keras").is_file()
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-6").exists()


def test_accumulation_token_budget_retention_milestones_and_final_model(tmp_path):
    out = tmp_path / "run"
    result = run_main([*tiny_model_flags(), "--gradient-accumulation-steps", "2", "--total-tokens", "1024",
                       "--log-every", "2", "--save-every", "1", "--save-total-limit", "2", "--milestone-every", "2",
                       "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "= 4 steps" in result.stdout
    train, _ = _metrics(out)
    assert [r["step"] for r in train] == [2, 4]
    assert all(r["loss"] < 6.0 for r in train), "the logged loss is a per-token mean, not a sum over micro-batches"
    # Retention keeps the newest two; milestones (the last step's too) and final_model are never pruned.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert sorted(p.name for p in out.glob("milestone-*")) == ["milestone-2", "milestone-4"]
    assert (out / "final_model" / "model.keras").samefile(out / "checkpoint-4" / "model.keras")
    assert "--save-total-limit 2: removed" in result.stdout


@pytest.mark.backends
def test_nano_trains_20_steps_with_falling_loss(tmp_path):
    out = tmp_path / "run"
    result = run_main(["--model-preset", "nano", "--max-steps", "20", "--batch-size", "8", "--log-every", "5",
                       "--eval-every", "20", "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    train, val = _metrics(out)
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    assert val[-1]["val_loss"] < val[0]["val_loss"]


def test_lora_fine_tune_from_a_checkpoint(tmp_path):
    base = tmp_path / "base"
    assert run_main([*tiny_model_flags(), "--max-steps", "2", "--output-dir", str(base)]).returncode == 0
    tuned = tmp_path / "tuned"
    result = run_main([*tiny_model_flags(), "--max-steps", "2", "--output-dir", str(tuned), "--init-from",
                       str(base / "checkpoint-2"), "--use-lora", "--lora-rank", "2", "--lora-alpha", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    # rank 2 on qkv (32 -> 96) and out (32 -> 32) in 2 layers: 2 * (2 * (32 + 96) + 2 * (32 + 32))
    assert "768 trainable (LoRA rank 2 on qkv, out; the base is frozen)" in result.stdout
    assert f"initialised from {base / 'checkpoint-2'}" in result.stdout
    assert (tuned / "checkpoint-2" / "lora_adapter.npz").is_file()
    assert (tuned / "checkpoint-2" / "lora_config.json").is_file()

    mismatch = run_main([*tiny_model_flags(), "--num-layers", "3", "--max-steps", "2", "--output-dir",
                         str(tmp_path / "x"), "--init-from", str(base / "checkpoint-2")])
    assert mismatch.returncode == 2
    assert "the checkpoint has num_layers=2 but this run builds num_layers=3" in mismatch.stderr


def test_best_checkpoint_eval_only_and_nonfinite_loss(tmp_path):
    out = tmp_path / "run"
    result = run_main([*tiny_model_flags(), "--max-steps", "4", "--eval-every", "2", "--log-every", "2",
                       "--learning-rate", "3e-3", "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    best = json.loads((out / "best_checkpoint" / "trainer_state.json").read_text())["step"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert best == summary["best_step"] and best in (2, 4)
    assert not list(out.glob(".best_checkpoint*")), "the superseded best copy is removed"

    evaluated = run_main([*tiny_model_flags(), "--eval-only", "--json", "--init-from", str(out / "checkpoint-4"),
                          "--output-dir", str(out)])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    record = json.loads(evaluated.stdout.strip().splitlines()[-1])
    _, val = _metrics(out)
    assert record["val_loss"] == pytest.approx(val[-1]["val_loss"], rel=1e-5)

    # Exit status 3 with one error line, no exception.
    blown = tmp_path / "blown"
    result = run_main([*tiny_model_flags(), "--max-steps", "30", "--log-every", "5", "--save-every", "5",
                       "--warmup-steps", "1", "--grad-clip", "0", "--learning-rate", "1e6", "--optimizer", "sgd",
                       "--output-dir", str(blown)])
    assert result.returncode == 3, result.stdout[-1500:]
    assert "became NaN or infinite after step" in result.stderr and "Traceback" not in result.stderr
    train, _ = _metrics(blown)
    assert all(np.isfinite(r["loss"]) for r in train)
    last_good = train[-1]["step"] if train else 0
    saved = sorted(blown.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    assert all(int(c.name.split("-")[1]) <= last_good for c in saved)
    assert (f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved before it") in result.stderr

    skipping = run_main([*tiny_model_flags(), "--max-steps", "30", "--log-every", "1", "--warmup-steps", "1",
                         "--grad-clip", "0", "--learning-rate", "1e6", "--optimizer", "sgd", "--skip-nonfinite", "3",
                         "--output-dir", str(tmp_path / "skipping")])
    assert skipping.returncode == 3, skipping.stdout[-1500:]
    assert "with NaN or inf gradients" in skipping.stdout and "of --skip-nonfinite 3 used" in skipping.stdout
    assert "(more than --skip-nonfinite 3 updates)" in skipping.stderr
    train, _ = _metrics(tmp_path / "skipping")
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"] or 0) for r in train)
    assert max(r["skipped_updates"] for r in train) <= 3


def test_eval_only_needs_a_checkpoint():
    result = run_main(["--eval-only", "--dry-run"])
    assert result.returncode == 2 and "--eval-only needs the checkpoint to evaluate" in result.stderr


def test_fit_and_evaluate_keep_the_allocator_settings_only_where_tuned():
    from ultimate_trainer.training import callbacks, trainer
    from ultimate_trainer.training.plan import ALLOCATOR_KEPT, Devices

    described = {"backend": "jax", "backend_version": "0", "keras_version": "3", "devices": {"cpu": 1},
                 "device_names": ["cpu"]}
    tuned = Devices.from_described(described, allocator_kept=True)
    assert [type(c) for c in trainer._allocator_callbacks(tuned)] == [callbacks.KeepAllocatorSettings]
    assert tuned.to_json()["host_allocator"] == ALLOCATOR_KEPT  # what --dry-run --json shows
    untouched = Devices.from_described(described)
    assert trainer._allocator_callbacks(untouched) == [] and untouched.to_json()["host_allocator"] == "as configured"


def test_trainer_parts_run_in_process_with_a_fake_clock(tmp_path, capsys):
    """The Trainer without the CLI: built from a plan, timed by the clock it is given."""
    from ultimate_trainer import distribution
    from ultimate_trainer.cli import parse_config
    from ultimate_trainer.training import trainer

    out = tmp_path / "run"
    cfg = parse_config([*tiny_model_flags(), "--max-steps", "2", "--log-every", "1", "--sample-tokens", "0",
                        "--distribution", "none", "--output-dir", str(out)])
    dist = distribution.setup(cfg)
    tokenizer, inputs = trainer.load_inputs(cfg)
    plan = trainer.build_plan(cfg, tokenizer, inputs, dist)
    ticks = iter([100.0, 142.5])  # the start of training, then its end
    run = trainer.Trainer(cfg, plan, tokenizer, inputs, dist, now=lambda: next(ticks))
    assert run.run() == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["wall_seconds"] == 42.5 and summary["steps"] == 2 and summary["best_step"] == 2
    assert summary["backend"]["host_allocator"] == "as configured"  # tune_allocator did not run here
    assert run.model.count_params() == plan.parameters.total and run.start_step == 0
    assert sorted(run.checkpoints.saved) == [2] and (out / "final_model").is_dir()
    assert "done: 2 steps in 42s" in capsys.readouterr().out
