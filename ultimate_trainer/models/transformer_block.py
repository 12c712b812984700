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

    def initial_state(self, batch, max_length=None):
        """Each stateful sublayer's `initial_state`, by sublayer name (`pre_conv`,
        `attention` or `ttt`, `mlp` or `moe`). Without `max_length`, only the
        recurrent parts hold anything: what TTT state passing carries."""
        return {layer.name: layer.initial_state(batch, max_length)
                for layer in (self.pre_conv, self.mixer, self.mlp) if layer is not None}

    def call(self, x, training=None, state=None, position=0):
        """x + mix(norm(x)), then x + mlp(norm(x)); with a `state` (`initial_state`),
        `x` continues it at `position` and `(x, state)` is returned."""
        new_state = {}

        def run(layer, h):
            if state is None:
                return layer(h)
            out, new_state[layer.name] = layer(h, state=state[layer.name], position=position)
            return out

        if self.pre_conv is not None:
            x = x + run(self.pre_conv, x)
        x = x + self.dropout(run(self.mixer, self.attention_norm(x)), training=training)
        x = x + self.dropout(run(self.mlp, self.mlp_norm(x)), training=training)
        return x if state is None else (x, new_state)

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
