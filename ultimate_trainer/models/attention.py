"""Causal multi-head self-attention with optional grouped-query heads and RoPE."""

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class CausalSelfAttention(keras.layers.Layer):
    """Causal self-attention through `ops.dot_product_attention`.

    Q, K and V come from one fused projection (one matmul instead of three);
    the export code splits it back for formats that store them apart.

    Args:
        num_heads: query heads.
        head_dim: size of each head.
        num_kv_heads: key/value heads (grouped-query attention); defaults to
            `num_heads`.
        use_rope: rotate queries and keys with rotary position embeddings.
        flash_attention: `None` lets the backend pick the fused kernel where
            the device has one; `False` forces the plain kernel.
        initializer_range: std of the normal init of the QKV projection.
        output_initializer_range: std of the output projection's init.
        use_bias: add a bias to the QKV and output projections (GPT-2 has
            them, LLaMA none); biases start at zero.

    Example:
        >>> layer = CausalSelfAttention(num_heads=4, head_dim=32)
        >>> layer(np.zeros((2, 16, 128))).shape
        (2, 16, 128)
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        num_kv_heads=None,
        use_rope=True,
        rope_max_wavelength=10000,
        flash_attention=None,
        initializer_range=0.02,
        output_initializer_range=0.02,
        use_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_bias = use_bias
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.use_rope = use_rope
        self.rope_max_wavelength = rope_max_wavelength
        self.flash_attention = flash_attention
        self.initializer_range = initializer_range
        self.output_initializer_range = output_initializer_range
        q_width = self.num_heads * head_dim
        kv_width = self.num_kv_heads * head_dim
        self.qkv = keras.layers.Dense(
            q_width + 2 * kv_width,
            use_bias=use_bias,
            kernel_initializer=keras.initializers.RandomNormal(stddev=initializer_range),
            dtype=self.dtype_policy,
            name="qkv",
        )
        self.out = None  # width known at build time
        self.rotary = (
            RotaryEmbedding(max_wavelength=rope_max_wavelength, dtype=self.dtype_policy, name="rotary")
            if use_rope
            else None
        )

    def build(self, input_shape):
        d_model = input_shape[-1]
        self.qkv.build(input_shape)
        self.out = keras.layers.Dense(
            d_model,
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.output_initializer_range),
            dtype=self.dtype_policy,
            name="out",
        )
        self.out.build(tuple(input_shape[:-1]) + (self.num_heads * self.head_dim,))
        self.built = True

    def initial_state(self, batch, max_length=None):
        """The KV cache of `batch` rows of `max_length` positions: `{"kv": [batch,
        2, max_length, kv_heads, head_dim]}`, keys then values, zeroed. Without
        `max_length`, `{}`: nothing is kept and every call sees only its own tokens."""
        if max_length is None:
            return {}
        return {"kv": ops.zeros((batch, 2, max_length, self.num_kv_heads, self.head_dim), "float32")}

    def call(self, x, state=None, position=0):
        """Causal attention over `x`. With a `state` (`initial_state`), `x` sits at
        `position` onwards: its keys and values are written into the cache there,
        it attends to every cached position up to its own, and `(output, state)`
        is returned: decoding one token costs one row, not the whole prefix.
        """
        batch, seq = ops.shape(x)[0], ops.shape(x)[1]
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = ops.split(self.qkv(x), [q_width, q_width + kv_width], axis=-1)
        q = ops.reshape(q, (batch, seq, self.num_heads, self.head_dim))
        k = ops.reshape(k, (batch, seq, self.num_kv_heads, self.head_dim))
        v = ops.reshape(v, (batch, seq, self.num_kv_heads, self.head_dim))
        if self.rotary is not None:
            q = self.rotary(q, start_index=position)
            k = self.rotary(k, start_index=position)
        cache = state.get("kv") if state is not None else None
        mask = None
        if cache is not None:
            k = ops.slice_update(cache[:, 0], (0, position, 0, 0), ops.cast(k, cache.dtype))
            v = ops.slice_update(cache[:, 1], (0, position, 0, 0), ops.cast(v, cache.dtype))
            cache = ops.stack([k, v], axis=1)
            k, v = ops.cast(k, q.dtype), ops.cast(v, q.dtype)
            query_positions = position + ops.arange(seq)
            mask = ops.arange(ops.shape(k)[1])[None, :] <= query_positions[:, None]
            mask = ops.broadcast_to(mask[None, None], (batch, self.num_heads, seq, ops.shape(k)[1]))
        if self.num_kv_heads == 1 < self.num_heads:
            # TensorFlow's CPU einsum cannot broadcast a single kv head
            # against several query heads; multi-query attention repeats it.
            k = ops.repeat(k, self.num_heads, axis=2)
            v = ops.repeat(v, self.num_heads, axis=2)
        if cache is None:
            y = ops.dot_product_attention(q, k, v, is_causal=True, flash_attention=self.flash_attention)
        else:
            y = ops.dot_product_attention(q, k, v, mask=mask, flash_attention=False)
        y = self.out(ops.reshape(y, (batch, seq, q_width)))
        if state is None:
            return y
        return y, ({} if cache is None else {"kv": cache})

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            use_rope=self.use_rope,
            rope_max_wavelength=self.rope_max_wavelength,
            flash_attention=self.flash_attention,
            initializer_range=self.initializer_range,
            output_initializer_range=self.output_initializer_range,
            use_bias=self.use_bias,
        )
        return config
