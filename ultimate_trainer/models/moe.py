"""Mixture-of-experts feed-forward layer: a softmax router picks `top_k` of
`num_experts` FFNs per token (Switch Transformer, GShard, Mixtral).

Routing. `probs = softmax(x W_r)` in float32; each token takes its `top_k`
experts, weighted by their probabilities renormalised to sum to 1.

Dispatch is gather/scatter based, batched over every token at once (no loop
over tokens or experts): each (token, choice) assignment gets a slot
`expert * capacity + position` in a per-row buffer `[batch, experts,
capacity, d]`, where `position` counts the earlier assignments to the same
expert (a cumulative sum over the row). A `segment_sum` fills the buffer,
two batched einsums run every expert on its slots, and a gather brings each
assignment's output back, scaled by its weight.

Capacity. Every sequence (row) is its own routing group, so a sequence's
output never depends on the other rows of the batch. With `capacity_factor`
c, each expert takes at most `ceil(c * top_k * seq / num_experts)`
assignments per row. Slots are claimed in token order: all of token t's
choices before any of token t+1's, so whether a token reaches its experts
depends only on itself and the tokens before it (causal: what training sees
at token t is what decoding sees there). GShard's order, every first choice
before any second choice, is not causal: a later token's first choice can
take the slot an earlier token's second choice needed. An assignment over
capacity is dropped: it adds nothing, the residual carries the token on, and
the drop is counted. `capacity_factor=None` is dropless: capacity is the
whole row, so nothing can be dropped, at `num_experts / top_k` times the
expert compute of an even split.

Decoding feeds a row a few tokens at a time; the layer's state
(`initial_state(batch, max_length)`) carries each expert's count of
assignments so far and the capacity of a whole row of `max_length` tokens,
so a token decoded alone is dropped exactly when the full forward of that
row drops it. A stateful call's buffer holds, per expert, one slot per token
of the call (a token takes an expert at most once), not a row's capacity.

Auxiliary losses, added to the training loss (training calls only):
- load balancing (Switch, eq. 4, for top-k): `E * sum_e f_e * P_e`, with
  f_e the fraction of assignments routed to expert e (before dropping) and
  P_e the mean router probability of e; 1.0 when perfectly balanced;
- router z-loss (ST-MoE, eq. 5): `mean(logsumexp(logits)^2)`.

Statistics for the logs (per-expert load, drops, both losses) accumulate in
non-trainable float32 variables during training calls; `read_stats` reads
and resets them. They are bookkeeping, not parameters: `sizing` and
`CausalLM.count_params` leave them out.
"""

import math

import keras
from keras import ops

from ultimate_trainer.models.feed_forward import ACTIVATIONS

# Variable names of the expert kernels, `[experts, in, out]`: stacks of
# matrices that Muon orthogonalises one expert at a time (training/optimizers.py).
EXPERT_KERNELS = ("experts_gate_up", "experts_up", "experts_down")
STAT_NAMES = ("stat_expert_tokens", "stat_dropped", "stat_aux_loss", "stat_z_loss", "stat_calls")


def capacity(seq_len, num_experts, top_k, capacity_factor):
    """Slots per expert per row: `min(seq, ceil(c * k * seq / E))`; the row
    length when dropless (`capacity_factor` None or 0).

    Example:
        >>> capacity(256, 8, 2, 1.25)
        80
    """
    if not capacity_factor:
        return seq_len
    if isinstance(seq_len, int):
        return max(1, min(seq_len, math.ceil(capacity_factor * top_k * seq_len / num_experts)))
    # A dynamic length (a tensorflow graph traced for any length).
    wanted = ops.cast(ops.ceil(capacity_factor * top_k * ops.cast(seq_len, "float32") / num_experts), "int32")
    return ops.maximum(1, ops.minimum(seq_len, wanted))


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class MoEFeedForward(keras.layers.Layer):
    """Top-k routed mixture of `num_experts` FFNs, each `hidden_dim` wide.

    Each expert is the run's MLP: SwiGLU `down(silu(gate(x)) * up(x))`, or
    `down(activation(up(x)))` with `use_swiglu=False`. No biases.

    Example:
        >>> moe = MoEFeedForward(hidden_dim=256, num_experts=8, top_k=2)
        >>> moe(np.zeros((2, 16, 128))).shape
        (2, 16, 128)
    """

    def __init__(
        self,
        hidden_dim,
        num_experts,
        top_k=2,
        capacity_factor=1.25,
        use_swiglu=True,
        activation="gelu",
        aux_loss_coef=0.01,
        z_loss_coef=0.001,
        initializer_range=0.02,
        output_initializer_range=0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
        self.hidden_dim = hidden_dim
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor or None
        self.use_swiglu = use_swiglu
        self.activation = activation
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.initializer_range = initializer_range
        self.output_initializer_range = output_initializer_range
        # Routing decisions are discrete: a bfloat16 softmax flips near-ties, so the router is float32.
        self.router = keras.layers.Dense(
            num_experts,
            use_bias=False,
            kernel_initializer=keras.initializers.RandomNormal(stddev=initializer_range),
            dtype="float32",
            name="router",
        )

    def build(self, input_shape):
        d, e, f = input_shape[-1], self.num_experts, self.hidden_dim
        self.router.build(input_shape)
        self.experts_up = self.add_weight(
            shape=(e, d, (2 if self.use_swiglu else 1) * f),
            initializer=keras.initializers.RandomNormal(stddev=self.initializer_range),
            name="experts_gate_up" if self.use_swiglu else "experts_up",
        )
        self.experts_down = self.add_weight(
            shape=(e, f, d),
            initializer=keras.initializers.RandomNormal(stddev=self.output_initializer_range),
            name="experts_down",
        )

        def stat(shape, name):
            return self.add_weight(shape=shape, initializer="zeros", trainable=False, dtype="float32", name=name)

        self.stat_expert_tokens = stat((e,), "stat_expert_tokens")  # assignments routed to each expert
        self.stat_dropped = stat((), "stat_dropped")  # assignments over capacity
        self.stat_aux_loss = stat((), "stat_aux_loss")  # sums over training calls
        self.stat_z_loss = stat((), "stat_z_loss")
        self.stat_calls = stat((), "stat_calls")
        self.built = True

    def route(self, x):
        """(router logits [b, s, E] float32, top-k expert ids [b, s, k], their
        renormalised weights [b, s, k] float32)."""
        logits = self.router(x)
        # One expert takes every token with weight 1 (Keras warns about a softmax over one entry).
        probs = ops.ones_like(logits) if self.num_experts == 1 else ops.softmax(logits, axis=-1)
        top_p, top_i = ops.top_k(probs, self.top_k)
        return logits, top_i, top_p / ops.sum(top_p, axis=-1, keepdims=True)

    def initial_state(self, batch, max_length=None):
        """`{"counts": [batch, E] int32, "capacity": int32}`: no assignment yet, in a
        row of `max_length` tokens. Without `max_length`, `{}`: each call is a row."""
        if max_length is None:
            return {}
        c = capacity(max_length, self.num_experts, self.top_k, self.capacity_factor)
        return {"counts": ops.zeros((batch, self.num_experts), "int32"), "capacity": ops.array(c, "int32")}

    def call(self, x, training=None, state=None, position=0):
        """`x` [batch, seq, d] is a whole row. With a `state` holding counts (`initial_state`
        with a `max_length`), `x` continues that row, whose capacity applies, and `(output,
        state after x)` is returned."""
        shape = ops.shape(x)
        b, s, d = shape[0], shape[1], x.shape[-1]
        e, k = self.num_experts, self.top_k
        counts = state.get("counts") if state is not None else None
        # Buffer slots per expert: the capacity of this row, or in a stateful call one per token.
        c = capacity(s, e, k, self.capacity_factor) if counts is None else s
        logits, top_i, weights = self.route(x)

        # Assignments in token-major order, so all of a token's choices claim slots before the next
        # token's (causal); a slot's position counts the earlier assignments to its expert, dropped or not.
        expert = ops.reshape(top_i, (b, s * k))
        onehot = ops.one_hot(expert, e, dtype="int32")  # [b, sk, E]
        position_in_call = ops.sum(ops.cumsum(onehot, axis=1) * onehot, axis=-1) - 1
        if counts is None:
            kept = position_in_call < c
        else:
            earlier = ops.sum(ops.expand_dims(ops.cast(counts, "int32"), 1) * onehot, axis=-1)
            kept = position_in_call + earlier < state["capacity"]
        row_slots = e * c + 1  # the last slot of each row collects the dropped assignments
        slot = ops.where(kept, expert * c + position_in_call, e * c)
        rows = ops.expand_dims(ops.arange(b, dtype="int32"), 1)
        flat_slot = ops.reshape(slot + rows * row_slots, (-1,))
        token = ops.repeat(ops.arange(s, dtype="int32"), k)  # the token of each assignment
        flat_token = ops.reshape(ops.expand_dims(token, 0) + rows * s, (-1,))

        x_flat = ops.reshape(x, (-1, d))
        buffer = ops.segment_sum(ops.take(x_flat, flat_token, axis=0), flat_slot, num_segments=b * row_slots)
        expert_in = ops.reshape(ops.reshape(buffer, (b, row_slots, d))[:, : e * c], (b, e, c, d))
        h = ops.einsum("becd,edf->becf", expert_in, ops.cast(self.experts_up, x.dtype))
        if self.use_swiglu:
            gate, up = ops.split(h, 2, axis=-1)
            h = ops.silu(gate) * up
        else:
            h = ACTIVATIONS[self.activation](h)
        expert_out = ops.einsum("becf,efd->becd", h, ops.cast(self.experts_down, x.dtype))
        expert_out = ops.concatenate(
            [ops.reshape(expert_out, (b, e * c, d)), ops.zeros((b, 1, d), dtype=expert_out.dtype)], axis=1
        )
        combined = ops.take(ops.reshape(expert_out, (-1, d)), flat_slot, axis=0)  # dropped: the zero slot
        weight = ops.reshape(weights, (-1, 1))
        out = ops.reshape(combined * ops.cast(weight, combined.dtype), (b, s, k, d))
        out = ops.sum(out, axis=2)

        if training:
            self._add_losses_and_stats(logits, onehot, kept)
        if state is None:
            return out
        if counts is None:
            return out, state
        return out, dict(state, counts=ops.cast(counts, "int32") + ops.sum(onehot, axis=1))

    def _add_losses_and_stats(self, logits, onehot, kept):
        e = self.num_experts
        counts = ops.cast(ops.sum(onehot, axis=(0, 1)), "float32")  # [E], before dropping
        fraction = counts / ops.sum(counts)
        probs = ops.ones_like(logits) if e == 1 else ops.softmax(logits, axis=-1)
        mean_prob = ops.mean(ops.reshape(probs, (-1, e)), axis=0)
        aux = e * ops.sum(fraction * mean_prob)
        z = ops.mean(ops.square(ops.logsumexp(logits, axis=-1)))
        terms = []
        if self.aux_loss_coef:
            terms.append(self.aux_loss_coef * aux)
        if self.z_loss_coef:
            terms.append(self.z_loss_coef * z)
        if terms:
            self.add_loss(sum(terms))
        self.stat_expert_tokens.assign_add(counts)
        self.stat_dropped.assign_add(ops.sum(1.0 - ops.cast(kept, "float32")))
        self.stat_aux_loss.assign_add(aux)
        self.stat_z_loss.assign_add(z)
        self.stat_calls.assign_add(1.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            num_experts=self.num_experts,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            use_swiglu=self.use_swiglu,
            activation=self.activation,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
            initializer_range=self.initializer_range,
            output_initializer_range=self.output_initializer_range,
        )
        return config


def moe_layers(model):
    """The `MoEFeedForward` layers of `model`, in order."""
    return [layer for layer in model._flatten_layers(include_self=False) if isinstance(layer, MoEFeedForward)]


def statistics_count(model):
    """Number of scalars in the MoE statistics variables (not parameters)."""
    return sum(math.prod(v.shape) for layer in moe_layers(model) for v in _stats(layer))


def _stats(layer):
    return [getattr(layer, name) for name in STAT_NAMES]


def read_stats(model, reset=True):
    """The routing statistics of the training calls since the last reset, or
    None when `model` has no MoE layer (or no training call happened).

    Returns `aux_loss` and `z_loss` (means over calls and MoE layers),
    `loss_terms` (what the auxiliary losses added to the mean training loss,
    coefficients included, summed over layers), `dropped_fraction` (share of
    assignments over capacity), `expert_load` (per expert, the share of
    assignments it was routed, averaged over layers; 1/E each when balanced)
    and `load_max` (the largest expert share times E over all layers; 1.0 is
    perfectly balanced).

    Example:
        stats = read_stats(model)   # after some model.fit steps
        stats["expert_load"]        # [0.13, 0.12, ...]
    """
    layers = moe_layers(model)
    if not layers:
        return None
    rows = []  # (layer, expert tokens [E], dropped, aux sum, z sum, calls)
    for layer in layers:
        rows.append((layer, *(ops.convert_to_numpy(v.value).astype("float64") for v in _stats(layer))))
        if reset:
            for v in _stats(layer):
                v.assign(ops.zeros(v.shape, "float32"))
    calls = float(rows[0][5])
    if not calls:
        return None
    e, n = layers[0].num_experts, len(rows)
    loads = [tokens / max(tokens.sum(), 1.0) for _, tokens, *_ in rows]
    assignments = sum(tokens.sum() for _, tokens, *_ in rows)
    return {
        "aux_loss": float(sum(aux for *_, aux, _, _ in rows) / calls / n),
        "z_loss": float(sum(z for *_, z, _ in rows) / calls / n),
        "loss_terms": float(sum(layer.aux_loss_coef * aux + layer.z_loss_coef * z
                                for layer, _, _, aux, z, _ in rows) / calls),
        "dropped_fraction": float(sum(dropped for _, _, dropped, *_ in rows) / max(assignments, 1.0)),
        "expert_load": [float(sum(load[i] for load in loads) / n) for i in range(e)],
        "load_max": float(max(load.max() for load in loads) * e),
    }
