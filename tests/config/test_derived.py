"""Derived values: what follows from a spec and its devices, without changing the spec."""

import pytest

from ultimate_trainer import config as config_lib
from ultimate_trainer.config import applied, batch_split, derive, resolve, resolve_config, resolve_spec
from ultimate_trainer.errors import UserError


@pytest.mark.parametrize("devices, batch, accumulation", [(8, 32, 1), (4, 32, 2), (2, 16, 8), (1, 16, 16)])
def test_the_batch_split_follows_the_device_table(devices, batch, accumulation):
    t = config_lib.TrainingConfig(global_batch_size=256, device_batch_sizes="1:16,2:16,4:32,8:32")
    split = batch_split(t, devices)
    assert (split.batch_size, split.gradient_accumulation_steps) == (batch, accumulation)
    assert split.global_batch == 256 and (t.batch_size, t.gradient_accumulation_steps) == (32, 1)  # t unchanged
    assert split.line == f"global batch 256 = {batch} per device x {devices} device(s) x {accumulation} accumulation steps"


def test_without_a_global_batch_the_split_is_as_given():
    split = batch_split(config_lib.TrainingConfig(batch_size=4, gradient_accumulation_steps=3), 2)
    assert (split.batch_size, split.gradient_accumulation_steps, split.global_batch, split.line) == (4, 3, 24, None)
    with pytest.raises(UserError, match="--global-batch-size 100 is not a multiple of --batch-size 32 x 2"):
        batch_split(config_lib.TrainingConfig(global_batch_size=100), 2)


def test_precision_default_follows_the_device_unless_given():
    spec = resolve_config({"model.model_preset": "nano"})
    assert not derive(spec).use_mixed_precision  # one CPU
    assert derive(spec, accel="gpu").use_mixed_precision
    assert not derive(spec, accel="gpu", bf16_missing="the T4 has no bfloat16").use_mixed_precision
    off = resolve_config({"model.model_preset": "nano", "optimization.use_mixed_precision": False})
    assert not derive(off, accel="tpu").use_mixed_precision
    on = resolve_config({"model.model_preset": "nano", "optimization.use_mixed_precision": True})
    assert derive(on).use_mixed_precision and derive(on, accel="gpu", bf16_missing="no").use_mixed_precision


def test_mamba_backbone_implies_shared_qk_and_gate_without_changing_the_spec():
    spec = resolve_spec({"model.ttt_layer_type": "linear", "model.ttt_backbone": "mamba"})
    d = derive(spec)
    assert (d.ttt_share_qk, d.ttt_use_gate) == (True, True)
    assert (spec.model.ttt_share_qk, spec.model.ttt_use_gate) == (False, False)
    trained = applied(spec, d)
    assert (trained.model.ttt_share_qk, trained.model.ttt_use_gate) == (True, True)
    plain = derive(resolve_spec({"model.ttt_layer_type": "linear"}))
    assert (plain.ttt_share_qk, plain.ttt_use_gate) == (False, False)
    # resolve_config hands out the spec with these in place, as training_args.json has always recorded them
    cfg = resolve_config({"model.ttt_layer_type": "mlp", "model.ttt_backbone": "mamba"})
    assert cfg.model.ttt_share_qk and cfg.model.ttt_use_gate


def test_stride_defaults_to_the_context_and_stays_as_given_in_the_spec():
    assert derive(resolve_config({"model.seq_len": 64})).stride == 64
    cfg = resolve_config({"model.seq_len": 64, "loader.stride": 16})
    assert derive(cfg).stride == 16 and applied(cfg, derive(cfg)).loader.stride == 16
    assert resolve_config({}).loader.stride is None


def test_applied_makes_a_new_spec_for_the_devices():
    spec = resolve_config({"model.model_preset": "nano", "training.global_batch_size": 64})
    assert (spec.training.batch_size, spec.training.gradient_accumulation_steps) == (32, 2)  # one device
    d = derive(spec, data_parallel=2, accel="gpu")
    trained = applied(spec, d)
    assert (trained.training.batch_size, trained.training.gradient_accumulation_steps) == (32, 1)
    assert trained.optimization.use_mixed_precision and trained.explicit == spec.explicit
    assert (spec.training.gradient_accumulation_steps, spec.optimization.use_mixed_precision) == (2, False)
    assert applied(trained, derive(trained, data_parallel=2, accel="gpu")) == trained  # deriving again changes nothing


def test_resolve_gives_the_spec_as_given_and_its_derived_values_apart():
    values = {"model.ttt_layer_type": "linear", "model.ttt_backbone": "mamba", "training.global_batch_size": 64,
              "model.model_preset": "nano"}
    spec, derived = resolve(values)
    assert (spec.model.ttt_share_qk, spec.training.gradient_accumulation_steps) == (False, 1)
    assert (derived.ttt_share_qk, derived.batch.gradient_accumulation_steps) == (True, 2)
    assert applied(spec, derived) == resolve_config(values)
