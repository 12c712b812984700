"""One pre-norm decoder block: x + mix(norm(x)), then x + mlp(norm(x)).

The sequence mixer is causal self-attention, or a TTT layer (`ttt` config);
the feed-forward layer is the dense MLP, or a mixture of experts (`moe` config).
`use_bias` gives the attention and dense-MLP projections biases (GPT-2); TTT
layers and MoE experts have their own parameters and take none.
A TTT block with `pre_conv` (the paper's Mamba-style backbone) first adds a
causal convolution: x + conv(norm(x)).
"""

import keras

from ultimate_trainer.models.attention import CausalSelfAttention
from ultimate_trainer.models.feed_forward import FeedForward
from ultimate_trainer.models.pre_conv import PreConv
from ultimate_trainer.models.moe import MoEFeedForward
from ultimate_trainer.models.ttt import TTTLayer


def make_norm(use_rmsnorm, name, dtype=None):
    """RMSNorm (LLaMA) or LayerNorm with bias (GPT-2).

    Norms run in float32 even under mixed precision, as LLaMA and GPT-2 do:
    a bfloat16 mean of squares loses too many bits.
    """
    policy = keras.DTypePolicy("float32") if dtype is None or _is_mixed(dtype) else dtype
    if use_rmsnorm:
        return keras.layers.RMSNormalization(epsilon=1e-6, dtype=policy, name=name)
    return keras.layers.LayerNormalization(epsilon=1e-5, dtype=policy, name=name)


def _is_mixed(policy):
    policy = keras.dtype_policies.get(policy)
    return policy.compute_dtype != policy.variable_dtype


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class TransformerBlock(keras.layers.Layer):
    """A decoder block of `CausalLM`.

    Example:
        >>> block = TransformerBlock(num_heads=4, head_dim=32, d_ff=512)
        >>> block(np.zeros((2, 16, 128))).shape
        (2, 16, 128)
    """

    def __init__(
        self,
        num_heads,
        head_dim,
        d_ff,
        num_kv_heads=None,
        use_rope=True,
        use_rmsnorm=True,
        use_swiglu=True,
        activation="gelu",
        dropout_rate=0.0,
        flash_attention=None,
        initializer_range=0.02,
        output_initializer_range=0.02,
        ttt=None,
        moe=None,
        use_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.use_bias = use_bias
        self.ttt_config = dict(ttt) if ttt else None
        self.moe_config = dict(moe) if moe else None
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.d_ff = d_ff
        self.num_kv_heads = num_kv_heads
        self.use_rope = use_rope
        self.use_rmsnorm = use_rmsnorm
        self.use_swiglu = use_swiglu
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.flash_attention = flash_attention
        self.initializer_range = initializer_range
        self.output_initializer_range = output_initializer_range

        self.attention_norm = make_norm(use_rmsnorm, "attention_norm", self.dtype_policy)
        self.attention = None
        self.ttt = None
        self.pre_conv = None
        if self.ttt_config:
            # `ttt` holds TTTLayer arguments (kind, mini_batch_size, base_lr, use_gate, share_qk) and pre_conv.
            layer_args = {k: v for k, v in self.ttt_config.items() if k != "pre_conv"}
            if self.ttt_config.get("pre_conv"):
                self.pre_conv = PreConv(num_heads * head_dim, dtype=self.dtype_policy, name="pre_conv")
            self.ttt = TTTLayer(
                d_model=num_heads * head_dim,
                num_heads=num_heads,
                initializer_range=initializer_range,
                output_initializer_range=output_initializer_range,
                dtype=self.dtype_policy,
                name="ttt",
                **layer_args,
            )
        else:
            self.attention = CausalSelfAttention(
                num_heads=num_heads,
                head_dim=head_dim,
                num_kv_heads=num_kv_heads,
                use_rope=use_rope,
                flash_attention=flash_attention,
                initializer_range=initializer_range,
                output_initializer_range=output_initializer_range,
                use_bias=use_bias,
                dtype=self.dtype_policy,
                name="attention",
            )
        self.mlp_norm = make_norm(use_rmsnorm, "mlp_norm", self.dtype_policy)
        # `moe` holds MoEFeedForward arguments: num_experts, top_k, capacity_factor, aux/z loss coefs.
        self.mlp = (MoEFeedForward if self.moe_config else FeedForward)(
            hidden_dim=d_ff,
            use_swiglu=use_swiglu,
            activation=activation,
            initializer_range=initializer_range,
            output_initializer_range=output_initializer_range,
            dtype=self.dtype_policy,
            name="moe" if self.moe_config else "mlp",
            **(self.moe_config or {"use_bias": use_bias}),
        )
        self.dropout = keras.layers.Dropout(dropout_rate, dtype=self.dtype_policy, name="dropout")

    @property
    def mixer(self):
        return self.ttt if self.ttt is not None else self.attention

    def build(self, input_shape):
        for layer in (self.pre_conv, self.attention_norm, self.mixer, self.mlp_norm, self.mlp):
            if layer is not None:
                layer.build(input_shape)
        self.built = True

    def window_state(self, batch):
        """A TTT block's state at the start of a stream (a flat tuple; see
        `TTTLayer.window_state`), or () for an attention block."""
        if self.ttt is None:
            return ()
        pre = (self.pre_conv.empty_history(batch),) if self.pre_conv is not None else ()
        return pre + self.ttt.window_state(batch)

    def call(self, x, training=None, cache=None, cache_index=0, ttt_state=None, return_state=False):
        if return_state:  # TTT state passing: (x, the block's state after this window, or None)
            if self.ttt is None:
                return self.call(x, training=training), None
            pre_state = ()
            if self.pre_conv is not None:
                conv, history = self.pre_conv(x, None if ttt_state is None else ttt_state[0], return_history=True)
                x, pre_state, ttt_state = x + conv, (history,), None if ttt_state is None else ttt_state[1:]
            mixed, state = self.ttt(self.attention_norm(x), state=ttt_state, return_state=True)
            x = x + self.dropout(mixed, training=training)
            return x + self.dropout(self.mlp(self.mlp_norm(x)), training=training), pre_state + state
        if cache is None:
            if self.pre_conv is not None:
                x = x + self.pre_conv(x)
            x = x + self.dropout(self.mixer(self.attention_norm(x)), training=training)
            return x + self.dropout(self.mlp(self.mlp_norm(x)), training=training)
        if self.ttt is not None:
            raise NotImplementedError("the KV cache is for attention blocks; TTT blocks decode with `decode`")
        # `cache`: this block's slice of `CausalLM.empty_cache`, {"kv": [b, 2, max_length, ...]} and,
        # with an MoE model, "expert_counts" [b, E]; the row is the cache's max_length long.
        attended, kv = self.attention(self.attention_norm(x), cache=cache["kv"], cache_index=cache_index)
        x = x + attended
        mlp_out, cache = self._decoding_mlp(self.mlp_norm(x), dict(cache, kv=kv), keras.ops.shape(kv)[2])
        return x + mlp_out, cache

    def _decoding_mlp(self, x, state, row_length):
        """The MLP of a decoding step; an MoE one continues its row's expert counts."""
        if not isinstance(self.mlp, MoEFeedForward):
            return self.mlp(x), state
        out, counts = self.mlp(x, counts=state["expert_counts"], row_length=row_length)
        return out, dict(state, expert_counts=counts)

    def initial_decode_state(self, batch):
        """A TTT block's decoding state: the TTT layer's and the pre-conv's history, and
        an MoE block's expert counts."""
        state = {"ttt": self.ttt.initial_state(batch), "pre_conv": None}
        if isinstance(self.mlp, MoEFeedForward):
            state["expert_counts"] = keras.ops.zeros((batch, self.mlp.num_experts), "int32")
        return state

    def decode(self, x, state, row_length):
        """Tokens x after `state` (`initial_decode_state`) through a TTT block of a row
        `row_length` tokens long (an MoE block's capacity); returns (x, state)."""
        history = state["pre_conv"]
        if self.pre_conv is not None:
            conv, history = self.pre_conv(x, history, return_history=True)
            x = x + conv
        mixed, ttt_state = self.ttt.decode(self.attention_norm(x), state["ttt"])
        x = x + mixed
        mlp_out, state = self._decoding_mlp(self.mlp_norm(x), state, row_length)
        return x + mlp_out, dict(state, ttt=ttt_state, pre_conv=history)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            d_ff=self.d_ff,
            num_kv_heads=self.num_kv_heads,
            use_rope=self.use_rope,
            use_rmsnorm=self.use_rmsnorm,
            use_swiglu=self.use_swiglu,
            activation=self.activation,
            dropout_rate=self.dropout_rate,
            flash_attention=self.flash_attention,
            initializer_range=self.initializer_range,
            output_initializer_range=self.output_initializer_range,
            ttt=self.ttt_config,
            moe=self.moe_config,
            use_bias=self.use_bias,
        )
        return config
