"""The transformer MLP: SwiGLU, or a plain two-layer MLP with GELU/ReLU/SiLU."""

import keras
from keras import ops

ACTIVATIONS = {
    # GPT-2's GELU is the tanh approximation ("gelu_new" in transformers).
    "gelu": lambda x: ops.gelu(x, approximate=True),
    "relu": ops.relu,
    "silu": ops.silu,
}


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class FeedForward(keras.layers.Layer):
    """Position-wise MLP.

    With `use_swiglu`, computes `down(silu(gate(x)) * up(x))` (Shazeer 2020),
    the gate and up projections fused into one matmul; otherwise
    `down(activation(up(x)))`. With `use_bias`, both projections add a bias
    (GPT-2), starting at zero.

    Example:
        >>> FeedForward(hidden_dim=512)(np.zeros((2, 16, 128))).shape
        (2, 16, 128)
    """

    def __init__(
        self,
        hidden_dim,
        use_swiglu=True,
        activation="gelu",
        initializer_range=0.02,
        output_initializer_range=0.02,
        use_bias=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.hidden_dim = hidden_dim
        self.use_swiglu = use_swiglu
        self.activation = activation
        self.initializer_range = initializer_range
        self.output_initializer_range = output_initializer_range
        self.use_bias = use_bias
        self.up = keras.layers.Dense(
            (2 if use_swiglu else 1) * hidden_dim,
            use_bias=use_bias,
            kernel_initializer=keras.initializers.RandomNormal(stddev=initializer_range),
            dtype=self.dtype_policy,
            name="gate_up" if use_swiglu else "up",
        )
        self.down = None  # width known at build time

    def build(self, input_shape):
        self.up.build(input_shape)
        self.down = keras.layers.Dense(
            input_shape[-1],
            use_bias=self.use_bias,
            kernel_initializer=keras.initializers.RandomNormal(stddev=self.output_initializer_range),
            dtype=self.dtype_policy,
            name="down",
        )
        self.down.build(tuple(input_shape[:-1]) + (self.hidden_dim,))
        self.built = True

    def initial_state(self, batch, max_length=None):
        """`{}`: a position-wise layer keeps nothing between calls."""
        return {}

    def call(self, x, state=None, position=0):
        """`down(act(up(x)))`; with a `state` (always `{}`), `(output, state)`."""
        h = self.up(x)
        if self.use_swiglu:
            gate, up = ops.split(h, 2, axis=-1)
            h = ops.silu(gate) * up
        else:
            h = ACTIVATIONS[self.activation](h)
        y = self.down(h)
        return y if state is None else (y, state)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            use_swiglu=self.use_swiglu,
            activation=self.activation,
            initializer_range=self.initializer_range,
            output_initializer_range=self.output_initializer_range,
            use_bias=self.use_bias,
        )
        return config
