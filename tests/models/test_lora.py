"""LoRA: freezing, exact counts, the adapter math, save/load and merge."""

import keras
import numpy as np
import pytest

from ultimate_trainer.errors import UserError
from ultimate_trainer.models import lora, sizing
from ultimate_trainer.models.causal_lm import CausalLM

pytestmark = pytest.mark.backends

ARGS = dict(vocab_size=40, seq_len=12, d_model=32, num_layers=2, num_heads=4, d_ff=48, num_kv_heads=2)


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    model = CausalLM(**ARGS)
    model.build((None, ARGS["seq_len"]))
    return model


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _randomise_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    for v in lora.lora_weights(model).values():
        v.assign(rng.normal(scale=0.1, size=v.shape).astype("float32"))


TOKENS = np.random.default_rng(0).integers(0, 40, (2, 12)).astype("int32")


@pytest.mark.parametrize("targets", [("qkv", "out"), ("qkv", "out", "up", "down"), ("down",)])
def test_freeze_and_exact_counts(targets):
    model = lora.enable_lora(_model(), rank=4, alpha=8, targets=targets)
    trainable = model.trainable_weights
    assert trainable and all("lora_kernel" in v.path for v in trainable)
    counts = sizing.count_params(sizing.Architecture(40, 32, 2, 4, 48, 12, num_kv_heads=2, lora_rank=4, lora_targets=targets))
    assert model.count_params() == counts.total
    assert sum(int(np.prod(v.shape)) for v in trainable) == counts.trainable


def test_adapter_math_matches_numpy():
    model = _model()
    dense = model.blocks[0].attention.qkv
    w = _np(dense.kernel).copy()
    lora.enable_lora(model, rank=3, alpha=6, targets=("qkv",))
    _randomise_adapters(model)
    a, b = _np(dense.lora_kernel_a), _np(dense.lora_kernel_b)
    x = np.random.default_rng(2).normal(size=(2, 5, 32)).astype("float32")
    np.testing.assert_allclose(_np(dense(x)), x @ (w + a @ b * 6 / 3), atol=1e-5)


def test_fit_moves_only_the_adapters():
    model = lora.enable_lora(_model(), rank=4, targets=("qkv", "out"))
    frozen = {v.path: _np(v).copy() for v in model.weights if "lora_kernel" not in v.path}
    adapters = {v.path: _np(v).copy() for v in model.trainable_weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(TOKENS, TOKENS, epochs=2, verbose=0)
    for v in model.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(_np(v), frozen[v.path])
    assert any(np.abs(_np(v) - adapters[v.path]).max() > 0 for v in model.trainable_weights)


def test_save_load_onto_base_and_merge(tmp_path):
    tuned = lora.enable_lora(_model(), rank=4, alpha=4, targets=("qkv", "up"))
    _randomise_adapters(tuned)
    expected = _np(tuned(TOKENS))
    lora.save_lora(tuned, tmp_path, 4, 4, ("qkv", "up"))

    base = _model()  # same seed: the same base weights
    assert np.abs(_np(base(TOKENS)) - expected).max() > 1e-4
    lora.load_lora(base, tmp_path)
    np.testing.assert_allclose(_np(base(TOKENS)), expected, atol=1e-5)

    merged = lora.merge_lora(tuned)
    assert not any("lora" in v.path for v in merged.weights)
    assert merged.count_params() == _model().count_params()
    np.testing.assert_allclose(_np(merged(TOKENS)), expected, atol=1e-5)


def test_saved_keras_model_keeps_the_merged_weights(tmp_path):
    tuned = lora.enable_lora(_model(), rank=2, targets=("out",))
    _randomise_adapters(tuned)
    tuned.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(_np(loaded(TOKENS)), _np(tuned(TOKENS)), atol=1e-5)


def test_adapter_errors(tmp_path):
    with pytest.raises(UserError, match="unknown target 'attn'"):
        lora.parse_targets("qkv,attn")
    with pytest.raises(UserError, match="holds no lora_config.json"):
        lora.load_lora(_model(), tmp_path)
    other = CausalLM(**dict(ARGS, num_layers=1))
    other.build((None, 12))
    lora.save_lora(lora.enable_lora(other, 4, targets=("qkv",)), tmp_path, 4, None, ("qkv",))
    with pytest.raises(UserError, match="does not fit this model"):
        lora.load_lora(_model(), tmp_path)
