"""The Mamba-style pre-convolution against numpy: RMSNorm, then a causal depthwise conv."""

import numpy as np
import pytest

import keras

from ultimate_trainer.models.pre_conv import PreConv


def reference(x, scale, kernel, bias, history=None):
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale
    k = kernel.shape[0]
    past = np.zeros((x.shape[0], k - 1, x.shape[2])) if history is None else history
    padded = np.concatenate([past, normed], axis=1)
    out = np.zeros_like(x)
    for t in range(x.shape[1]):  # output t sees normalised inputs t-k+1 .. t
        out[:, t] = np.einsum("bkd,kd->bd", padded[:, t : t + k], kernel) + bias
    return out


@pytest.mark.backends
def test_pre_conv_matches_numpy_and_continues_from_its_history():
    rng = np.random.default_rng(0)
    conv = PreConv(d_model=6, name="pre_conv")
    conv.build((None, None, 6))
    conv.norm.set_weights([rng.normal(size=6).astype("float32")])
    conv.conv.set_weights([rng.normal(size=(4, 6, 1)).astype("float32"), rng.normal(size=6).astype("float32")])
    scale = conv.norm.get_weights()[0]
    kernel, bias = conv.conv.get_weights()
    x = rng.normal(size=(2, 9, 6)).astype("float32")
    want = reference(x.astype("float64"), scale, kernel[:, :, 0], bias)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(conv(x)), want, atol=1e-5)
    first, state = conv(x[:, :5], state=conv.initial_state(2))
    rest, _ = conv(x[:, 5:], state=state)
    np.testing.assert_allclose(np.concatenate([keras.ops.convert_to_numpy(first), keras.ops.convert_to_numpy(rest)], 1),
                               want, atol=1e-5)
    again = PreConv.from_config(conv.get_config())
    assert again.get_config() == conv.get_config()
