"""The optimizer's update statistics, skip and accumulation, against numpy and
against one large batch; the logged loss against a hand-computed cross-entropy."""

import numpy as np
import pytest

import keras

from ultimate_trainer.config import ModelConfig, TrainingConfig
from ultimate_trainer.models.causal_lm import build_causal_lm
from ultimate_trainer.training.callbacks import MetricsLogger, StepClock, StepCounter
from ultimate_trainer.training.optimizers import FiniteMean, build_optimizer
from ultimate_trainer.training.reporting import MetricsSink
from ultimate_trainer.training.schedules import WarmupCosine

pytestmark = pytest.mark.backends

RNG = np.random.default_rng(0)


def _linear(cfg, schedule=1e-2):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    model.compile(optimizer=build_optimizer(cfg, schedule, model), loss="mse")
    return model


def _numpy_grads(w, b, x, t):
    """Gradients of keras' MSE (mean over outputs, then over the batch) for y = x @ w + b."""
    residual = x @ w + b - t
    scale = 2.0 / residual.size
    return scale * x.T @ residual, scale * residual.sum(0)


def test_grad_norm_is_the_numpy_global_norm_before_clipping():
    x, t = RNG.normal(size=(8, 3)).astype("float32"), RNG.normal(size=(8, 2)).astype("float32") * 50
    model = _linear(TrainingConfig(optimizer="sgd", grad_clip=0.5))
    w, b = (np.array(v) for v in model.get_layer("dense").get_weights())
    gw, gb = _numpy_grads(w, b, x, t)
    expected = np.sqrt((gw**2).sum() + (gb**2).sum())
    model.fit(x, t, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert model.optimizer.pop_grad_norm() == pytest.approx(expected, rel=1e-5)
    assert expected > 0.5, "the norm logged is the one before clipping"
    assert model.optimizer.pop_grad_norm() is None  # reset after reading
    w2, _ = model.get_layer("dense").get_weights()
    # SGD with momentum 0.9, first step: w - lr * clipped gradient.
    np.testing.assert_allclose(w2, w - 1e-2 * gw * (0.5 / expected), rtol=1e-4, atol=1e-7)


def test_accumulated_micro_batches_equal_one_large_batch():
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, seq_len=16, dropout_rate=0.0)
    x = RNG.integers(0, 258, size=(8, 17)).astype("int32")

    def train(batch_size, accumulation):
        keras.utils.set_random_seed(3)
        model = build_causal_lm(cfg, 258)
        # SGD: the update is linear in the gradient (Adam's first step is about sign(g),
        # which turns float32 rounding in near-zero gradients into lr-sized differences).
        t = TrainingConfig(optimizer="sgd", batch_size=batch_size, gradient_accumulation_steps=accumulation,
                           grad_clip=0.05)
        model.compile(optimizer=build_optimizer(t, 1.0, model),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x[:, :-1], x[:, 1:], batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        return model

    one, four = train(8, 1), train(2, 4)
    assert int(one.optimizer.iterations) == int(four.optimizer.iterations) == 1
    assert four.optimizer.pop_grad_norm() == pytest.approx(one.optimizer.pop_grad_norm(), rel=1e-4)
    for a, b in zip(one.get_weights(), four.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any((a != b).any() for a, b in zip(one.get_weights(), build_causal_lm(cfg, 258).get_weights()))


def test_with_accumulation_the_schedule_counts_updates_not_micro_batches():
    schedule = WarmupCosine(peak=1.0, end=0.1, warmup_steps=4, total_steps=20)
    model = _linear(TrainingConfig(optimizer="sgd", gradient_accumulation_steps=4), schedule)
    x, t = RNG.normal(size=(12, 3)).astype("float32"), RNG.normal(size=(12, 2)).astype("float32")
    model.fit(x, t, batch_size=1, epochs=1, verbose=0, shuffle=False)  # 12 micro-batches, 3 updates
    assert int(model.optimizer.iterations) == 3
    assert float(model.optimizer.learning_rate) == pytest.approx(float(schedule(3)))  # not schedule(12)


def test_skip_nonfinite_keeps_the_weights_and_counts():
    model = _linear(TrainingConfig(optimizer="adamw", skip_nonfinite=2))
    x, t = RNG.normal(size=(4, 3)).astype("float32"), RNG.normal(size=(4, 2)).astype("float32")
    model.fit(x, t, batch_size=4, epochs=1, verbose=0)
    before = [np.array(v) for v in model.optimizer.variables if "iteration" not in v.path]
    weights = model.get_weights()
    bad = x.copy()
    bad[0, 0] = np.nan
    model.fit(bad, t, batch_size=4, epochs=1, verbose=0)
    assert model.optimizer.nonfinite_count == 1
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    after = [np.array(v) for v in model.optimizer.variables if "iteration" not in v.path]
    for a, b in zip(before[:-3], after[:-3]):  # the slots; the last three are the statistics
        np.testing.assert_array_equal(a, b)
    model.fit(x, t, batch_size=4, epochs=1, verbose=0)
    assert any((a != b).any() for a, b in zip(weights, model.get_weights())), "finite updates apply again"


def test_without_skip_a_nonfinite_update_is_counted():
    model = _linear(TrainingConfig(optimizer="sgd"))
    x, t = RNG.normal(size=(4, 3)).astype("float32"), RNG.normal(size=(4, 2)).astype("float32")
    x[1, 2] = np.inf
    model.fit(x, t, batch_size=4, epochs=1, verbose=0)
    assert model.optimizer.nonfinite_count == 1


def test_finite_mean_leaves_out_nan_and_inf():
    mean = FiniteMean()
    for value in (1.0, np.nan, 3.0, np.inf):
        mean.update_state(np.float32(value))
    assert float(mean.result()) == pytest.approx(2.0)


def test_logged_loss_is_the_hand_computed_cross_entropy(tmp_path):
    cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, seq_len=16, dropout_rate=0.0)
    keras.utils.set_random_seed(5)
    model = build_causal_lm(cfg, 258)
    batch = RNG.integers(0, 258, size=(4, 17)).astype("int32")
    x, y = batch[:, :-1], batch[:, 1:]
    logits = np.asarray(model.predict(x, verbose=0), dtype="float64")
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, y[..., None], -1).mean()

    model.compile(optimizer=build_optimizer(TrainingConfig(), 1e-3, model),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock = StepClock(total_steps=1, intervals=(1,))
    lines = []
    logger = MetricsLogger(clock, 1, 4 * 16, lambda s: 1e-3, MetricsSink(tmp_path), lines.append)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[StepCounter(clock), logger])
    record = logger.history[0]
    assert record["loss"] == pytest.approx(expected, rel=1e-5)
    assert record["grad_norm"] > 0 and "grad-norm" in lines[0]


def _newton_schulz(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Muon's quintic Newton-Schulz iteration on one matrix (Keller Jordan's; Keras' defaults):
    scale to unit Frobenius norm, iterate on the wide orientation."""
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def test_muon_orthogonalises_each_expert_of_a_stacked_kernel_like_numpy():
    from ultimate_trainer.models.moe import MoEFeedForward

    lr, wd, momentum = 0.02, 0.1, 0.95
    layer = MoEFeedForward(hidden_dim=6, num_experts=3, top_k=1, name="moe")
    layer.build((None, None, 4))  # experts_gate_up [3, 4, 12] (wide), experts_down [3, 6, 4] (tall)
    optimizer = build_optimizer(TrainingConfig(optimizer="muon", learning_rate=lr, weight_decay=wd, grad_clip=0),
                                lr, layer)
    variables = layer.trainable_variables
    kernels = [i for i, v in enumerate(variables) if v.path.split("/")[-1].startswith("experts_")]
    assert len(kernels) == 2
    weights = {i: keras.ops.convert_to_numpy(variables[i].value).astype("float64") for i in kernels}
    velocity = {i: np.zeros_like(w) for i, w in weights.items()}
    # Experts' gradients 100x apart: a norm over the whole stack would shrink the small ones' update.
    scales = np.array([1.0, 100.0, 0.01])[:, None, None]
    for step in range(2):
        grads = [(RNG.normal(size=v.shape) * (scales if i in kernels else 1.0)).astype("float32")
                 for i, v in enumerate(variables)]
        optimizer.apply(grads, variables)
        for i in kernels:  # decoupled decay, then momentum with Nesterov, per expert
            velocity[i] = momentum * velocity[i] + grads[i]
            nesterov = grads[i] + momentum * velocity[i]
            update = np.stack([_newton_schulz(m.astype("float64")) for m in nesterov])
            rms_scale = 0.2 * np.sqrt(max(weights[i].shape[1:]))  # Moonlight: rms_rate * sqrt(max(in, out))
            expected = weights[i] * (1 - lr * wd) - lr * rms_scale * update
            got = keras.ops.convert_to_numpy(variables[i].value).astype("float64")
            np.testing.assert_allclose(got - weights[i], expected - weights[i], rtol=1e-4, atol=1e-7,
                                       err_msg=f"{variables[i].path}, step {step + 1}")
            weights[i] = got
