"""TTT blocks inside CausalLM: exact parameter formula, config round trip, fit in float32 and bf16,
and the flags' errors."""

import numpy as np
import pytest

import keras

from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError
from ultimate_trainer.models import sizing
from ultimate_trainer.models.causal_lm import CausalLM, build_causal_lm


def _cfg(**kw):
    values = {"model.d_model": 32, "model.num_layers": 3, "model.num_heads": 4, "model.d_ff": 64,
              "model.seq_len": 24, "model.ttt_mini_batch_size": 8}
    values.update({f"model.{k}": v for k, v in kw.items()})
    return resolve_config(values).model


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("gate, share_qk, layers", [(False, False, None), (True, True, "0,2"), (False, True, "1")])
def test_parameter_formula_matches_the_built_model(kind, gate, share_qk, layers):
    m = _cfg(ttt_layer_type=kind, ttt_use_gate=gate, ttt_share_qk=share_qk, ttt_layers=layers)
    model = build_causal_lm(m, 100)
    counts = sizing.count_params(sizing.Architecture(100, 32, 3, 4, 64, 24, ttt_layer_type=kind, ttt_layers=layers,
                                 ttt_mini_batch_size=8, ttt_use_gate=gate, ttt_share_qk=share_qk))
    assert model.count_params() == counts.total
    blocks = [i for i, b in enumerate(model.blocks) if b.ttt is not None]
    assert blocks == ([0, 1, 2] if layers is None else [int(i) for i in layers.split(",")])
    one = build_causal_lm(m, 100).blocks[blocks[0]].ttt
    assert one.count_params() == sizing.ttt_params(32, 4, kind, 8, gate, share_qk)


def test_config_round_trips_and_the_recipe_names_work():
    model = build_causal_lm(_cfg(ttt_layer_type="ttt_mlp", ttt_layers="1", ttt_base_lr=0.05), 100)
    again = CausalLM.from_config(model.get_config())
    again.build((None, 24))
    assert again.get_config() == model.get_config()
    assert model.ttt["kind"] == "mlp" and model.blocks[1].ttt.base_lr == 0.05 and model.blocks[0].ttt is None
    x = np.random.default_rng(0).integers(0, 100, (2, 24)).astype("int32")
    again.set_weights(model.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6)


# A float32 fit step of a TTT model: tests/models/test_harness.py.
@pytest.mark.backends
@pytest.mark.parametrize("policy", ["mixed_bfloat16"])
def test_a_fit_step_runs_and_lowers_the_loss(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = build_causal_lm(_cfg(ttt_layer_type="linear", seq_len=20), 100)  # 2 mini-batches and a partial
        model.compile(optimizer=keras.optimizers.AdamW(3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = np.tile(np.arange(21) % 7, (4, 1)).astype("int32")
        history = model.fit(x[:, :-1], x[:, 1:], batch_size=4, epochs=6, verbose=0)
        losses = history.history["loss"]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model.ttt_mini_batch_size": 8}, "--ttt-mini-batch-size configures TTT layers; add --ttt-layer-type"),
        ({"model.ttt_layer_type": "linear", "model.ttt_layers": "0,9"}, "--ttt-layers '0,9': give comma-separated"),
        ({"model.ttt_layer_type": "linear", "model.ttt_layers": "a"}, "--ttt-layers 'a': give comma-separated"),
        ({"model.ttt_layer_type": "mlp", "model.ttt_mini_batch_size": 0}, "--ttt-mini-batch-size must be a positive"),
        ({"model.ttt_layer_type": "linear", "model.use_lora": True}, "--use-lora targets attention projections"),
        ({"model.ttt_layer_type": "rnn"}, "--ttt-layer-type"),
    ],
)
def test_ttt_flag_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config({"model.d_model": 32, "model.num_layers": 3, "model.num_heads": 4, **values})


@pytest.mark.backends
@pytest.mark.parametrize("kind, backbone", [("linear", "transformer"), ("mlp", "transformer"), ("linear", "mamba")])
def test_state_passing_over_windows_equals_the_whole_sequence(kind, backbone):
    # An all-TTT stack has no positions beyond the RoPE inside each mini-batch, so a
    # stream cut at mini-batch boundaries, with the state passed on, is one sequence.
    # The Mamba-style backbone's causal convs pass their last inputs on too.
    model = build_causal_lm(_cfg(ttt_layer_type=kind, seq_len=32, num_layers=2, ttt_backbone=backbone), 100)
    x = np.random.default_rng(1).integers(0, 100, (2, 32)).astype("int32")
    whole, _ = model.call_with_state(x, model.initial_state(2))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(whole), keras.ops.convert_to_numpy(model(x)), atol=1e-6)
    states, pieces = model.initial_state(2), []
    for start, end in ((0, 8), (8, 24), (24, 32)):  # windows of 8, 16 and 8 tokens
        logits, states = model.call_with_state(x[:, start:end], states)
        pieces.append(keras.ops.convert_to_numpy(logits))
    np.testing.assert_allclose(np.concatenate(pieces, 1), keras.ops.convert_to_numpy(whole), atol=2e-5)
    fresh, _ = model.call_with_state(x[:, 8:24], model.initial_state(2))
    assert np.abs(keras.ops.convert_to_numpy(fresh) - pieces[1]).max() > 1e-4, "the state carries information"


def _window_states(model, windows):
    states = model.initial_state(windows[0].shape[0])
    for w in windows:
        _, states = model.call_with_state(w, states)
    return keras.tree.flatten(states)


@pytest.mark.backends
def test_training_carries_each_rows_state_into_the_next_batch():
    # SGD with lr 0: fit changes no weight, so after fitting on a stream's windows in order the
    # carried states must be exactly the ones `call_with_state` passes along, and after
    # `stream_windows` batches the streams restart from the learned weights.
    cfg = _cfg(ttt_layer_type="linear", seq_len=16, num_layers=2, ttt_backbone="mamba", dropout_rate=0.0)
    model = build_causal_lm(cfg, 100, state_passing_rows=2, stream_windows=3)  # the 4th batch starts new streams
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stream = np.random.default_rng(2).integers(0, 100, (2, 49)).astype("int32")
    windows = [stream[:, i * 16 : i * 16 + 16] for i in range(3)]
    targets = [stream[:, i * 16 + 1 : i * 16 + 17] for i in range(3)]

    def fit(order):
        x = np.concatenate([windows[i] for i in order]); y = np.concatenate([targets[i] for i in order])
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)

    def carried():
        return [keras.ops.convert_to_numpy(v) for vs in model.carried for v in vs]

    fit([0, 1, 2])
    assert int(keras.ops.convert_to_numpy(model.stream_step)) == 3
    want = [keras.ops.convert_to_numpy(t) for t in _window_states(model, windows)]
    for got, expected in zip(carried(), want, strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5)
    assert model.carried_state_size == 1 + sum(v.size for v in want)  # and the step counter

    fit([1])
    want = [keras.ops.convert_to_numpy(t) for t in _window_states(model, windows[1:2])]
    for got, expected in zip(carried(), want, strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5)
    # Evaluation neither reads nor moves the carried states.
    before = carried()
    model.evaluate(windows[2], targets[2], batch_size=2, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, carried()))


def test_state_passing_models_round_trip_and_exchange_weights(tmp_path):
    from ultimate_trainer.checkpoint.store import load_model_weights

    cfg = _cfg(ttt_layer_type="linear", seq_len=16, num_layers=2)
    carrying = build_causal_lm(cfg, 100, state_passing_rows=4)
    plain = build_causal_lm(cfg, 100)
    assert carrying.count_params() == plain.count_params()  # carried states are not parameters
    again = CausalLM.from_config(carrying.get_config())
    again.build((None, 16))
    assert again.state_passing_rows == 4 and again.carried_state_size == carrying.carried_state_size
    # A state-passing checkpoint initialises a plain run: weights by name, carried states left out.
    from ultimate_trainer.checkpoint.store import MODEL_FILE
    carrying.save(tmp_path / MODEL_FILE)
    (tmp_path / "training_args.json").write_text('{"training": {"batch_size": 4}, "model": {"state_passing": true}}')
    load_model_weights(plain, tmp_path)
    for a, b in zip(plain.weights, [v for v in carrying.weights if "carried" not in v.path and "stream" not in v.path],
                    strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model.state_passing": True}, "--state-passing configures TTT layers; add --ttt-layer-type"),
        ({"model.ttt_layer_type": "linear", "model.state_passing": True, "model.seq_len": 20},
         "--state-passing needs --seq-len \\(20\\) to be a multiple of --ttt-mini-batch-size \\(16\\), so each window ends on a whole inner step; try --seq-len 16"),
        ({"model.ttt_layer_type": "linear", "model.state_passing": True, "model.seq_len": 32, "loader.stride": 4},
         "--stride 4: --state-passing reads each stream contiguously"),
        ({"model.ttt_backbone": "mamba"}, "--ttt-backbone configures TTT layers"),
    ],
)
def test_state_passing_flag_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config({"model.d_model": 32, "model.num_layers": 3, "model.num_heads": 4, **values})


def test_the_mamba_backbone_sets_its_parts_and_the_formula_counts_them():
    m = _cfg(ttt_layer_type="mlp", ttt_backbone="mamba")
    assert m.ttt_share_qk and m.ttt_use_gate
    model = build_causal_lm(m, 100)
    assert all(b.pre_conv is not None for b in model.blocks)
    counts = sizing.count_params(sizing.Architecture(100, 32, 3, 4, 64, 24, ttt_layer_type="mlp", ttt_mini_batch_size=8,
                                 ttt_use_gate=True, ttt_share_qk=True, ttt_pre_conv=True))
    assert model.count_params() == counts.total
    # the pre-conv of one block: RMSNorm scale, a depthwise kernel of 4 and a bias per channel
    assert model.blocks[0].pre_conv.count_params() == 32 * (1 + 4 + 1)
