"""Size presets and the closed-form parameter and FLOP accounting.

Pure Python on purpose: `--dry-run` and the config validation use it without
importing keras or any backend. `tests/models/sizing_test.py` checks the
formula against `model.count_params()` over a grid of flags.
"""

import dataclasses

# name -> (d_model, num_layers, num_heads, d_ff)
SIZE_PRESETS = {
    "nano": (128, 6, 4, 512),
    "tiny": (256, 8, 8, 1024),
    "small": (512, 12, 8, 2048),
    "medium": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "xlarge": (1280, 32, 20, 5120),
}


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts of a `CausalLM`.

    `embedding` counts the token table, the learned position table and an
    untied LM head: everything whose size scales with vocab or context rather
    than with depth (the convention of Kaplan et al. and nanoGPT).
    """

    total: int
    embedding: int
    non_embedding: int
    trainable: int


def block_style(use_rope, use_rmsnorm, use_swiglu):
    """Names the block family a flag combination builds."""
    if use_rope and use_rmsnorm and use_swiglu:
        return "llama"
    if not (use_rope or use_rmsnorm or use_swiglu):
        return "gpt2"
    return "custom"


def count_params(
    vocab_size,
    d_model,
    num_layers,
    num_heads,
    d_ff,
    seq_len,
    num_kv_heads=None,
    use_rope=True,
    use_rmsnorm=True,
    use_swiglu=True,
    tie_embeddings=False,
):
    """Exact parameter count of the model `CausalLM` builds for these flags.

    Example:
        >>> count_params(258, 128, 6, 4, 512, 256).total
        1640576
    """
    num_kv_heads = num_kv_heads or num_heads
    head_dim = d_model // num_heads
    norm = d_model if use_rmsnorm else 2 * d_model  # LayerNorm adds a bias.
    attention = 2 * d_model * d_model + 2 * d_model * num_kv_heads * head_dim
    mlp = (3 if use_swiglu else 2) * d_model * d_ff
    per_layer = 2 * norm + attention + mlp
    token_embedding = vocab_size * d_model
    position_embedding = 0 if use_rope else seq_len * d_model
    lm_head = 0 if tie_embeddings else vocab_size * d_model
    embedding = token_embedding + position_embedding + lm_head
    non_embedding = num_layers * per_layer + norm
    total = embedding + non_embedding
    return ParamCounts(
        total=total,
        embedding=embedding,
        non_embedding=non_embedding,
        trainable=total,
    )


def flops_per_token(non_embedding_params, vocab_size, d_model, num_layers, seq_len):
    """Training FLOPs per token: forward plus backward (3x forward).

    6·N for the matmuls of the blocks, 6·V·d for the LM head and
    12·layers·d·seq for the attention scores and their weighted sum (PaLM's
    appendix B; the causal mask is not credited, as in nanoGPT and MaxText).

    Example:
        >>> flops_per_token(1_000_000, 258, 128, 6, 256)
        8557440
    """
    return (
        6 * non_embedding_params
        + 6 * vocab_size * d_model
        + 12 * num_layers * d_model * seq_len
    )
