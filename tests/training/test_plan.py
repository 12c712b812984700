"""The typed plan in process: its numbers, its JSON (the keys `--dry-run --json` users parse),
frozen once built, and its errors."""

import dataclasses
import json

import pytest

from ultimate_trainer.config import resolve_config
from ultimate_trainer.data.inputs import StreamInputs
from ultimate_trainer.data.tokenizers import ByteTokenizer
from ultimate_trainer.errors import UserError
from ultimate_trainer.training.plan import Devices, Plan, format_plan, make_plan

TINY = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64, "model.seq_len": 16,
        "training.batch_size": 2}
TEXT = "def add(a, b):\n    return a + b\n" * 4


def _inputs(cfg, train=20, val=4, rows=None, val_text=TEXT):
    return StreamInputs([TEXT] * train, [val_text] * val, ByteTokenizer(), "test records", cfg.model.seq_len,
                        cfg.loader.stride, 100, rows)


def _plan(overrides=None, data_parallel=1, **inputs):
    cfg = resolve_config({**TINY, **(overrides or {})})
    return make_plan(cfg, ByteTokenizer(), _inputs(cfg, **inputs), data_parallel=data_parallel), cfg


def test_the_numbers_follow_the_flags():
    plan, _ = _plan({"training.max_steps": 10, "training.gradient_accumulation_steps": 3,
                     "training.warmup_steps": 2}, data_parallel=2)
    s, d = plan.schedule, plan.data
    assert (s.total_steps, s.global_batch_size, s.tokens_per_step) == (10, 2 * 2 * 3, 2 * 2 * 3 * 16)
    assert s.total_tokens == 10 * s.tokens_per_step and s.total_flops == s.total_tokens * plan.flops_per_token
    assert s.lr_schedule == {"peak": s.learning_rate, "end": s.lr_end, "warmup_steps": 2, "total_steps": 10}
    assert d.window == 17 and d.eval_batch_size == 4  # windows of seq_len + 1; one micro-batch over 2 devices
    assert d.val_tokens == 4 * (len(TEXT) + 1)  # each record ends with EOS
    assert d.val_windows == d.val_tokens // 17 and d.eval_batches == d.val_windows // 4  # whole batches only
    assert plan.parameters.trainable == plan.parameters.total and plan.architecture["num_layers"] == 2


def test_json_keeps_the_keys_users_parse():
    plan, _ = _plan({"training.max_steps": 4})
    devices = Devices("jax", "0.4", "3.6", {"cpu": 1}, ["cpu"], allocator_kept=True, chosen_by="KERAS_BACKEND")
    plan = dataclasses.replace(plan, devices=devices, distribution={"mode": "none"},
                               peak_flops={"total": 1e9, "per_device": 1e9, "source": "--peak-flops"})
    found = json.loads(json.dumps(plan.to_json()))
    assert list(found) == ["architecture", "parameters", "flops_per_token", "data", "schedule", "sizing", "notes",
                           "distribution", "backend", "peak_flops"]
    assert set(found["parameters"]) == {"total", "non_embedding", "embedding", "trainable", "active"}
    assert set(found["data"]) == {"kind", "source", "train_records", "val_records", "tokenizer",
                                  "train_tokens_per_epoch", "val_tokens", "window", "window_step",
                                  "windows_per_epoch", "val_windows", "eval_batches", "eval_batch_size"}
    assert set(found["schedule"]) == {"rule", "total_steps", "steps_per_epoch", "epochs", "batch_size",
                                      "data_parallel", "global_batch_size", "gradient_accumulation_steps",
                                      "tokens_per_step", "total_tokens", "total_flops", "learning_rate", "lr_end",
                                      "warmup_steps", "optimizer", "lr_schedule"}
    assert list(found["backend"]) == ["backend", "backend_version", "keras_version", "devices", "device_names",
                                      "host_allocator", "chosen_by"]
    assert found["backend"] == {"backend": "jax", "backend_version": "0.4", "keras_version": "3.6",
                                "devices": {"cpu": 1}, "device_names": ["cpu"],
                                "host_allocator": "kept freed memory (glibc mallopt)", "chosen_by": "KERAS_BACKEND"}
    assert found["data"]["kind"] == "stream" and found["data"]["train_records"] == 20
    assert "resume" not in found, "a plan that resumes nothing has no resume section"


def test_a_plan_is_frozen_and_a_resume_makes_a_new_one():
    plan, _ = _plan({"training.max_steps": 8})
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.schedule.total_steps = 9
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.notes = ()
    continued = {"peak": 1e-3, "end": 1e-4, "warmup_steps": 1, "total_steps": 8, "from_step": 4, "from_lr": 5e-4}
    resumed = plan.resumed({"checkpoint": "out/checkpoint-4", "step": 4, "data": {"next_window": 32, "epoch": 0}},
                           continued)
    assert resumed.schedule.lr_schedule == continued and resumed.to_json()["resume"]["step"] == 4
    assert plan.resume is None and plan.schedule.lr_schedule["total_steps"] == 8
    assert "resume: out/checkpoint-4 at step 4 (data window 32, epoch 0); 4 steps to go" in format_plan(resumed)


def test_notes_come_in_order_and_device_notes_last():
    cfg = resolve_config({**TINY, "training.max_steps": 4, "training.warmup_steps": 50, "model.use_lora": True})
    plan = make_plan(cfg, ByteTokenizer(), _inputs(cfg), notes=[None, "device defaults (gpu): ..."])
    assert plan.notes[0].startswith("--warmup-steps 50 is not shorter than the run")
    assert plan.notes[1].startswith("--use-lora without --init-from")
    assert plan.notes[2] == "device defaults (gpu): ..." and len(plan.notes) == 3
    assert format_plan(plan)[-1] == "note: device defaults (gpu): ..."


def test_epochs_set_the_length_when_no_steps_are_given():
    plan, _ = _plan({"training.epochs": 2})
    s = plan.schedule
    assert s.total_steps == 2 * s.steps_per_epoch and s.epochs == 2
    assert s.steps_per_epoch == plan.data.windows_per_epoch // 2


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(UserError, match="fewer than one window of 17; raise --val-fraction"):
        make_plan(resolve_config({**TINY, "training.max_steps": 2}), ByteTokenizer(),
                  StreamInputs([TEXT] * 20, ["tiny"], ByteTokenizer(), "t", 16, None, 100))
    with pytest.raises(UserError, match="fewer than the 4 data-parallel devices"):
        _plan({"training.max_steps": 2, "training.batch_size": 4}, data_parallel=4, val=1, val_text="x" * 50)
    with pytest.raises(UserError, match="fewer than one step of"):
        _plan({"training.batch_size": 64}, train=1)


def test_plan_is_its_own_type():
    plan, _ = _plan({"training.max_steps": 2})
    assert isinstance(plan, Plan) and plan.devices is None and plan.peak_flops is None
