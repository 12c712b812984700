"""The decoder-only language model, keras-hub style: a backbone (embeddings,
blocks, final norm, layout map) and the causal-LM task on top of it (the LM
head, TTT state passing in training).

One state protocol runs through every layer: `initial_state(batch,
max_length=None)` gives the state before any token, and `call(x,
state=state, position=p)` continues it and returns `(y, state)`; without a
state a layer runs stateless. Attention's state is its KV cache, a TTT
layer's its inner weights (and, when decoding, gradient sums), the pre-conv's
its window of inputs, an MoE layer's its experts' counts; a block's state is
its sublayers' states by name, the model's a list of its blocks' states.
Without `max_length` only the recurrent parts (TTT, pre-conv) hold anything:
that is what state passing carries from window to window. Generation
(`max_length` given) continues every part: a prompt, then one token at a time.
"""

import math

import keras
from keras import ops
from keras_hub.layers import PositionEmbedding, ReversibleEmbedding

from ultimate_trainer.config.parsers import ttt_kind
from ultimate_trainer.models import layout, sizing
from ultimate_trainer.models.moe import statistics_count
from ultimate_trainer.models.transformer_block import TransformerBlock, make_norm

# The constructor arguments that fix a backbone's shape, in order.
ARCHITECTURE_ARGS = ("vocab_size", "seq_len", "d_model", "num_layers", "num_heads", "d_ff", "num_kv_heads",
                     "use_rope", "use_rmsnorm", "use_swiglu", "activation", "dropout_rate", "tie_embeddings",
                     "flash_attention", "ttt", "ttt_layers", "moe", "moe_every", "use_bias")


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class CausalLMBackbone(keras.Model):
    """Token ids `[batch, seq]` to final-normed hidden states `[batch, seq, d_model]`.

    LLaMA style by default (RoPE, RMSNorm, SwiGLU, no biases); GPT-2 style
    with `use_rope=False, use_rmsnorm=False, use_swiglu=False, use_bias=True`
    (learned positions, LayerNorm, GELU, biases in every projection).
    Weights start from normal(0.02), biases from zero; the projections that
    write into the residual stream start from normal(0.02 / sqrt(2 *
    num_layers)), as in GPT-2. `ttt` (TTTLayer arguments and `pre_conv`)
    puts TTT layers in the blocks `ttt_layers` names (all when None); `moe`
    (MoEFeedForward arguments) an MoE layer in every `moe_every`-th block.

    Example:
        >>> backbone = CausalLMBackbone(vocab_size=258, seq_len=64, d_model=128,
        ...                             num_layers=2, num_heads=4, d_ff=512)
        >>> backbone(np.zeros((1, 64), "int32")).shape
        (1, 64, 128)
    """

    def __init__(self, vocab_size, seq_len, d_model, num_layers, num_heads, d_ff, num_kv_heads=None, use_rope=True,
                 use_rmsnorm=True, use_swiglu=True, activation="gelu", dropout_rate=0.0, tie_embeddings=False,
                 flash_attention=None, ttt=None, ttt_layers=None, moe=None, moe_every=1, use_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.seq_len, self.d_model, self.num_layers = vocab_size, seq_len, d_model, num_layers
        self.num_heads, self.d_ff, self.num_kv_heads, self.use_bias = num_heads, d_ff, num_kv_heads, use_bias
        self.use_rope, self.use_rmsnorm, self.use_swiglu = use_rope, use_rmsnorm, use_swiglu
        self.activation, self.dropout_rate, self.tie_embeddings = activation, dropout_rate, tie_embeddings
        self.flash_attention = flash_attention
        self.ttt = dict(ttt) if ttt else None  # TTTLayer arguments for the TTT blocks, and pre_conv
        self.ttt_layers = list(ttt_layers) if ttt_layers is not None else None
        self.moe = dict(moe) if moe else None  # MoEFeedForward arguments for the MoE blocks
        self.moe_every = moe_every
        ttt_blocks = set(range(num_layers) if self.ttt and ttt_layers is None else (ttt_layers or ()))
        moe_blocks = set(sizing.moe_block_indices(num_layers, self.moe and self.moe["num_experts"], moe_every))

        init = keras.initializers.RandomNormal(stddev=0.02)
        self.token_embedding = ReversibleEmbedding(
            vocab_size, d_model, tie_weights=tie_embeddings, embeddings_initializer=init, reverse_dtype="float32",
            dtype=self.dtype_policy, name="token_embedding")
        self.position_embedding = None if use_rope else PositionEmbedding(
            seq_len, initializer=init, dtype=self.dtype_policy, name="position_embedding")
        self.embedding_dropout = keras.layers.Dropout(dropout_rate, dtype=self.dtype_policy, name="embedding_dropout")
        self.blocks = [
            TransformerBlock(
                num_heads=num_heads, head_dim=d_model // num_heads, d_ff=d_ff, num_kv_heads=num_kv_heads,
                use_rope=use_rope, use_rmsnorm=use_rmsnorm, use_swiglu=use_swiglu, activation=activation,
                dropout_rate=dropout_rate, flash_attention=flash_attention, initializer_range=0.02,
                output_initializer_range=0.02 / math.sqrt(2 * num_layers), use_bias=use_bias,
                ttt=self.ttt if i in ttt_blocks else None, moe=self.moe if i in moe_blocks else None,
                dtype=self.dtype_policy, name=f"block_{i}")
            for i in range(num_layers)
        ]
        self.final_norm = make_norm(use_rmsnorm, "final_norm", self.dtype_policy)

    def build(self, input_shape=None):
        hidden = (None, None, self.d_model)
        self.token_embedding.build((None, None))
        if self.position_embedding is not None:
            self.position_embedding.build(hidden)
        for block in self.blocks:
            block.build(hidden)
        self.final_norm.build(hidden)
        self.built = True

    def embed(self, token_ids, position=0, training=None):
        """Token (and learned position) embeddings of tokens placed at `position` onwards."""
        x = self.token_embedding(token_ids)
        if self.position_embedding is not None:
            x = x + self.position_embedding(x, start_index=position)
        return self.embedding_dropout(x, training=training)

    def call(self, token_ids, training=None):
        x = self.embed(token_ids, training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return self.final_norm(x)

    def initial_state(self, batch, max_length=None):
        """Each block's state before any token (see the module docstring): with
        `max_length`, for decoding up to that many positions; without, for a
        stream of windows (TTT state passing).

        Example:
            state = model.initial_state(1, max_length=model.seq_len)
        """
        return [block.initial_state(batch, max_length) for block in self.blocks]

    def call_with_state(self, token_ids, state, position=0, training=None):
        """Hidden states of `token_ids` placed at `position` onwards, continuing
        `state` (`initial_state`), and the state after them."""
        x = self.embed(token_ids, position, training)
        new_state = []
        for block, block_state in zip(self.blocks, state, strict=True):
            x, block_state = block(x, training=training, state=block_state, position=position)
            new_state.append(block_state)
        return self.final_norm(x), new_state

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in ARCHITECTURE_ARGS})
        return config

    REPLICATED_WEIGHTS = layout.REPLICATED_WEIGHTS
    get_layout_map = staticmethod(layout.get_layout_map)

    def count_params(self):
        """Parameters, trainable or frozen; the MoE routing statistics (models/moe.py)
        and the carried TTT states (`carried_state_size`) are variables, not
        parameters, and are left out."""
        return super().count_params() - statistics_count(self) - self.carried_state_size

    @property
    def carried_state_size(self):
        """Values in the carried TTT states and their step counter (`CausalLM`): none here."""
        return 0


@keras.saving.register_keras_serializable(package="ultimate_trainer")
class CausalLM(CausalLMBackbone):
    """The causal-LM task: the backbone's hidden states through the LM head (the
    token embedding reversed, tied or not) to float32 logits `[batch, seq, vocab]`.

    TTT state passing (`state_passing_rows=B`): in training, each TTT block
    starts a batch's row b from where the previous batch's row b ended (its
    final inner weights, no gradient across batches), so the input must
    give each row its own contiguous stream. The carried states are
    non-trainable variables, not parameters; they reset to the learned
    initial weights every `stream_windows` batches (each stream's length in
    windows, a property of the data; None: never after the first).
    Evaluation and generation never read or change them.

    Example:
        >>> model = CausalLM(vocab_size=258, seq_len=64, d_model=128,
        ...                  num_layers=2, num_heads=4, d_ff=512)
        >>> model(np.zeros((1, 64), "int32")).shape
        (1, 64, 258)
        >>> state = model.initial_state(1, max_length=64)
        >>> logits, state = model.call_with_state(np.zeros((1, 5), "int32"), state, 0)  # a prompt
        >>> logits, state = model.call_with_state(np.zeros((1, 1), "int32"), state, 5)  # one more token
    """

    def __init__(self, *args, state_passing_rows=None, stream_windows=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.state_passing_rows = state_passing_rows
        self.stream_windows = stream_windows

    def build(self, input_shape=None):
        super().build(input_shape)
        self.carried = []  # per block, the variables of its flattened stream state
        if self.state_passing_rows:
            self.stream_step = self.add_weight((), "zeros", dtype="int32", trainable=False, name="stream_step")
            for i, start in enumerate(self.initial_state(self.state_passing_rows)):
                self.carried.append([
                    self.add_weight(tuple(t.shape), "zeros", trainable=False, autocast=False,
                                    name=f"carried_state_{i}_{j}")
                    for j, t in enumerate(keras.tree.flatten(start))
                ])

    @property
    def carried_state_size(self):
        """Values in the carried TTT states (`state_passing_rows`) and their step counter:
        variables, not parameters."""
        if not self.state_passing_rows:
            return 0
        return 1 + sum(math.prod(v.shape) for vs in self.carried for v in vs)

    def head(self, hidden):
        """Float32 logits of final-normed hidden states."""
        return ops.cast(self.token_embedding(hidden, reverse=True), "float32")

    def call(self, token_ids, training=None):
        if training and self.state_passing_rows:
            return self._call_carrying_state(token_ids)
        return self.head(super().call(token_ids, training=training))

    def call_with_state(self, token_ids, state, position=0, training=None):
        """Logits of `token_ids` placed at `position` onwards, continuing `state`
        (`initial_state`), and the state after them: a stream's windows one after
        another (no `max_length`), or a prompt and then single tokens.

        Example:
            state = model.initial_state(1, max_length=model.seq_len)
            logits, state = model.call_with_state(prompt_ids, state, 0)
            logits, state = model.call_with_state(next_id, state, len(prompt))
        """
        hidden, state = super().call_with_state(token_ids, state, position, training)
        return self.head(hidden), state

    def _call_carrying_state(self, token_ids):
        rows = ops.shape(token_ids)[0]
        if isinstance(rows, int) and rows != self.state_passing_rows:
            raise ValueError(
                f"state passing carries {self.state_passing_rows} streams but the batch has {rows} rows; "
                f"train with batches of exactly {self.state_passing_rows}")
        step = self.stream_step.value
        reset = ops.equal(step, 0) if not self.stream_windows else ops.equal(step % self.stream_windows, 0)
        state = []
        for start, carried in zip(self.initial_state(self.state_passing_rows), self.carried):
            # A new stream starts from the learned weights (and learns them); a
            # continuing one from the carried values, which have no gradient.
            leaves = [ops.where(reset, s, ops.stop_gradient(var.value))
                      for s, var in zip(keras.tree.flatten(start), carried)]
            state.append(keras.tree.pack_sequence_as(start, leaves))
        logits, state = self.call_with_state(token_ids, state, 0, training=True)
        for carried, block_state in zip(self.carried, state):
            for var, value in zip(carried, keras.tree.flatten(block_state)):
                var.assign(ops.stop_gradient(ops.cast(value, "float32")))
        self.stream_step.assign(step + 1)
        return logits

    def get_config(self):
        config = super().get_config()
        config.update(state_passing_rows=self.state_passing_rows, stream_windows=self.stream_windows)
        return config


def model_kwargs(model_cfg, vocab_size):
    """Maps a `ModelConfig` to `CausalLM` constructor arguments: the shape from its
    `sizing.Architecture`, plus what changes no weight (activation, dropout, kernels)."""
    arch = sizing.Architecture.from_model_config(model_cfg, vocab_size)
    shape = ("vocab_size", "seq_len", "d_model", "num_layers", "num_heads", "d_ff", "num_kv_heads", "use_rope",
             "use_rmsnorm", "use_swiglu", "tie_embeddings", "use_bias")
    return dict(
        {name: getattr(arch, name) for name in shape},
        activation=model_cfg.activation,
        dropout_rate=model_cfg.dropout_rate,
        # True means "auto": let the backend use a fused kernel if it has one.
        flash_attention=None if model_cfg.flash_attention else False,
        **ttt_kwargs(model_cfg),
        **moe_kwargs(model_cfg),
    )


def moe_kwargs(model_cfg):
    """`CausalLM`'s `moe` and `moe_every` arguments for a `ModelConfig` ({} without experts)."""
    m = model_cfg
    if not m.num_experts:
        return {}
    moe = dict(num_experts=m.num_experts, top_k=m.experts_top_k, capacity_factor=m.capacity_factor or None,
               aux_loss_coef=m.router_aux_loss_coef, z_loss_coef=m.router_z_loss_coef)
    return {"moe": moe, "moe_every": m.moe_every}


def ttt_kwargs(model_cfg):
    """`CausalLM`'s `ttt` and `ttt_layers` arguments for a `ModelConfig` ({} without TTT)."""
    m = model_cfg
    kind = ttt_kind(m)
    if not kind:
        return {}
    ttt = dict(kind=kind, mini_batch_size=m.ttt_mini_batch_size, base_lr=m.ttt_base_lr,
               use_gate=m.ttt_use_gate, share_qk=m.ttt_share_qk, pre_conv=m.ttt_backbone == "mamba")
    layers = None if m.ttt_layers is None else list(sizing.ttt_block_indices(m.num_layers, kind, m.ttt_layers))
    return {"ttt": ttt, "ttt_layers": layers}


def build_causal_lm(model_cfg, vocab_size, state_passing_rows=None, stream_windows=None):
    """Builds a `CausalLM` from a `ModelConfig`, weights created; with
    `state_passing_rows`, it carries TTT states for batches of that many rows,
    restarting them every `stream_windows` batches."""
    model = CausalLM(**model_kwargs(model_cfg, vocab_size), state_passing_rows=state_passing_rows,
                     stream_windows=stream_windows, name="causal_lm")
    model.build((None, model_cfg.seq_len))
    return model
