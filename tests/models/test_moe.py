"""The MoE layer against a numpy reference written here: routing and combine
weights, capacity and drops, the auxiliary losses by hand; causality (later
tokens never change earlier outputs); cached decoding against the full
forward; the dense FFN as its one-expert case; the parameter formula; a `fit`
step with Muon."""

import math

import keras
import numpy as np
import pytest

from tests.models import reference as ref
from ultimate_trainer.config import ModelConfig, TrainingConfig
from ultimate_trainer.models import sizing
from ultimate_trainer.models.causal_lm import CausalLM, build_causal_lm
from ultimate_trainer.models.feed_forward import FeedForward
from ultimate_trainer.models.moe import MoEFeedForward, capacity, read_stats


def _np(x):
    return keras.ops.convert_to_numpy(x).astype("float64")


def _rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def _layer(d=12, f=16, experts=4, top_k=2, capacity_factor=1.25, use_swiglu=True, seed=1, router_scale=1.0, **kw):
    layer = MoEFeedForward(hidden_dim=f, num_experts=experts, top_k=top_k, capacity_factor=capacity_factor,
                           use_swiglu=use_swiglu, **kw)
    layer.build((None, None, d))
    layer.router.kernel.assign(_rand(d, experts, seed=seed, scale=router_scale))
    layer.experts_up.assign(_rand(*layer.experts_up.shape, seed=seed + 1, scale=0.3))
    layer.experts_down.assign(_rand(*layer.experts_down.shape, seed=seed + 2, scale=0.3))
    return layer


def numpy_moe(x, w_router, w_up, w_down, top_k, capacity_factor, use_swiglu=True, activation="gelu"):
    """Token by token: softmax router, top-k, renormalised weights; per row, each
    token in turn claims a slot with each of its choices, up to
    `ceil(c * k * seq / E)` per expert; an assignment over capacity adds nothing.
    Returns (output, weights [b, s, E] actually applied, dropped assignments)."""
    b, s, _ = x.shape
    experts = w_router.shape[1]
    probs = ref.softmax(x @ w_router)
    cap = s if not capacity_factor else min(s, math.ceil(capacity_factor * top_k * s / experts))
    out = np.zeros_like(x)
    applied = np.zeros((b, s, experts))
    dropped = 0
    for row in range(b):
        choices = np.argsort(-probs[row], axis=-1, kind="stable")[:, :top_k]  # [s, k]
        weights = np.take_along_axis(probs[row], choices, -1)
        weights = weights / weights.sum(-1, keepdims=True)
        used = np.zeros(experts, int)
        for t in range(s):
            for rank in range(top_k):
                e = choices[t, rank]
                if used[e] >= cap:
                    dropped += 1
                    continue
                used[e] += 1
                applied[row, t, e] = weights[t, rank]
                out[row, t] += weights[t, rank] * ref.feed_forward(x[row, t], w_up[e], w_down[e], use_swiglu,
                                                                   activation)
    return out, applied, dropped


@pytest.mark.backends
@pytest.mark.parametrize("capacity_factor, use_swiglu", [(1.0, True), (None, True), (1.25, False)])
def test_output_routing_and_drops_match_numpy(capacity_factor, use_swiglu):
    x = _rand(3, 10, 12, seed=5)
    layer = _layer(capacity_factor=capacity_factor, use_swiglu=use_swiglu)
    expected, applied, dropped = numpy_moe(x.astype("float64"), _np(layer.router.kernel), _np(layer.experts_up),
                                           _np(layer.experts_down), 2, capacity_factor, use_swiglu)
    np.testing.assert_allclose(_np(layer(x, training=True)), expected, atol=1e-5, rtol=1e-4)
    _, top_i, weights = layer.route(x)
    got = np.zeros((3, 10, 4))
    np.put_along_axis(got, keras.ops.convert_to_numpy(top_i), _np(weights), -1)
    routed = applied > 0
    np.testing.assert_allclose(got[routed], applied[routed], atol=1e-6)  # the combine weights
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-6)  # renormalised over the top 2
    assert float(layer.stat_dropped.value) == dropped
    if capacity_factor is None:
        assert dropped == 0 and (np.count_nonzero(applied, -1) == 2).all(), "dropless: every token, both choices"
    elif capacity_factor == 1.0:
        assert dropped > 0, "the test should exercise capacity"


@pytest.mark.backends
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("capacity_factor", [1.0, 1.25, None])
def test_later_tokens_never_change_earlier_outputs(top_k, capacity_factor):
    # 48 rows are 48 random trials (each row is its own routing group): every row's tokens from
    # a random cut on are redrawn, and every output before the cut must stay bit-equal.
    rows, seq = 48, 12
    rng = np.random.default_rng(7)
    layer = _layer(experts=4, top_k=top_k, capacity_factor=capacity_factor, router_scale=2.0)
    x = _rand(rows, seq, 12, seed=11)
    cuts = rng.integers(1, seq, rows)
    later = np.arange(seq)[None, :] >= cuts[:, None]
    changed = np.where(later[..., None], _rand(rows, seq, 12, seed=12), x)
    before, after = _np(layer(x, training=True)), _np(layer(changed, training=True))
    for row, cut in enumerate(cuts):
        np.testing.assert_array_equal(after[row, :cut], before[row, :cut], err_msg=f"row {row}, tokens before {cut}")
    assert not np.array_equal(after, before), "the perturbation reaches the later outputs"
    if capacity_factor:
        assert float(layer.stat_dropped.value) > 0, "the test should exercise capacity"


@pytest.mark.backends
def test_top1_with_one_expert_is_the_dense_ffn():
    x = _rand(2, 7, 12, seed=3)
    moe = _layer(experts=1, top_k=1)
    dense = FeedForward(hidden_dim=16)
    dense.build(x.shape)
    dense.up.kernel.assign(keras.ops.convert_to_numpy(moe.experts_up)[0])
    dense.down.kernel.assign(keras.ops.convert_to_numpy(moe.experts_down)[0])
    np.testing.assert_allclose(_np(moe(x, training=True)), _np(dense(x)), atol=1e-6)
    assert float(moe.stat_dropped.value) == 0


@pytest.mark.backends
def test_aux_and_z_losses_by_hand():
    # Router logits chosen so the arithmetic is short: x = one-hot rows, W = logits table.
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0]], "float32")
    x = np.eye(4, dtype="float32")[None]  # [1, 4 tokens, d=4]
    layer = _layer(d=4, f=8, experts=3, top_k=1, capacity_factor=None, aux_loss_coef=0.1, z_loss_coef=0.01)
    layer.router.kernel.assign(logits)
    layer(x, training=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # top-1 choices: experts 0, 1, 2, 0 -> f = [2/4, 1/4, 1/4]
    f = np.array([0.5, 0.25, 0.25])
    aux = 3 * (f * probs.mean(0)).sum()
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    assert len(layer.losses) == 1
    assert float(keras.ops.convert_to_numpy(layer.losses[0])) == pytest.approx(0.1 * aux + 0.01 * z, rel=1e-5)
    stats = read_stats(keras.Sequential([keras.Input((4, 4)), layer]))
    assert stats["aux_loss"] == pytest.approx(aux, rel=1e-5) and stats["z_loss"] == pytest.approx(z, rel=1e-5)
    assert stats["expert_load"] == pytest.approx(list(f)) and stats["load_max"] == pytest.approx(1.5)
    assert stats["loss_terms"] == pytest.approx(0.1 * aux + 0.01 * z, rel=1e-5)
    assert float(layer.stat_calls.value) == 0, "read_stats resets"
    layer(x)  # inference: no loss, no statistics
    assert not layer.losses and float(layer.stat_calls.value) == 0


@pytest.mark.backends
def test_capacity_counts_every_drop():
    # Every token picks experts 0 and 1: with capacity 4, the first four tokens take both
    # experts' slots and the last two lose both choices.
    x = np.ones((1, 6, 4), "float32")
    layer = _layer(d=4, f=8, experts=3, top_k=2, capacity_factor=1.0)
    layer.router.kernel.assign(np.array([[3.0, 1.0, 0.0]] * 4, "float32"))
    assert capacity(6, 3, 2, 1.0) == 4
    out = _np(layer(x, training=True))
    assert float(layer.stat_dropped.value) == (6 - 4) * 2
    assert np.abs(out[0, :4]).sum() > 0 and np.abs(out[0, 4:]).max() == 0, "the last two tokens lost both choices"


def _forget_counts(state):
    """A decoding state whose expert counts start again from zero."""
    return [dict(block, moe=dict(block["moe"], counts=keras.ops.zeros_like(block["moe"]["counts"])))
            for block in state]


# Attention blocks; TTT blocks continue expert counts through the same block code
# (an MoE layer in a TTT block decodes in tests/models/test_harness.py).
@pytest.mark.backends
@pytest.mark.parametrize("ttt", [None])
def test_cached_decoding_drops_what_the_full_forward_drops(ttt):
    # A row of seq_len tokens decoded in pieces: the cache's expert counts make each piece meet
    # the capacity the tokens before it left. Without `ttt`, the generation path (KV cache,
    # compiled): a prompt, a 3-token piece, then single tokens; with it, block 1 is a TTT block,
    # which continues its inner weights and gradient sums through the same calls.
    from ultimate_trainer.backend import compile_model_fn

    keras.utils.set_random_seed(0)
    model = CausalLM(vocab_size=50, seq_len=16, d_model=32, num_layers=2, num_heads=4, d_ff=48,
                     moe=dict(num_experts=4, top_k=2, capacity_factor=1.0),
                     **({"ttt": ttt, "ttt_layers": [1]} if ttt else {}))
    model.build((None, 16))
    for block in model.blocks:  # a confident router, so capacity bites
        block.mlp.router.kernel.assign(_np(block.mlp.router.kernel) * 100)
    tokens = np.random.default_rng(1).integers(0, 50, (1, 16)).astype("int32")
    full = _np(model(tokens))

    step, state, cuts = compile_model_fn(model, model.call_with_state), model.initial_state(1, 16), [0, 6, *range(9, 17)]
    decoded, forgetful = [], []
    for start, end in zip(cuts, cuts[1:]):
        piece, position = tokens[:, start:end], np.int32(start)
        forgetful.append(_np(step(piece, _forget_counts(state), position)[0]))
        logits, state = step(piece, state, position)
        decoded.append(_np(logits))
    np.testing.assert_allclose(np.concatenate(decoded, 1), full, atol=2e-5)
    # The check can fail: without the counts, each piece would be routed as a row of its own.
    assert np.abs(np.concatenate(forgetful, 1) - full).max() > 1e-3


def test_capacity_formula():
    assert capacity(256, 8, 2, 1.25) == 80
    assert capacity(1, 8, 2, 1.25) == 1  # decoding one token: its k distinct experts always fit
    assert capacity(10, 4, 2, None) == 10


def _moe_cfg(**kw):
    values = dict(d_model=32, num_layers=3, num_heads=2, d_ff=24, seq_len=16, dropout_rate=0.0, num_experts=4)
    values.update(kw)
    return ModelConfig(**values)


@pytest.mark.parametrize("moe_every, use_swiglu, tie", [(1, True, False), (2, False, True), (3, True, True)])
def test_parameter_formula_matches_the_built_model(moe_every, use_swiglu, tie):
    m = _moe_cfg(moe_every=moe_every, swiglu=use_swiglu, tie_embeddings=tie)
    model = build_causal_lm(m, 50)
    counts = sizing.count_params(sizing.Architecture(50, 32, 3, 2, 24, 16, use_swiglu=use_swiglu, tie_embeddings=tie, num_experts=4,
                                 experts_top_k=2, moe_every=moe_every))
    assert model.count_params() == counts.total
    assert sum(math.prod(v.shape) for v in model.trainable_weights) == counts.trainable == counts.total
    moe_blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEFeedForward)]
    assert moe_blocks == [i for i in range(3) if (i + 1) % moe_every == 0]
    mlp = (3 if use_swiglu else 2) * 32 * 24
    assert counts.total - counts.active == len(moe_blocks) * 2 * mlp  # 2 of 4 experts idle per token


def test_config_round_trips():
    model = build_causal_lm(_moe_cfg(moe_every=2, capacity_factor=0), 50)
    again = CausalLM.from_config(model.get_config())
    again.build((None, 16))
    assert again.get_config() == model.get_config() and model.blocks[1].mlp.capacity_factor is None
    again.set_weights(model.get_weights())
    x = np.random.default_rng(0).integers(0, 50, (2, 16)).astype("int32")
    np.testing.assert_allclose(_np(again(x)), _np(model(x)), atol=1e-6)
    assert [w.path.split("/", 1)[1] for w in model.blocks[1].mlp.weights][:2] == [
        "block_1/moe/experts_gate_up", "block_1/moe/experts_down"]


@pytest.mark.backends
def test_fit_with_muon_trains_and_logs_the_lm_loss(tmp_path):
    from ultimate_trainer.training.callbacks import MetricsLogger, StepClock, StepCounter
    from ultimate_trainer.training.optimizers import build_optimizer
    from ultimate_trainer.training.reporting import MetricsSink

    keras.utils.set_random_seed(0)
    model = build_causal_lm(_moe_cfg(num_layers=2, router_z_loss_coef=0.1), 50)
    x = np.tile(np.arange(17) % 5, (4, 1)).astype("int32")
    logits = _np(model(x[:, :-1]))
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    lm_loss = -np.take_along_axis(log_probs, x[:, 1:, None], -1).mean()

    optimizer = build_optimizer(TrainingConfig(optimizer="muon", learning_rate=0.02), 0.02, model)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock = StepClock(total_steps=1, intervals=(1,))
    logger = MetricsLogger(clock, 1, 64, lambda s: 0.02, MetricsSink(tmp_path), lambda line: None,
                           moe_stats=lambda: read_stats(model))
    model.fit(x[:, :-1], x[:, 1:], batch_size=4, epochs=1, verbose=0, callbacks=[StepCounter(clock), logger])
    record = logger.history[0]
    assert record["loss"] == pytest.approx(lm_loss, rel=1e-4), "the aux losses are taken out of the logged loss"
    assert record["moe_z_loss"] > 0 and sum(record[f"expert_load_{i}"] for i in range(4)) == pytest.approx(1.0)

    muon = {v.path for v in model.trainable_variables if not optimizer._should_use_adamw(v)}
    assert muon == {f"causal_lm/block_{i}/{name}" for i in range(2) for name in (
        "attention/qkv/kernel", "attention/out/kernel", "moe/experts_gate_up", "moe/experts_down")}
    history = model.fit(x[:, :-1], x[:, 1:], batch_size=4, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
