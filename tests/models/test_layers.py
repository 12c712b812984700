"""Each layer against the numpy reference in tests/models/reference.py."""

import keras
import numpy as np
import pytest

from tests.models import reference as ref
from ultimate_trainer.models.attention import CausalSelfAttention
from ultimate_trainer.models.causal_lm import CausalLM
from ultimate_trainer.models.feed_forward import FeedForward
from ultimate_trainer.models.transformer_block import TransformerBlock

pytestmark = pytest.mark.backends
ATOL = 1e-5


def _np(x):
    return keras.ops.convert_to_numpy(x).astype("float64")


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.mark.parametrize("num_kv_heads,use_rope", [(4, True), (2, True), (1, True), (4, False)])
def test_attention_matches_numpy(num_kv_heads, use_rope):
    x = _rand(2, 12, 64)
    layer = CausalSelfAttention(num_heads=4, head_dim=16, num_kv_heads=num_kv_heads, use_rope=use_rope)
    layer.build(x.shape)
    layer.qkv.kernel.assign(_rand(*layer.qkv.kernel.shape, seed=1) * 0.2)
    layer.out.kernel.assign(_rand(*layer.out.kernel.shape, seed=2) * 0.2)
    expected = ref.causal_attention(
        x.astype("float64"), _np(layer.qkv.kernel), _np(layer.out.kernel), 4, num_kv_heads, use_rope
    )
    np.testing.assert_allclose(_np(layer(x)), expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("use_swiglu,activation", [(True, "gelu"), (False, "gelu"), (False, "relu"), (False, "silu")])
def test_feed_forward_matches_numpy(use_swiglu, activation):
    x = _rand(2, 5, 32)
    layer = FeedForward(hidden_dim=48, use_swiglu=use_swiglu, activation=activation)
    layer.build(x.shape)
    layer.up.kernel.assign(_rand(*layer.up.kernel.shape, seed=3) * 0.3)
    layer.down.kernel.assign(_rand(*layer.down.kernel.shape, seed=4) * 0.3)
    expected = ref.feed_forward(x.astype("float64"), _np(layer.up.kernel), _np(layer.down.kernel), use_swiglu, activation)
    np.testing.assert_allclose(_np(layer(x)), expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("use_swiglu", [True, False])
def test_biased_projections_match_numpy(use_swiglu):
    """`use_bias` (GPT-2): every projection adds its bias; random biases, not the zero init."""
    x = _rand(2, 6, 32)
    attention = CausalSelfAttention(num_heads=4, head_dim=8, use_rope=False, use_bias=True)
    mlp = FeedForward(hidden_dim=40, use_swiglu=use_swiglu, use_bias=True)
    for i, layer in enumerate((attention, mlp)):
        layer.build(x.shape)
        for j, w in enumerate(layer.weights):
            w.assign(_rand(*w.shape, seed=20 + 10 * i + j) * 0.3)
    assert [w.path.rsplit("/", 2)[-2:] for w in mlp.weights] == [
        ["gate_up" if use_swiglu else "up", "kernel"], ["gate_up" if use_swiglu else "up", "bias"],
        ["down", "kernel"], ["down", "bias"]]
    x64 = x.astype("float64")
    a, m = attention, mlp
    expected = ref.causal_attention(x64, _np(a.qkv.kernel), _np(a.out.kernel), 4, 4, False,
                                    _np(a.qkv.bias), _np(a.out.bias))
    np.testing.assert_allclose(_np(attention(x)), expected, atol=ATOL, rtol=1e-4)
    expected = ref.feed_forward(x64, _np(m.up.kernel), _np(m.down.kernel), use_swiglu, "gelu",
                                _np(m.up.bias), _np(m.down.bias))
    np.testing.assert_allclose(_np(mlp(x)), expected, atol=ATOL, rtol=1e-4)


def test_biases_start_at_zero_and_only_where_asked():
    biased = _small_lm(use_bias=True, use_rope=False, use_rmsnorm=False, use_swiglu=False)
    dense_biases = [w for w in biased.weights if w.path.endswith("/bias")]
    assert {w.path.split("/", 2)[-1] for w in dense_biases} == {
        "attention/qkv/bias", "attention/out/bias", "mlp/up/bias", "mlp/down/bias"}
    assert all(not _np(w).any() for w in dense_biases)
    assert not [w for w in _small_lm(use_rmsnorm=False).weights if w.path.endswith("/bias")]


def test_every_biased_weight_has_a_layout_rule():
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), ["cpu:0"])  # a layout map needs no devices
    layout_map = CausalLM.get_layout_map(mesh, fsdp=True)
    model = _small_lm(use_bias=True, use_rope=False, use_rmsnorm=False, use_swiglu=False)
    assert [w.path for w in model.weights if layout_map[w.path] is None] == []
    assert layout_map["causal_lm/block_0/attention/qkv/bias"].axes == ("model",)
    assert layout_map["causal_lm/block_0/mlp/down/bias"].axes == ()


@pytest.mark.parametrize("use_rmsnorm", [True, False])
def test_block_matches_numpy(use_rmsnorm):
    x = _rand(1, 7, 32)
    block = TransformerBlock(num_heads=2, head_dim=16, d_ff=40, use_rmsnorm=use_rmsnorm, use_rope=use_rmsnorm,
                             use_swiglu=use_rmsnorm)
    block.build(x.shape)
    for i, w in enumerate(block.weights):
        w.assign(_rand(*w.shape, seed=10 + i) * 0.2 + (1.0 if w.name in ("scale", "gamma") else 0.0))

    def norm(layer, h):
        if use_rmsnorm:
            return ref.rms_norm(h, _np(layer.scale))
        return ref.layer_norm(h, _np(layer.gamma), _np(layer.beta))

    x64 = x.astype("float64")
    a = block.attention
    h = x64 + ref.causal_attention(norm(block.attention_norm, x64), _np(a.qkv.kernel), _np(a.out.kernel), 2, 2, use_rmsnorm)
    m = block.mlp
    expected = h + ref.feed_forward(norm(block.mlp_norm, h), _np(m.up.kernel), _np(m.down.kernel), use_rmsnorm, "gelu")
    np.testing.assert_allclose(_np(block(x, training=False)), expected, atol=1e-4, rtol=1e-4)


def _small_lm(**kwargs):
    args = dict(vocab_size=50, seq_len=16, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    args.update(kwargs)
    model = CausalLM(**args)
    model.build((None, args["seq_len"]))
    return model


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_causality_changing_token_t_changes_no_earlier_logits(style):
    kwargs = {} if style == "llama" else dict(use_rope=False, use_rmsnorm=False, use_swiglu=False, use_bias=True)
    model = _small_lm(**kwargs)
    tokens = np.random.default_rng(0).integers(0, 50, (1, 16)).astype("int32")
    changed = tokens.copy()
    changed[0, 9] = (changed[0, 9] + 1) % 50
    a, b = _np(model(tokens)), _np(model(changed))
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-4


def test_tied_embeddings_share_the_table():
    model = _small_lm(tie_embeddings=True)
    x = np.arange(16, dtype="int32")[None]
    hidden = model.token_embedding.embeddings
    assert all("reverse" not in w.path for w in model.weights)
    assert model.count_params() == _small_lm().count_params() - 50 * 32
    logits = _np(model(x))
    assert logits.shape == (1, 16, 50) and np.isfinite(logits).all()
    assert hidden.shape == (50, 32)


def test_residual_projections_use_scaled_init():
    model = _small_lm(num_layers=8, d_model=64, d_ff=256)
    qkv = _np(model.blocks[0].attention.qkv.kernel).std()
    out = _np(model.blocks[0].attention.out.kernel).std()
    down = _np(model.blocks[0].mlp.down.kernel).std()
    assert abs(qkv - 0.02) < 0.003
    assert abs(out - 0.02 / np.sqrt(16)) < 0.001 and abs(down - 0.02 / np.sqrt(16)) < 0.001


# Each layer's config round trip: tests/models/test_harness.py.


@pytest.mark.parametrize("use_bias", [False, True])
def test_model_config_round_trip_and_keras_save(tmp_path, use_bias):
    model = _small_lm(num_kv_heads=2, tie_embeddings=True, use_bias=use_bias)
    assert model.get_config()["use_bias"] is use_bias
    clone = CausalLM.from_config(model.get_config())
    assert clone.get_config() == model.get_config()
    x = np.arange(16, dtype="int32")[None]
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(_np(loaded(x)), _np(model(x)), atol=1e-6)


# A float32 fit step: tests/models/test_harness.py.
@pytest.mark.parametrize("policy", ["mixed_bfloat16"])
def test_fit_step_in_each_precision(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _small_lm()
        model.compile(optimizer="adamw", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.random.default_rng(0).integers(0, 50, (4, 16)).astype("int32")
        history = model.fit(x, x, epochs=3, batch_size=4, verbose=0)
        losses = history.history["loss"]
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
        assert model(x).dtype == "float32" or str(model(x).dtype).endswith("float32")
    finally:
        keras.mixed_precision.set_global_policy("float32")
