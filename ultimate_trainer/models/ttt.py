"""TTT layers: a sequence layer whose hidden state is a small model trained on
the sequence as it is read ("Learning to (Learn at Test Time): RNNs with
Expressive Hidden States", arXiv 2407.04620).

Per head the hidden state is an inner model f with weights W: a linear map
(TTT-Linear) or a two-layer MLP of width 4·head_dim with GELU (TTT-MLP). For
each token t the inner loss is ||LN(f(k_t)) - (v_t - k_t)||² / 2 (LN with a
learnable per-head scale and shift); the output is q_t + LN(f_t(q_t)), where
f_t has taken gradient steps on the tokens so far. Steps are taken per
mini-batch of K tokens (`mini_batch_size`): every gradient in a mini-batch is
taken at the weights the mini-batch started with, and token i of it sees
W_i = W_0 - Σ_{j≤i} η_ij ∇ℓ_j(W_0), with η_ij = token_scale_i · lr_j, where
lr_j = base_lr · sigmoid(x_j · w_h + b_h) / head_dim is the learnable inner
learning rate of token j and token_scale_i = 1/(i+1) plus a learnable offset.

Two equivalent ways to compute a mini-batch:
- the dual form (`_dual_*`): matrix products over the whole mini-batch, no
  per-token weights materialised; used for training and prefill;
- the primal form (`_primal_*`): per-token accumulated gradients; used for a
  trailing partial mini-batch and token-by-token decoding, whose state
  carries the mini-batch's starting weights and the gradient sums so far.

The tests check the dual form against an independent numpy primal loop.
Everything is `keras.ops` (`ops.scan` over mini-batches), on every backend.
"""

import math

import keras
from keras import ops

from ultimate_trainer import backend as backend_lib

KINDS = ("linear", "mlp")
DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}
_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + ops.tanh(_GELU_C * (x + 0.044715 * x**3)))


def gelu_tanh_grad(x):
    inner = _GELU_C * (x + 0.044715 * x**3)
    t = ops.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


def layer_norm(x, gamma, beta, eps=1e-6):
    mu = ops.mean(x, axis=-1, keepdims=True)
    var = ops.mean(ops.square(x - mu), axis=-1, keepdims=True)
    return gamma * (x - mu) / ops.sqrt(var + eps) + beta


def ln_l2_grad(z, target, gamma, beta, eps=1e-6):
    """∂/∂z of ||LN(z)·gamma + beta - target||² / 2, by hand (it sits inside the
    dual form, which needs the gradient as a tensor, not a tape)."""
    d = z.shape[-1]
    mu = ops.mean(z, axis=-1, keepdims=True)
    std = ops.sqrt(ops.mean(ops.square(z - mu), axis=-1, keepdims=True) + eps)
    z_hat = (z - mu) / std
    g_hat = (gamma * z_hat + beta - target) * gamma
    return (d * g_hat - ops.sum(g_hat, axis=-1, keepdims=True)
            - z_hat * ops.sum(g_hat * z_hat, axis=-1, keepdims=True)) / (d * std)


def _t(x):
    return ops.swapaxes(x, -1, -2)


def _tril(k, dtype):
    return ops.cast(ops.tril(ops.ones((k, k))), dtype)


# ---------------------------------------------------------------- dual form (a whole mini-batch)


def _dual_linear(state, xq, xk, xv, eta, gamma, beta):
    """One mini-batch of TTT-Linear. state = (W [B,h,f,f], b [B,h,1,f]);
    xq/xk/xv [B,h,K,f]; eta [B,h,K,K]. Returns (new state, z_bar [B,h,K,f])."""
    w, b = state
    mask = _tril(xk.shape[-2], xk.dtype)
    g = ln_l2_grad(ops.matmul(xk, w) + b, xv - xk, gamma, beta)
    b_bar = b - ops.matmul(eta * mask, g)
    z_bar = ops.matmul(xq, w) - ops.matmul(eta * mask * ops.matmul(xq, _t(xk)), g) + b_bar
    last = eta[..., -1, :, None]  # [B,h,K,1]: the last token's step sizes
    w_new = w - ops.matmul(_t(xk * last), g)
    b_new = b - ops.sum(last * g, axis=-2, keepdims=True)
    return (w_new, b_new), z_bar


def _dual_mlp(state, xq, xk, xv, eta, gamma, beta):
    """One mini-batch of TTT-MLP; state = (W1 [B,h,f,4f], b1, W2 [B,h,4f,f], b2)."""
    w1, b1, w2, b2 = state
    mask = _tril(xk.shape[-2], xk.dtype)
    z1 = ops.matmul(xk, w1) + b1
    x2 = gelu_tanh(z1)
    g2 = ln_l2_grad(ops.matmul(x2, w2) + b2, xv - xk, gamma, beta)
    g1 = ops.matmul(g2, _t(w2)) * gelu_tanh_grad(z1)
    z1_bar = ops.matmul(xq, w1) - ops.matmul(eta * mask * ops.matmul(xq, _t(xk)), g1) + b1 - ops.matmul(eta * mask, g1)
    x2_bar = gelu_tanh(z1_bar)
    z2_bar = ops.matmul(x2_bar, w2) - ops.matmul(eta * mask * ops.matmul(x2_bar, _t(x2)), g2) + b2 - ops.matmul(eta * mask, g2)
    last = eta[..., -1, :, None]
    new = (
        w1 - ops.matmul(_t(xk * last), g1),
        b1 - ops.sum(last * g1, axis=-2, keepdims=True),
        w2 - ops.matmul(_t(x2 * last), g2),
        b2 - ops.sum(last * g2, axis=-2, keepdims=True),
    )
    return new, z2_bar


# ---------------------------------------------------------------- primal form (token by token)


def _primal_linear(state, xq, xk, xv, token_scale, lr, gamma, beta):
    """Tokens of a mini-batch one at a time. state = (W0, b0, gW, gb): the weights the
    mini-batch started with and the lr-weighted gradient sums of its tokens so far.
    xq/xk/xv [B,h,n,f]; token_scale [n] and lr [B,h,n] for those tokens."""
    w0, b0, gw, gb = state
    outs = []
    for i in range(xk.shape[-2]):
        k, v, q = xk[..., i : i + 1, :], xv[..., i : i + 1, :], xq[..., i : i + 1, :]
        g = ln_l2_grad(ops.matmul(k, w0) + b0, v - k, gamma, beta) * lr[..., i, None, None]
        gw, gb = gw + ops.matmul(_t(k), g), gb + g
        outs.append(ops.matmul(q, w0 - token_scale[i] * gw) + b0 - token_scale[i] * gb)
    return (w0, b0, gw, gb), ops.concatenate(outs, axis=-2)


def _primal_mlp(state, xq, xk, xv, token_scale, lr, gamma, beta):
    w1, b1, w2, b2, gw1, gb1, gw2, gb2 = state
    outs = []
    for i in range(xk.shape[-2]):
        k, v, q = xk[..., i : i + 1, :], xv[..., i : i + 1, :], xq[..., i : i + 1, :]
        z1 = ops.matmul(k, w1) + b1
        x2 = gelu_tanh(z1)
        g2 = ln_l2_grad(ops.matmul(x2, w2) + b2, v - k, gamma, beta)
        g1 = ops.matmul(g2, _t(w2)) * gelu_tanh_grad(z1)
        step = lr[..., i, None, None]
        gw1, gb1 = gw1 + ops.matmul(_t(k), g1 * step), gb1 + g1 * step
        gw2, gb2 = gw2 + ops.matmul(_t(x2), g2 * step), gb2 + g2 * step
        s = token_scale[i]
        hidden = gelu_tanh(ops.matmul(q, w1 - s * gw1) + b1 - s * gb1)
        outs.append(ops.matmul(hidden, w2 - s * gw2) + b2 - s * gb2)
    return (w1, b1, w2, b2, gw1, gb1, gw2, gb2), ops.concatenate(outs, axis=-2)


def _rope_tables(k, head_dim, theta=10000.0):
    inv = 1.0 / (theta ** (ops.arange(0, head_dim, 2, dtype="float32") / head_dim))
    angles = ops.arange(k, dtype="float32")[:, None] * inv[None, :]
    return ops.cos(angles), ops.sin(angles)


def _rope(x, cos, sin):
    """Rotate-half RoPE; x [..., n, f], cos/sin [n, f/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = ops.cast(cos, x.dtype), ops.cast(sin, x.dtype)
    return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class TTTLayer(keras.layers.Layer):
    """The TTT sequence-modelling layer: projections, inner TTT model, post-norm, output.

    `call(x)` runs the dual form over whole mini-batches (`ops.scan`) and the
    primal form over a trailing partial one. `decode(x, state)` continues
    from a decoding state (`initial_state(batch)`) with the primal form and
    returns `(y, state)`; the state holds a Python position, so it is a
    method of its own rather than an argument of `call`.

    Example:
        >>> layer = TTTLayer(d_model=64, num_heads=4, kind="linear", mini_batch_size=8)
        >>> layer(np.zeros((2, 20, 64), "float32")).shape
        (2, 20, 64)
    """

    def __init__(self, d_model, num_heads, kind="linear", mini_batch_size=16, base_lr=None, use_gate=False,
                 share_qk=False, conv_kernel=4, rope_theta=10000.0, initializer_range=0.02,
                 output_initializer_range=0.02, **kwargs):
        super().__init__(**kwargs)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.d_model, self.num_heads, self.kind = d_model, num_heads, kind
        self.head_dim = d_model // num_heads
        self.mini_batch_size = mini_batch_size
        self.base_lr = DEFAULT_BASE_LR[kind] if base_lr is None else float(base_lr)
        self.use_gate, self.share_qk, self.conv_kernel = use_gate, share_qk, conv_kernel
        self.rope_theta = rope_theta
        self.initializer_range, self.output_initializer_range = initializer_range, output_initializer_range
        init = keras.initializers.RandomNormal(stddev=initializer_range)
        dense = dict(use_bias=False, kernel_initializer=init, dtype=self.dtype_policy)
        self.q_proj = keras.layers.Dense(d_model, name="q_proj", **dense)
        self.k_proj = None if share_qk else keras.layers.Dense(d_model, name="k_proj", **dense)
        self.v_proj = keras.layers.Dense(d_model, name="v_proj", **dense)
        if share_qk:  # the "(M)" models: Q and K share a projection and differ by a causal conv each
            conv = dict(kernel_size=conv_kernel, padding="valid", dtype=self.dtype_policy)  # causal: left-padded in call
            self.conv_q = keras.layers.DepthwiseConv1D(name="conv_q", **conv)
            self.conv_k = keras.layers.DepthwiseConv1D(name="conv_k", **conv)
        self.gate = keras.layers.Dense(d_model, name="gate", **dense) if use_gate else None
        self.post_norm = keras.layers.LayerNormalization(epsilon=1e-6, name="post_norm", dtype="float32")
        self.o_proj = keras.layers.Dense(
            d_model, name="o_proj", use_bias=False, dtype=self.dtype_policy,
            kernel_initializer=keras.initializers.RandomNormal(stddev=output_initializer_range))

    def build(self, input_shape):
        h, f, k = self.num_heads, self.head_dim, self.mini_batch_size
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.gate):
            if proj is not None:
                proj.build(input_shape)
        if self.share_qk:
            self.conv_q.build((None, None, self.d_model))
            self.conv_k.build((None, None, self.d_model))
        self.post_norm.build(input_shape)
        self.o_proj.build(input_shape)
        normal = keras.initializers.RandomNormal(stddev=self.initializer_range)
        # The inner loop runs in float32 under any policy: these weights are not autocast to bfloat16.
        self.lr_weight = self.add_weight((h, self.d_model), normal, name="lr_weight", autocast=False)
        self.lr_bias = self.add_weight((h,), "zeros", name="lr_bias", autocast=False)
        self.token_offset = self.add_weight((k,), "zeros", name="token_offset", autocast=False)
        self.ttt_gamma = self.add_weight((h, 1, f), "ones", name="ttt_norm_scale", autocast=False)
        self.ttt_beta = self.add_weight((h, 1, f), "zeros", name="ttt_norm_bias", autocast=False)
        inner = f if self.kind == "linear" else 4 * f
        self.w1 = self.add_weight((h, f, inner), normal, name="w1", autocast=False)
        self.b1 = self.add_weight((h, 1, inner), "zeros", name="b1", autocast=False)
        if self.kind == "mlp":
            self.w2 = self.add_weight((h, inner, f), normal, name="w2", autocast=False)
            self.b2 = self.add_weight((h, 1, f), "zeros", name="b2", autocast=False)

    # ---------------------------------------------------------------- pieces

    def _heads(self, x):
        b, n = ops.shape(x)[0], x.shape[1]
        return ops.transpose(ops.reshape(x, (b, n, self.num_heads, self.head_dim)), (0, 2, 1, 3))

    def _projections(self, x, history=None):
        """Q, K, V per head; with `--ttt-share-qk` also the last `conv_kernel - 1`
        shared projections, the causal convs' history (zeros before the first token)."""
        if not self.share_qk:
            return self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x)), None
        shared = self.q_proj(x)
        if history is None:
            history = ops.zeros((ops.shape(x)[0], self.conv_kernel - 1, self.d_model), shared.dtype)
        padded = ops.concatenate([ops.cast(history, shared.dtype), shared], axis=1)
        xq, xk = self.conv_q(padded), self.conv_k(padded)
        return self._heads(xq), self._heads(xk), self._heads(self.v_proj(x)), padded[:, -(self.conv_kernel - 1):]

    def _lr(self, x):
        """The learnable inner learning rate per token and head: [B, h, n]."""
        logits = ops.einsum("bnd,hd->bhn", ops.cast(x, "float32"), ops.cast(self.lr_weight, "float32"))
        return self.base_lr * ops.sigmoid(logits + self.lr_bias[None, :, None]) / self.head_dim

    def _token_scale(self):
        k = self.mini_batch_size
        return ops.maximum(1.0 / ops.arange(1, k + 1, dtype="float32") + self.token_offset, 0.0)

    def _params(self, batch):
        names = ("w1", "b1") if self.kind == "linear" else ("w1", "b1", "w2", "b2")
        return tuple(ops.broadcast_to(getattr(self, n)[None], (batch,) + tuple(getattr(self, n).shape))
                     for n in names)

    def initial_state(self, batch):
        """The decoding state before any token: the layer's inner weights, zero
        gradient sums, and position 0 in the mini-batch."""
        params = self._params(batch)
        return {"params": params, "grads": tuple(ops.zeros_like(p) for p in params), "position": 0,
                "conv": None}  # the share-QK convs' history, set by the first `decode`

    def _output(self, x, z):
        """Inner output z [B,h,n,f] -> layer output [B,n,d]."""
        b, n = ops.shape(x)[0], x.shape[1]
        y = ops.reshape(ops.transpose(z, (0, 2, 1, 3)), (b, n, self.d_model))
        y = self.post_norm(y)
        if self.gate is not None:
            y = gelu_tanh(ops.cast(self.gate(x), "float32")) * y
        return self.o_proj(ops.cast(y, self.compute_dtype))

    # ---------------------------------------------------------------- forward

    def call(self, x, state=None, return_state=False):
        """`state`: where the previous window of the same stream left off (a tuple
        as `return_state` gives, see `window_state`); by default the start of a
        stream. Gradients flow into a given state: stop them for truncated
        backpropagation. With `return_state`, returns `(y, state)`: the inner
        weights after the last whole mini-batch (and the share-QK convs' last
        inputs), the state the next window starts from.
        """
        n_params = 2 if self.kind == "linear" else 4
        history = state[n_params] if state is not None and self.share_qk else None
        xq, xk, xv, history = self._projections(x, history)
        xq, xk, xv = (ops.cast(t, "float32") for t in (xq, xk, xv))  # the inner loop runs in float32
        lr = self._lr(x)
        scale = self._token_scale()
        n, k = x.shape[1], self.mini_batch_size
        full = (n // k) * k
        cos, sin = _rope_tables(k, self.head_dim, self.rope_theta)
        gamma, beta = ops.cast(self.ttt_gamma, "float32"), ops.cast(self.ttt_beta, "float32")
        if state is None:
            params = tuple(ops.cast(p, "float32") for p in self._params(ops.shape(x)[0]))
        else:
            params = tuple(ops.cast(p, "float32") for p in state[:n_params])
        outputs = []
        if full:
            m = full // k

            def blocks(t):  # [B,h,full,f] -> [m, B,h,K,f]
                b_, h_, _, f_ = ops.shape(t)[0], t.shape[1], t.shape[2], t.shape[3]
                return ops.transpose(ops.reshape(t[:, :, :full], (b_, h_, m, k, f_)), (2, 0, 1, 3, 4))

            q_blocks = _rope(blocks(xq), cos, sin)
            k_blocks = _rope(blocks(xk), cos, sin)
            v_blocks = blocks(xv)
            lr_blocks = ops.transpose(ops.reshape(lr[:, :, :full], (ops.shape(lr)[0], self.num_heads, m, k)),
                                      (2, 0, 1, 3))
            dual = _dual_linear if self.kind == "linear" else _dual_mlp

            def step(carry, inputs):
                q, k_, v, lr_ = inputs
                eta = scale[:, None] * lr_[..., None, :]  # [B,h,K,K]: token_scale_i · lr_j
                carry, z = dual(carry, q, k_, v, eta, gamma, beta)
                return carry, q + layer_norm(z, gamma, beta)

            params, z = backend_lib.scan(step, params, (q_blocks, k_blocks, v_blocks, lr_blocks),
                                         ops.zeros_like(q_blocks[0]))
            z = ops.transpose(z, (1, 2, 0, 3, 4))
            outputs.append(ops.reshape(z, (ops.shape(z)[0], self.num_heads, full, self.head_dim)))
        if n > full:
            rest = n - full
            q = _rope(xq[:, :, full:], cos[:rest], sin[:rest])
            k_ = _rope(xk[:, :, full:], cos[:rest], sin[:rest])
            primal = _primal_linear if self.kind == "linear" else _primal_mlp
            _, z = primal(params + tuple(ops.zeros_like(p) for p in params), q, k_, xv[:, :, full:],
                          scale[:rest], lr[:, :, full:], gamma, beta)
            outputs.append(q + layer_norm(z, gamma, beta))
        z = outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=2)
        y = self._output(x, z)
        if not return_state:
            return y
        return y, params + ((ops.cast(history, "float32"),) if self.share_qk else ())

    def window_state(self, batch):
        """The state at the start of a stream, in the form `call(state=...)`
        takes: the learned inner weights per row (and zeroed conv history)."""
        params = tuple(ops.cast(p, "float32") for p in self._params(batch))
        if self.share_qk:
            params += (ops.zeros((batch, self.conv_kernel - 1, self.d_model), "float32"),)
        return params

    def decode(self, x, state):
        """Tokens x [B,n,d] after `state`, with the primal form; returns (y, state)."""
        xq, xk, xv, history = self._projections(x, state["conv"])
        xq, xk, xv = (ops.cast(t, "float32") for t in (xq, xk, xv))
        lr = self._lr(x)
        scale = self._token_scale()
        cos, sin = _rope_tables(self.mini_batch_size, self.head_dim, self.rope_theta)
        gamma, beta = ops.cast(self.ttt_gamma, "float32"), ops.cast(self.ttt_beta, "float32")
        primal = _primal_linear if self.kind == "linear" else _primal_mlp
        params, grads, position = state["params"], state["grads"], state["position"]
        outs = []
        for i in range(x.shape[1]):
            p = position % self.mini_batch_size
            q = _rope(xq[:, :, i : i + 1], cos[p : p + 1], sin[p : p + 1])
            k_ = _rope(xk[:, :, i : i + 1], cos[p : p + 1], sin[p : p + 1])
            carry, z = primal(params + grads, q, k_, xv[:, :, i : i + 1], scale[p : p + 1], lr[:, :, i : i + 1],
                              gamma, beta)
            params, grads = carry[: len(params)], carry[len(params):]
            outs.append(q + layer_norm(z, gamma, beta))
            position += 1
            if position % self.mini_batch_size == 0:  # the mini-batch is complete: take its step
                s = scale[self.mini_batch_size - 1]
                params = tuple(w - s * g for w, g in zip(params, grads))
                grads = tuple(ops.zeros_like(g) for g in grads)
        y = self._output(x, ops.concatenate(outs, axis=2))
        return y, {"params": params, "grads": grads, "position": position, "conv": history}

    def get_config(self):
        config = super().get_config()
        config.update(d_model=self.d_model, num_heads=self.num_heads, kind=self.kind,
                      mini_batch_size=self.mini_batch_size, base_lr=self.base_lr, use_gate=self.use_gate,
                      share_qk=self.share_qk, conv_kernel=self.conv_kernel, rope_theta=self.rope_theta,
                      initializer_range=self.initializer_range,
                      output_initializer_range=self.output_initializer_range)
        return config
