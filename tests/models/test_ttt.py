"""TTT layers against an independent primal reference: per-token gradient
steps with the inner gradient from jax.grad (not the layer's hand-written
gradients), in numpy/jax, whatever the Keras backend."""

import numpy as np
import pytest

import keras

from ultimate_trainer.models.ttt import TTTLayer

pytestmark = pytest.mark.backends


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v), dtype="float64")


def _ln(x, gamma, beta, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return gamma * (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) + beta


def _rope(x, positions, theta=10000.0):
    half = x.shape[-1] // 2
    inv = 1.0 / theta ** (np.arange(0, x.shape[-1], 2) / x.shape[-1])
    angle = positions[:, None] * inv[None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def reference(layer, x):
    """The TTT layer's output by the primal definition, token by token."""
    import jax
    import jax.numpy as jnp

    b_, n, d = x.shape
    h, f, k_size = layer.num_heads, layer.head_dim, layer.mini_batch_size

    def heads(t):
        return t.reshape(b_, n, h, f).transpose(0, 2, 1, 3)

    q, k, v = (heads(x @ _np(p.kernel)) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    pos = np.arange(n) % k_size
    q, k = _rope(q, pos), _rope(k, pos)
    lr = layer.base_lr / (1 + np.exp(-(np.einsum("bnd,hd->bhn", x, _np(layer.lr_weight)) + _np(layer.lr_bias)[None, :, None]))) / f
    scale = np.maximum(1.0 / np.arange(1, k_size + 1) + _np(layer.token_offset), 0.0)
    gamma, beta = _np(layer.ttt_gamma)[:, 0], _np(layer.ttt_beta)[:, 0]
    names = ["w1", "b1"] + (["w2", "b2"] if layer.kind == "mlp" else [])

    def inner(params, t):
        z = t @ params["w1"] + params["b1"][0]
        if layer.kind == "mlp":
            z = jax.nn.gelu(z, approximate=True) @ params["w2"] + params["b2"][0]
        return z

    def loss(params, kt, vt, g, bb):
        z = inner(params, kt)
        mu = z.mean()
        ln = g * (z - mu) / jnp.sqrt(((z - mu) ** 2).mean() + 1e-6) + bb
        return 0.5 * jnp.sum((ln - (vt - kt)) ** 2)

    grad = jax.grad(loss)
    out = np.zeros_like(q)
    for bi in range(b_):
        for hi in range(h):
            params = {nm: _np(getattr(layer, nm))[hi] for nm in names}
            for start in range(0, n, k_size):
                sums = {nm: np.zeros_like(p) for nm, p in params.items()}
                for t in range(start, min(start + k_size, n)):
                    g = grad({nm: jnp.asarray(p) for nm, p in params.items()}, k[bi, hi, t], v[bi, hi, t],
                             gamma[hi], beta[hi])
                    for nm in names:
                        sums[nm] += lr[bi, hi, t] * np.asarray(g[nm], dtype="float64")
                    now = {nm: params[nm] - scale[t - start] * sums[nm] for nm in names}
                    z = np.asarray(inner({nm: jnp.asarray(p) for nm, p in now.items()}, q[bi, hi, t]), "float64")
                    out[bi, hi, t] = q[bi, hi, t] + _ln(z, gamma[hi], beta[hi])
                params = now
    y = out.transpose(0, 2, 1, 3).reshape(b_, n, d)
    y = _ln(y, _np(layer.post_norm.gamma), _np(layer.post_norm.beta))
    return y @ _np(layer.o_proj.kernel)


def _layer(kind, **kw):
    keras.utils.set_random_seed(7)
    layer = TTTLayer(d_model=16, num_heads=2, kind=kind, mini_batch_size=4, **kw)
    layer.build((None, None, 16))
    # Larger inner weights and offsets than the 0.02 init, so every term matters.
    rng = np.random.default_rng(0)
    for var in (layer.w1, layer.lr_weight, layer.token_offset, layer.ttt_beta) + ((layer.w2,) if kind == "mlp" else ()):
        var.assign(rng.normal(0, 0.3, var.shape).astype("float32"))
    for proj in [p for p in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj) if p is not None]:
        proj.kernel.assign(rng.normal(0, 0.3, proj.kernel.shape).astype("float32"))
    return layer


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_dual_form_equals_the_primal_definition(kind):
    layer = _layer(kind)
    x = np.random.default_rng(1).normal(size=(2, 11, 16)).astype("float32")  # two mini-batches and a partial
    got = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(got, reference(layer, x.astype("float64")), atol=1e-5, rtol=1e-4)


# Decoding token by token and in pieces against the parallel forward: tests/models/test_harness.py.


def test_config_round_trips():
    layer = TTTLayer(d_model=32, num_heads=4, kind="mlp", mini_batch_size=8, use_gate=True, name="ttt")
    again = TTTLayer.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert layer.base_lr == 0.1 and TTTLayer(d_model=32, num_heads=4).base_lr == 1.0
    with pytest.raises(ValueError, match="kind must be one of"):
        TTTLayer(d_model=32, num_heads=4, kind="conv")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradients_are_finite_and_match_finite_differences(kind):
    layer = _layer(kind, use_gate=True)
    model = keras.Sequential([keras.Input((6, 16)), layer])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    x = np.random.default_rng(3).normal(size=(2, 6, 16)).astype("float32")
    target = np.zeros((2, 6, 16), "float32")

    def loss():
        return float(np.mean(np.asarray(keras.ops.convert_to_numpy(model(x)), "float64") ** 2))

    probes = [(layer.lr_bias, (0,)), (layer.token_offset, (1,)), (layer.w1, (0, 1, 2)), (layer.ttt_gamma, (1, 0, 3)),
              (layer.q_proj.kernel, (3, 5))]
    numeric = []
    for var, index in probes:
        value = np.array(keras.ops.convert_to_numpy(var))
        diffs = []
        for sign in (1, -1):
            bumped = value.copy()
            bumped[index] += sign * 1e-2
            var.assign(bumped)
            diffs.append(loss())
        var.assign(value)
        numeric.append((diffs[0] - diffs[1]) / 2e-2)
    before = [np.array(keras.ops.convert_to_numpy(v)) for v, _ in probes]
    model.fit(x, target, batch_size=2, epochs=1, verbose=0)  # SGD(1.0): the step is minus the gradient
    for (var, index), old, want in zip(probes, before, numeric):
        got = old[index] - np.array(keras.ops.convert_to_numpy(var))[index]
        assert np.isfinite(got)
        assert got == pytest.approx(want, rel=2e-2, abs=1e-6), (var.path, got, want)


@pytest.mark.parametrize("kw", [{}, {"share_qk": True, "use_gate": True}])
def test_the_layer_is_causal(kw):
    keras.utils.set_random_seed(4)
    layer = TTTLayer(d_model=16, num_heads=2, kind="mlp", mini_batch_size=4, **kw)
    x = np.random.default_rng(5).normal(size=(1, 12, 16)).astype("float32")
    changed = x.copy()
    changed[:, 6:] += 1.0
    a, b = (keras.ops.convert_to_numpy(layer(v)) for v in (x, changed))
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3
