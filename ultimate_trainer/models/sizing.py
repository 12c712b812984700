"""Size presets and the closed-form parameter and FLOP accounting.

Pure Python on purpose: `--dry-run` and the config validation use it without
importing keras or any backend. `tests/models/sizing_test.py` checks the
formula against `model.count_params()` over a grid of flags.
"""

import dataclasses
import math

from ultimate_trainer.config.parsers import moe_block_indices, ttt_block_indices  # noqa: F401  re-exported
from ultimate_trainer.config.parsers import parse_lora_targets, ttt_kind
from ultimate_trainer.config.schema import SIZE_PRESETS  # noqa: F401  re-exported

# SIZE_PRESETS: name -> (d_model, num_layers, num_heads, d_ff); the block index helpers parse flags.


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
    # Parameters one token passes through: all of them, less the experts a
    # token is not routed to (each MoE block uses top_k of num_experts).
    active: int = None

    @property
    def active_non_embedding(self):
        return (self.total if self.active is None else self.active) - self.embedding


def block_style(use_rope, use_rmsnorm, use_swiglu):
    """Names the block family a flag combination builds."""
    if use_rope and use_rmsnorm and use_swiglu:
        return "llama"
    if not (use_rope or use_rmsnorm or use_swiglu):
        return "gpt2"
    return "custom"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The shape of a `CausalLM`: what its parameters depend on, and nothing else.

    Derived once from a `ModelConfig` (`from_model_config`); `count_params`
    reads it. `ttt_layer_type` is the TTT kind (`linear`, `mlp`) or None,
    `ttt_layers` the TTT blocks ("0,2" or a list; all when None),
    `ttt_pre_conv` the Mamba-style conv before each TTT layer, `lora_targets`
    names from `models/lora.py`. See `count_params` for how each counts.

    Example:
        >>> Architecture(258, 128, 6, 4, 512, 256).num_kv_heads is None
        True
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    seq_len: int
    num_kv_heads: int = None
    use_rope: bool = True
    use_rmsnorm: bool = True
    use_swiglu: bool = True
    tie_embeddings: bool = False
    lora_rank: int = 0
    lora_targets: tuple = ()
    ttt_layer_type: str = None
    ttt_layers: object = None
    ttt_mini_batch_size: int = 16
    ttt_use_gate: bool = False
    ttt_share_qk: bool = False
    ttt_conv_kernel: int = 4
    ttt_pre_conv: bool = False
    num_experts: int = 0
    experts_top_k: int = 2
    moe_every: int = 1
    use_bias: bool = False

    @classmethod
    def from_model_config(cls, model_cfg, vocab_size):
        """The architecture a `ModelConfig` builds at `vocab_size`."""
        m = model_cfg
        return cls(
            vocab_size, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.seq_len, num_kv_heads=m.num_kv_heads,
            use_rope=m.rope, use_rmsnorm=m.rmsnorm, use_swiglu=m.swiglu,
            tie_embeddings=m.tie_embeddings, use_bias=m.use_bias,
            lora_rank=m.lora_rank if m.use_lora else 0,
            lora_targets=parse_lora_targets(m.lora_targets) if m.use_lora else (),
            ttt_layer_type=ttt_kind(m), ttt_layers=m.ttt_layers,
            ttt_mini_batch_size=m.ttt_mini_batch_size, ttt_use_gate=m.ttt_use_gate, ttt_share_qk=m.ttt_share_qk,
            ttt_pre_conv=m.ttt_backbone == "mamba",
            num_experts=m.num_experts, experts_top_k=m.experts_top_k, moe_every=m.moe_every,
        )


def count_params(arch):
    """Exact parameter count of the model `CausalLM` builds for an `Architecture`.

    With `lora_rank`, adapters of that rank on `lora_targets` are added and
    become the only trainable weights. With `ttt_layer_type`, the blocks
    `ttt_layers` names (all when None) have a TTT layer (`ttt_params`) where
    the others have attention; `ttt_pre_conv` adds a causal conv before each
    of them: an RMSNorm scale, `ttt_conv_kernel` taps and a bias per channel.
    With `num_experts`, every `moe_every`-th block has an MoE feed-forward
    layer of `num_experts` experts `d_ff` wide (`moe_params`) instead of the
    MLP; `active` then counts `experts_top_k` experts per MoE block.
    `use_bias` adds a bias to each attention projection (QKV, output) and
    dense-MLP projection (up or gate/up, down); TTT layers and experts take none.

    Example:
        >>> count_params(Architecture(258, 128, 6, 4, 512, 256)).total
        1640576
        >>> c = count_params(Architecture(258, 128, 6, 4, 512, 256, num_experts=8, experts_top_k=2))
        >>> c.total, c.active
        (9904256, 2826368)
    """
    a = arch
    d, num_heads, d_ff = a.d_model, a.num_heads, a.d_ff
    num_kv_heads = a.num_kv_heads or num_heads
    head_dim = d // num_heads
    norm = d if a.use_rmsnorm else 2 * d  # LayerNorm adds a bias.
    attention = 2 * d * d + 2 * d * num_kv_heads * head_dim
    mlp_weights = (3 if a.use_swiglu else 2) * d * d_ff
    mlp = mlp_weights
    if a.use_bias:
        attention += (num_heads + 2 * num_kv_heads) * head_dim + d
        mlp += (2 if a.use_swiglu else 1) * d_ff + d
    per_layer = 2 * norm + attention + mlp
    n_ttt = len(ttt_block_indices(a.num_layers, a.ttt_layer_type, a.ttt_layers))
    ttt_extra = n_ttt * (
        ttt_params(d, num_heads, a.ttt_layer_type, a.ttt_mini_batch_size, a.ttt_use_gate, a.ttt_share_qk,
                   a.ttt_conv_kernel)
        - attention
        + (d * (a.ttt_conv_kernel + 2) if a.ttt_pre_conv else 0)
    ) if n_ttt else 0
    n_moe = len(moe_block_indices(a.num_layers, a.num_experts, a.moe_every))
    moe_extra = n_moe * (moe_params(d, d_ff, a.num_experts, a.use_swiglu) - mlp) if n_moe else 0
    inactive = n_moe * (a.num_experts - a.experts_top_k) * mlp_weights if n_moe else 0
    embedding = (a.vocab_size * d + (0 if a.use_rope else a.seq_len * d)  # token and position tables
                 + (0 if a.tie_embeddings else a.vocab_size * d))  # an untied LM head
    lora_shapes = {  # (in, out) of each target projection
        "qkv": (d, (num_heads + 2 * num_kv_heads) * head_dim),
        "out": (num_heads * head_dim, d),
        "up": (d, (2 if a.use_swiglu else 1) * d_ff),
        "down": (d_ff, d),
    }
    lora_count = a.num_layers * sum(a.lora_rank * sum(lora_shapes[t]) for t in a.lora_targets) if a.lora_rank else 0
    non_embedding = a.num_layers * per_layer + ttt_extra + moe_extra + norm + lora_count
    total = embedding + non_embedding
    return ParamCounts(total=total, embedding=embedding, non_embedding=non_embedding,
                       trainable=lora_count if a.lora_rank else total, active=total - inactive)


def moe_params(d_model, d_ff, num_experts, use_swiglu=True):
    """Parameters of one `MoEFeedForward` (models/moe.py): the router and the experts.

    Example:
        >>> moe_params(64, 128, 8)
        197120
    """
    return d_model * num_experts + num_experts * (3 if use_swiglu else 2) * d_model * d_ff


def ttt_params(d_model, num_heads, kind, mini_batch_size=16, use_gate=False, share_qk=False, conv_kernel=4):
    """Parameters of one `TTTLayer` (models/ttt.py).

    Example:
        >>> ttt_params(64, 4, "linear", 16)
        18004
    """
    head_dim = d_model // num_heads
    projections = (3 if share_qk else 4) * d_model * d_model
    convs = 2 * (conv_kernel * d_model + d_model) if share_qk else 0
    gate = d_model * d_model if use_gate else 0
    lr_gate = num_heads * d_model + num_heads
    inner_norm = 2 * d_model  # per-head scale and shift
    if kind == "mlp":
        inner = 8 * d_model * head_dim + 5 * d_model  # W1 [h,f,4f], b1 [h,1,4f], W2 [h,4f,f], b2 [h,1,f]
    else:
        inner = d_model * head_dim + d_model  # W [h,f,f], b [h,1,f]
    post_norm = 2 * d_model
    return projections + convs + gate + lr_gate + mini_batch_size + inner_norm + inner + post_norm


def ttt_flops_per_token(d_model, num_heads, kind, mini_batch_size=16):
    """Training FLOPs per token of one TTT layer's inner loop, beyond 6 x its weights.

    The dual form's matmuls per head and token, forward, are for TTT-Linear
    6f² + 6Kf (k·W, q·W, the weight update; q·kᵀ, the two K-wide products
    with the gradients) and for TTT-MLP 56f² + 30Kf; training is 3x forward.
    6·params already credits the inner weights once (2f² forward for
    TTT-Linear, 16f² for TTT-MLP), so that much is subtracted.
    """
    f, k, h = d_model // num_heads, mini_batch_size, num_heads
    if kind == "mlp":
        return h * (3 * (56 * f * f + 30 * k * f) - 6 * 8 * f * f)
    return h * (3 * (6 * f * f + 6 * k * f) - 6 * f * f)


def flops_per_token(non_embedding_params, vocab_size, d_model, num_layers, seq_len, ttt_layers=0,
                    ttt_flops=0):
    """Training FLOPs per token: forward plus backward (3x forward).

    6·N for the matmuls of the blocks, 6·V·d for the LM head and
    12·layers·d·seq for the attention scores and their weighted sum (PaLM's
    appendix B; the causal mask is not credited, as in nanoGPT and MaxText).
    The `ttt_layers` TTT blocks have no attention term but `ttt_flops` each
    (`ttt_flops_per_token`).

    Example:
        >>> flops_per_token(1_000_000, 258, 128, 6, 256)
        8557440
    """
    return (
        6 * non_embedding_params
        + 6 * vocab_size * d_model
        + 12 * (num_layers - ttt_layers) * d_model * seq_len
        + ttt_layers * ttt_flops
    )


@dataclasses.dataclass(frozen=True)
class Solution:
    """An architecture chosen by `solve_target_params`."""

    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    total_params: int
    target_params: int

    @property
    def deviation(self):
        return self.total_params / self.target_params - 1


def target_aspect_ratio(target_params, prefer_depth=False):
    """d_model / num_layers that published models of this size use.

    Small models are deep for their width (Pythia-14M: 128/6 = 21,
    TinyStories), GPT-3 and Pythia sit near 64 at 100M-1B, and LLaMA-7B and
    GPT-3 6.7B+ use 128. `64 * (N / 1.5e8) ** 0.15` follows those points
    (about 30 at 1M, 64 at 150M, 114 at 7B). `--prefer-depth` halves it.
    """
    ratio = 64.0 * (target_params / 1.5e8) ** 0.15
    return ratio / 2 if prefer_depth else ratio


def _head_dim(d_model, target_params):
    if target_params < 20_000_000 and d_model % 32 == 0:
        return 32
    if d_model >= 2048 and d_model % 128 == 0:
        return 128
    return 64


def solve_target_params(
    target_params,
    vocab_size,
    seq_len,
    use_rope=True,
    use_rmsnorm=True,
    use_swiglu=True,
    tie_embeddings=False,
    prefer_depth=False,
    tolerance=0.02,
    min_layers=1,
    _ratio=None,
    use_bias=False,
):
    """Chooses d_model, layers, heads and d_ff whose exact count is near `target_params`.

    d_model is a multiple of 64; head size is 64 or 128 (32 below 20M
    parameters); d_ff is about 8/3 d_model for SwiGLU (4 d_model otherwise),
    a multiple of 64. Among the shapes within `tolerance` of the target, the
    one whose depth-to-width ratio is nearest `target_aspect_ratio` wins, a
    smaller deviation breaking near-ties. With `prefer_depth` the result
    always has more layers than the default shape when any such shape fits.
    Returns None when no shape comes within `tolerance` (the embeddings alone
    may exceed the target).

    Example:
        >>> s = solve_target_params(100_000_000, 32000, 2048)
        >>> abs(s.deviation) < 0.02
        True
    """
    if prefer_depth:
        default = solve_target_params(
            target_params, vocab_size, seq_len, use_rope, use_rmsnorm, use_swiglu, tie_embeddings,
            tolerance=tolerance, use_bias=use_bias,
        )
        if default is not None:
            deeper = solve_target_params(
                target_params, vocab_size, seq_len, use_rope, use_rmsnorm, use_swiglu, tie_embeddings,
                prefer_depth=False, tolerance=tolerance, min_layers=default.num_layers + 1,
                _ratio=target_aspect_ratio(target_params, prefer_depth=True), use_bias=use_bias,
            )
            return deeper or default
    base_ratio = target_aspect_ratio(target_params)
    ratio = _ratio or base_ratio
    best = None
    for d_model in range(64, 16384 + 1, 64):
        base_ff = (8 * d_model / 3) if use_swiglu else 4 * d_model
        base_ff = max(64, int(round(base_ff / 64)) * 64)
        for d_ff in {max(64, base_ff + k * 64) for k in (-2, -1, 0, 1, 2)}:
            head_dim = _head_dim(d_model, target_params)
            heads = d_model // head_dim
            args = dict(
                vocab_size=vocab_size, d_model=d_model, num_heads=heads, d_ff=d_ff, seq_len=seq_len,
                use_rope=use_rope, use_rmsnorm=use_rmsnorm, use_swiglu=use_swiglu, tie_embeddings=tie_embeddings,
                use_bias=use_bias,
            )
            fixed = count_params(Architecture(num_layers=0, **args)).total
            per_layer = count_params(Architecture(num_layers=1, **args)).total - fixed
            ideal = (target_params - fixed) / per_layer
            for layers in {math.floor(ideal), math.ceil(ideal)}:
                if layers < min_layers:
                    continue
                total = fixed + layers * per_layer
                deviation = abs(total / target_params - 1)
                aspect = d_model / layers
                # Outside [1/8, 4] of the usual ratio no published model lives.
                if deviation > tolerance or not base_ratio / 8 <= aspect <= base_ratio * 4:
                    continue
                # Ratio in log space; 1% of deviation weighs like 5% of ratio.
                score = abs(math.log(aspect / ratio)) + 5 * deviation
                if heads > 1 and heads % 2:
                    score += 0.1  # an odd head count is legal but no published model uses one
                if best is None or score < best[0]:
                    best = (score, Solution(d_model, layers, heads, d_ff, total, target_params))
    return best[1] if best else None
