"""Every layer class and the model through the shared harness (tests/models/harness.py)."""

import keras
import numpy as np
import pytest

from tests.models.harness import model_call, run_layer_test
from ultimate_trainer.models.attention import CausalSelfAttention
from ultimate_trainer.models.causal_lm import CausalLM
from ultimate_trainer.models.feed_forward import FeedForward
from ultimate_trainer.models.moe import MoEFeedForward
from ultimate_trainer.models.pre_conv import PreConv
from ultimate_trainer.models.transformer_block import TransformerBlock
from ultimate_trainer.models.ttt import TTTLayer

pytestmark = pytest.mark.backends

# Tiny on purpose: two rows of 6 tokens of width 16; TTT mini-batches of 4, so the
# state checks stop and continue inside a mini-batch and across its boundary.
X = np.random.default_rng(0).normal(size=(2, 6, 16)).astype("float32")
TTT = {"mini_batch_size": 4}
LAYERS = {
    "attention": (CausalSelfAttention, {"num_heads": 2, "head_dim": 8, "num_kv_heads": 1, "use_bias": True}),
    "feed_forward": (FeedForward, {"hidden_dim": 24}),
    "moe": (MoEFeedForward, {"hidden_dim": 8, "num_experts": 4, "top_k": 2, "capacity_factor": 1.0}),
    "ttt_linear": (TTTLayer, {"d_model": 16, "num_heads": 2, "kind": "linear", "share_qk": True, "use_gate": True,
                              **TTT}),
    "ttt_mlp": (TTTLayer, {"d_model": 16, "num_heads": 2, "kind": "mlp", **TTT}),
    "pre_conv": (PreConv, {"d_model": 16}),
    "attention_block": (TransformerBlock, {"num_heads": 2, "head_dim": 8, "d_ff": 24, "use_rmsnorm": False,
                                           "use_bias": True}),
    "ttt_moe_block": (TransformerBlock, {"num_heads": 2, "head_dim": 8, "d_ff": 8,
                                         "ttt": {"kind": "linear", "pre_conv": True, **TTT},
                                         "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0}}),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer(name):
    keras.utils.set_random_seed(0)
    cls, kwargs = LAYERS[name]
    assert run_layer_test(cls, kwargs, X) == X.shape


def test_model():
    # A hybrid: block 0 attention with a dense MLP, block 1 TTT (with the pre-conv) with experts.
    keras.utils.set_random_seed(0)
    kwargs = dict(vocab_size=32, seq_len=6, d_model=16, num_layers=2, num_heads=2, d_ff=16, ttt_layers=[1],
                  ttt={"kind": "linear", "pre_conv": True, **TTT}, moe={"num_experts": 4, "top_k": 2},
                  moe_every=2)
    tokens = np.random.default_rng(1).integers(0, 32, (2, 6)).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    shape = run_layer_test(CausalLM, kwargs, tokens, stateful_call=model_call, loss=loss, mixed_output_dtype="float32")
    assert shape == (2, 6, 32)
