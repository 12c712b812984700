"""The closed-form parameter count against `count_params()` of built models."""

import itertools

import numpy as np
import pytest

from ultimate_trainer.models import sizing
from ultimate_trainer.models.causal_lm import CausalLM

pytestmark = pytest.mark.backends

GRID = list(
    itertools.product(
        [(64, 4, None), (96, 6, 2), (64, 2, 1)],  # d_model, heads, kv heads
        [True, False],  # rope
        [True, False],  # rmsnorm
        [True, False],  # swiglu
        [True, False],  # tied
    )
)


@pytest.mark.parametrize("dims,use_rope,use_rmsnorm,use_swiglu,tie", GRID)
def test_formula_equals_count_params(dims, use_rope, use_rmsnorm, use_swiglu, tie):
    d_model, heads, kv = dims
    kwargs = dict(num_kv_heads=kv, use_rope=use_rope, use_rmsnorm=use_rmsnorm, use_swiglu=use_swiglu,
                  tie_embeddings=tie)
    model = CausalLM(vocab_size=77, seq_len=24, d_model=d_model, num_layers=3, num_heads=heads, d_ff=80, **kwargs)
    model.build((None, 24))
    counts = sizing.count_params(sizing.Architecture(77, d_model, 3, heads, 80, 24, **kwargs))
    assert counts.total == model.count_params()
    assert counts.non_embedding + counts.embedding == counts.total


@pytest.mark.parametrize("kwargs", [
    dict(use_rope=False, use_rmsnorm=False, use_swiglu=False, tie_embeddings=True),  # GPT-2
    dict(num_kv_heads=2),  # LLaMA blocks, grouped-query attention
    dict(ttt_layers=[0], moe_every=2),  # a TTT block (dense MLP) and an MoE block (attention) of the 3
])
def test_formula_with_biases_equals_count_params(kwargs):
    kwargs = dict(kwargs)
    model_kwargs, formula_kwargs = dict(kwargs, use_bias=True), dict(kwargs, use_bias=True)
    if "ttt_layers" in kwargs:
        model_kwargs.update(ttt=dict(kind="linear", mini_batch_size=4), moe=dict(num_experts=4, top_k=2))
        formula_kwargs.update(ttt_layer_type="linear", ttt_mini_batch_size=4, num_experts=4)
    model = CausalLM(vocab_size=77, seq_len=24, d_model=64, num_layers=3, num_heads=4, d_ff=80, **model_kwargs)
    model.build((None, 24))
    biased = sizing.count_params(sizing.Architecture(77, 64, 3, 4, 80, 24, **formula_kwargs))
    assert biased.total == model.count_params()
    plain = sizing.count_params(sizing.Architecture(77, 64, 3, 4, 80, 24, **dict(formula_kwargs, use_bias=False)))
    # The biases the formula adds are exactly the Dense biases the model holds.
    assert biased.total - plain.total == sum(int(np.prod(w.shape)) for w in model.weights
                                             if w.path.endswith("/bias") and "ttt" not in w.path)
    assert biased.total - biased.active == plain.total - plain.active  # experts take no bias


def test_presets_are_exactly_the_published_table():
    assert sizing.SIZE_PRESETS == {
        "nano": (128, 6, 4, 512),
        "tiny": (256, 8, 8, 1024),
        "small": (512, 12, 8, 2048),
        "medium": (768, 12, 12, 3072),
        "large": (1024, 24, 16, 4096),
        "xlarge": (1280, 32, 20, 5120),
    }


def test_flops_per_token_formula():
    # 6N + 6Vd + 12Lds, written out for one case.
    assert sizing.flops_per_token(1000, 10, 4, 2, 8) == 6 * 1000 + 6 * 10 * 4 + 12 * 2 * 4 * 8


def test_block_style_names():
    assert sizing.block_style(True, True, True) == "llama"
    assert sizing.block_style(False, False, False) == "gpt2"
    assert sizing.block_style(True, False, True) == "custom"


SWEEP = [int(10 ** (6 + 4 * i / 39)) for i in range(40)]  # 1M .. 10B, log-spaced


@pytest.mark.parametrize("vocab", [258, 32000])
def test_target_params_solver_sweep(vocab):
    for n in SWEEP:
        if vocab == 32000 and n < 20_000_000:
            continue  # the embeddings alone nearly fill such budgets; see the infeasible test
        for prefer_depth in (False, True):
            s = sizing.solve_target_params(n, vocab, 2048, prefer_depth=prefer_depth)
            assert s is not None, (n, vocab, prefer_depth)
            assert abs(s.total_params / n - 1) <= 0.02, (n, s)
            exact = sizing.count_params(sizing.Architecture(vocab, s.d_model, s.num_layers, s.num_heads, s.d_ff, 2048)).total
            assert exact == s.total_params
            assert s.d_model % 64 == 0 and s.d_ff % 64 == 0
            head_dim = s.d_model // s.num_heads
            assert head_dim in ((32, 64, 128) if n < 20_000_000 else (64, 128))
            assert abs(s.d_ff - 8 * s.d_model / 3) <= 2 * 64 + 32
            ratio = s.d_model / s.num_layers
            assert 2 <= ratio <= 500, (n, s)
        default = sizing.solve_target_params(n, vocab, 2048)
        deeper = sizing.solve_target_params(n, vocab, 2048, prefer_depth=True)
        assert deeper.num_layers > default.num_layers, (n, default, deeper)


def test_published_scale_shapes_are_in_range():
    # GPT-3/Pythia-like widths at 125M and LLaMA-like at 7B.
    s = sizing.solve_target_params(125_000_000, 50257, 2048)
    assert 512 <= s.d_model <= 1024 and 8 <= s.num_layers <= 16
    s = sizing.solve_target_params(7_000_000_000, 32000, 2048)
    assert 3584 <= s.d_model <= 4608 and 28 <= s.num_layers <= 40


def test_target_params_plain_mlp_uses_four_d():
    s = sizing.solve_target_params(50_000_000, 258, 512, use_swiglu=False, use_rope=False, use_rmsnorm=False)
    assert abs(s.d_ff - 4 * s.d_model) <= 128
    exact = sizing.count_params(sizing.Architecture(258, s.d_model, s.num_layers, s.num_heads, s.d_ff, 512, use_swiglu=False,
                                use_rope=False, use_rmsnorm=False)).total
    assert abs(exact / 50_000_000 - 1) <= 0.02


def test_infeasible_target_returns_none():
    assert sizing.solve_target_params(1_000_000, 32000, 2048) is None


def test_solved_model_builds_to_the_counted_size():
    s = sizing.solve_target_params(3_000_000, 258, 64)
    model = CausalLM(vocab_size=258, seq_len=64, d_model=s.d_model, num_layers=s.num_layers,
                     num_heads=s.num_heads, d_ff=s.d_ff)
    model.build((None, 64))
    assert model.count_params() == s.total_params
