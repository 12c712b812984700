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

from ultimate_trainer.backend import scan

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


def _take(inputs, start, stop):
    """Tokens start:stop of (xq, xk, xv [B,h,n,f], lr [B,h,n])."""
    return tuple(t[:, :, start:stop] for t in inputs)


def _row(table, p):
    """table[p:p+1] for an int or a traced position."""
    if isinstance(p, int):
        return table[p : p + 1]
    return ops.take(table, ops.reshape(ops.cast(p, "int32"), (1,)), axis=0)


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
    primal form over a trailing partial one. `call(x, state, position)`
    continues a state (`initial_state`) and returns `(y, state)`: windows of
    a stream in training, a prompt and then single tokens in decoding.

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

    def initial_state(self, batch, max_length=None):
        """A stream's start: the learned inner weights per row as `params` (float32)
        and, with share-QK, the convs' zeroed `qk_history`. With `max_length`
        (decoding) also zeroed gradient sums (`grads`), so the state can stop and
        continue inside a mini-batch; without them a stateful call continues only
        at mini-batch boundaries (state passing: windows of whole mini-batches)."""
        state = {"params": tuple(ops.cast(p, "float32") for p in self._params(batch))}
        if max_length is not None:
            state["grads"] = tuple(ops.zeros_like(p) for p in state["params"])
        if self.share_qk:
            state["qk_history"] = ops.zeros((batch, self.conv_kernel - 1, self.d_model), "float32")
        return state

    def _output(self, x, z):
        """Inner output z [B,h,n,f] -> layer output [B,n,d]."""
        b, n = ops.shape(x)[0], x.shape[1]
        y = ops.reshape(ops.transpose(z, (0, 2, 1, 3)), (b, n, self.d_model))
        y = self.post_norm(y)
        if self.gate is not None:
            y = gelu_tanh(ops.cast(self.gate(x), "float32")) * y
        return self.o_proj(ops.cast(y, self.compute_dtype))

    # ---------------------------------------------------------------- forward

    def call(self, x, state=None, position=0):
        """The layer over `x`, from a stream's start; with a `state` (`initial_state`),
        continuing it at `position` (only `position % mini_batch_size` matters),
        returning `(y, state after x)`. Gradients flow into a given state: stop
        them for truncated backpropagation. A state without `grads` ends after the
        last whole mini-batch of `x`. A Python `position` runs the primal form up to
        the next mini-batch boundary, the dual form over whole mini-batches and the
        primal form over the rest; a traced one (a compiled decoding step) runs
        the primal form token by token.
        """
        stateful = state is not None
        state = state if stateful else self.initial_state(ops.shape(x)[0])
        xq, xk, xv, history = self._projections(x, state.get("qk_history"))
        xq, xk, xv = (ops.cast(t, "float32") for t in (xq, xk, xv))  # the inner loop runs in float32
        inputs = (xq, xk, xv, self._lr(x))
        params = tuple(ops.cast(p, "float32") for p in state["params"])
        grads = state.get("grads")
        grads = tuple(ops.zeros_like(p) for p in params) if grads is None else tuple(grads)
        n, k = x.shape[1], self.mini_batch_size
        head = min((-position) % k, n) if isinstance(position, int) else n
        if head and "grads" not in state:
            raise ValueError(f"a state without gradient sums continues at a mini-batch boundary, not at {position}; "
                             "make it with `initial_state(batch, max_length)` to stop inside a mini-batch")
        full = (n - head) // k * k
        outputs = []
        if head:
            params, grads, z = self._primal_tokens(params, grads, _take(inputs, 0, head), position)
            outputs.append(z)
        if full:
            params, z = self._dual_blocks(params, _take(inputs, head, head + full))
            outputs.append(z)
        if n > head + full:
            ended = params  # the weights after the last whole mini-batch
            params, grads, z = self._primal_tokens(params, grads, _take(inputs, head + full, n), 0)
            outputs.append(z)
        else:
            ended = params
        y = self._output(x, outputs[0] if len(outputs) == 1 else ops.concatenate(outputs, axis=2))
        if not stateful:
            return y
        new = {"params": params, "grads": grads} if "grads" in state else {"params": ended}
        if self.share_qk:
            new["qk_history"] = ops.cast(history, "float32")
        return y, new

    def _inner_constants(self):
        k = self.mini_batch_size
        cos, sin = _rope_tables(k, self.head_dim, self.rope_theta)
        return self._token_scale(), cos, sin, ops.cast(self.ttt_gamma, "float32"), ops.cast(self.ttt_beta, "float32")

    def _dual_blocks(self, params, inputs):
        """Whole mini-batches, from their first token, in the dual form: (params after, z)."""
        xq, xk, xv, lr = inputs
        scale, cos, sin, gamma, beta = self._inner_constants()
        k, n = self.mini_batch_size, xq.shape[2]
        m = n // k

        def blocks(t):  # [B,h,n,f] -> [m, B,h,K,f]
            return ops.transpose(ops.reshape(t, (ops.shape(t)[0], t.shape[1], m, k, t.shape[3])), (2, 0, 1, 3, 4))

        q_blocks, k_blocks = _rope(blocks(xq), cos, sin), _rope(blocks(xk), cos, sin)
        lr_blocks = ops.transpose(ops.reshape(lr, (ops.shape(lr)[0], self.num_heads, m, k)), (2, 0, 1, 3))
        dual = _dual_linear if self.kind == "linear" else _dual_mlp

        def step(carry, block):
            q, k_, v, lr_ = block
            eta = scale[:, None] * lr_[..., None, :]  # [B,h,K,K]: token_scale_i · lr_j
            carry, z = dual(carry, q, k_, v, eta, gamma, beta)
            return carry, q + layer_norm(z, gamma, beta)

        params, z = scan(step, params, (q_blocks, k_blocks, blocks(xv), lr_blocks),
                                     ops.zeros_like(q_blocks[0]))
        z = ops.transpose(z, (1, 2, 0, 3, 4))
        return params, ops.reshape(z, (ops.shape(z)[0], self.num_heads, n, self.head_dim))

    def _primal_tokens(self, params, grads, inputs, position):
        """Tokens one at a time from `position` (an int or a traced scalar) in the
        primal form; a token that completes a mini-batch takes its step."""
        xq, xk, xv, lr = inputs
        scale, cos, sin, gamma, beta = self._inner_constants()
        k = self.mini_batch_size
        primal = _primal_linear if self.kind == "linear" else _primal_mlp
        outs = []
        for i in range(xq.shape[2]):
            p = (position + i) % k
            q = _rope(xq[:, :, i : i + 1], _row(cos, p), _row(sin, p))
            k_ = _rope(xk[:, :, i : i + 1], _row(cos, p), _row(sin, p))
            carry, z = primal(params + grads, q, k_, xv[:, :, i : i + 1], _row(scale, p), lr[:, :, i : i + 1],
                              gamma, beta)
            params, grads = carry[: len(params)], carry[len(params):]
            outs.append(q + layer_norm(z, gamma, beta))
            stepped = tuple(w - scale[k - 1] * g for w, g in zip(params, grads))
            if isinstance(p, int):
                if p == k - 1:  # the mini-batch is complete: take its step
                    params, grads = stepped, tuple(ops.zeros_like(g) for g in grads)
            else:
                done = ops.equal(p, k - 1)
                params = tuple(ops.where(done, s_, w) for s_, w in zip(stepped, params))
                grads = tuple(ops.where(done, ops.zeros_like(g), g) for g in grads)
        return params, grads, ops.concatenate(outs, axis=2)

    def get_config(self):
        config = super().get_config()
        config.update(d_model=self.d_model, num_heads=self.num_heads, kind=self.kind,
                      mini_batch_size=self.mini_batch_size, base_lr=self.base_lr, use_gate=self.use_gate,
                      share_qk=self.share_qk, conv_kernel=self.conv_kernel, rope_theta=self.rope_theta,
                      initializer_range=self.initializer_range,
                      output_initializer_range=self.output_initializer_range)
        return config
