"""The closed-form parameter count against `count_params()` of built models."""

import itertools

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
    counts = sizing.count_params(77, d_model, 3, heads, 80, 24, **kwargs)
    assert counts.total == model.count_params()
    assert counts.non_embedding + counts.embedding == counts.total


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
