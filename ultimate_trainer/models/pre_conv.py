"""The causal depthwise convolution before a TTT layer in the paper's
Mamba-style "(M)" blocks: x + conv(RMSNorm(x)), kernel 4, one filter per channel."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class PreConv(keras.layers.Layer):
    """Causal: output t sees inputs t-kernel+1..t. Its state's `history` holds the
    normalised inputs before the window (the last `kernel - 1`; zeros at a
    stream's start), so windows or single decoded tokens continue a stream exactly.

    Example:
        >>> conv = PreConv(d_model=64)
        >>> y, state = conv(np.zeros((2, 10, 64), "float32"), state=conv.initial_state(2))
        >>> y.shape, state["history"].shape
        ((2, 10, 64), (2, 3, 64))
    """

    def __init__(self, d_model, kernel_size=4, **kwargs):
        super().__init__(**kwargs)
        self.d_model, self.kernel_size = d_model, kernel_size
        self.norm = keras.layers.RMSNormalization(epsilon=1e-6, dtype="float32", name="norm")
        # Padding is done in `call`, on the left only, so the conv stays causal.
        self.conv = keras.layers.DepthwiseConv1D(kernel_size, padding="valid", dtype=self.dtype_policy, name="conv")

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.conv.build((None, None, self.d_model))

    def initial_state(self, batch, max_length=None):
        """A stream's start: `{"history": zeros [batch, kernel - 1, d_model]}`."""
        return {"history": ops.zeros((batch, self.kernel_size - 1, self.d_model), "float32")}

    def call(self, x, state=None, position=0):
        """The conv of `x`; with a `state`, continuing it: `(y, state after x)`."""
        normed = ops.cast(self.norm(x), "float32")
        history = (state or self.initial_state(ops.shape(x)[0]))["history"]
        padded = ops.concatenate([ops.cast(history, "float32"), normed], axis=1)
        y = ops.cast(self.conv(ops.cast(padded, self.compute_dtype)), x.dtype)
        return y if state is None else (y, {"history": padded[:, -(self.kernel_size - 1):]})

    def get_config(self):
        config = super().get_config()
        config.update(d_model=self.d_model, kernel_size=self.kernel_size)
        return config
