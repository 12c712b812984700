"""One test every layer class (and the model) passes, after keras-hub's `TestCase.run_layer_test`.

`run_layer_test` checks, for a layer class and its constructor arguments:
- the JSON `get_config` round trip, and `serialize_keras_object` / `deserialize_keras_object`;
- a symbolic call (KerasTensors) and an eager call: the output's shape, float32 under float32;
- one compiled `fit` step on the layer's own output;
- under `mixed_bfloat16`: every weight float32, the output bfloat16 (or `mixed_output_dtype`), and
  every sublayer computing in bfloat16 but those named in `float32_sublayers` (norms, the router);
- the state protocol: from `initial_state(batch, max_length)`, the tokens fed one at a time
  through the stateful call, and also in two uneven pieces, give the stateless full-sequence call.

Example:
    run_layer_test(FeedForward, {"hidden_dim": 32}, np.ones((2, 8, 16), "float32"))
"""

import json
import re

import keras
import numpy as np

# Sublayers that compute in float32 under a mixed policy on purpose (see make_norm, MoE, TTT).
FLOAT32_SUBLAYERS = r"(attention_norm|mlp_norm|final_norm|norm|post_norm|router)"


def layer_call(layer, x, state, position):
    return layer(x, state=state, position=position)


def model_call(model, x, state, position):
    return model.call_with_state(x, state, position)


def run_layer_test(cls, init_kwargs, input_data, stateful_call=layer_call, loss=None,
                   mixed_output_dtype="bfloat16", float32_sublayers=FLOAT32_SUBLAYERS, state_atol=2e-5):
    """Every check of the module docstring for `cls(**init_kwargs)` on `input_data`.

    `loss`: None fits the layer's output to itself plus one (mean squared error); a language
    model's loss fits its logits to the input tokens. `stateful_call(layer, x, state, position)`
    returns `(y, state)`: `layer_call` for a layer, `model_call` for a `CausalLM`."""
    _check_serialization(cls(**init_kwargs))
    expected_shape = _check_symbolic_and_eager(cls, init_kwargs, input_data)
    _check_fit_step(cls(**init_kwargs), input_data, loss)
    _check_mixed_precision(cls, init_kwargs, input_data, mixed_output_dtype, float32_sublayers)
    _check_state_protocol(cls(**init_kwargs), input_data, stateful_call, state_atol)
    return expected_shape


def _json(config):
    return json.dumps(config, sort_keys=True)


def _check_serialization(layer):
    config = layer.get_config()
    revived = type(layer).from_config(json.loads(_json(config)))
    assert _json(revived.get_config()) == _json(config), "get_config does not round-trip through JSON"
    serialized = json.loads(_json(keras.saving.serialize_keras_object(layer)))
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is type(layer) and _json(revived.get_config()) == _json(config)


def _check_symbolic_and_eager(cls, init_kwargs, input_data):
    symbolic = cls(**init_kwargs)(keras.KerasTensor(input_data.shape, str(input_data.dtype)))
    layer = cls(**init_kwargs)
    eager = layer(input_data)
    assert layer.built
    assert tuple(symbolic.shape) == tuple(eager.shape), (symbolic.shape, eager.shape)
    assert keras.backend.standardize_dtype(eager.dtype) == "float32"
    assert np.isfinite(keras.ops.convert_to_numpy(eager)).all()
    return tuple(eager.shape)


class _Wrapper(keras.Model):
    def __init__(self, layer):
        super().__init__(name="wrapper")  # tensorflow refuses the default "__wrapper" as a scope name
        self.layer = layer

    def call(self, x):
        return self.layer(x)


def _check_fit_step(layer, input_data, loss):
    output = keras.ops.convert_to_numpy(layer(input_data))
    if loss is None:  # a target the layer misses, so the step has a gradient
        target, loss = output + 1.0, "mse"
    else:
        target = np.asarray(input_data)
    model = layer if isinstance(layer, keras.Model) else _Wrapper(layer)
    before = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    history = model.fit(input_data, target, batch_size=len(input_data), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [keras.ops.convert_to_numpy(w) for w in layer.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "one fit step changed no weight"


def _check_mixed_precision(cls, init_kwargs, input_data, output_dtype, float32_sublayers):
    policy = keras.DTypePolicy("mixed_bfloat16")
    layer = cls(**{**init_kwargs, "dtype": policy})
    output = layer(input_data)
    assert keras.backend.standardize_dtype(output.dtype) == output_dtype
    for weight in layer.weights:
        if "float" in str(weight.dtype):
            assert keras.backend.standardize_dtype(weight.dtype) == "float32", weight.path
    for sublayer in layer._flatten_layers(include_self=False):
        want = "float32" if re.fullmatch(float32_sublayers, sublayer.name) else "bfloat16"
        assert sublayer.compute_dtype == want, f"{sublayer.path} computes in {sublayer.compute_dtype}"
        assert sublayer.variable_dtype == "float32", sublayer.path


def _check_state_protocol(layer, input_data, stateful_call, atol):
    batch, length = input_data.shape[0], input_data.shape[1]
    whole = keras.ops.convert_to_numpy(layer(input_data))
    state = layer.initial_state(batch, length)
    pieces = []
    for i in range(length):
        y, state = stateful_call(layer, input_data[:, i : i + 1], state, i)
        pieces.append(keras.ops.convert_to_numpy(y))
    np.testing.assert_allclose(np.concatenate(pieces, 1), whole, atol=atol, rtol=1e-4)
    cut = length // 2  # a prompt, then the rest in one piece
    first, state = stateful_call(layer, input_data[:, :cut], layer.initial_state(batch, length), 0)
    rest, _ = stateful_call(layer, input_data[:, cut:], state, cut)
    got = np.concatenate([keras.ops.convert_to_numpy(first), keras.ops.convert_to_numpy(rest)], 1)
    np.testing.assert_allclose(got, whole, atol=atol, rtol=1e-4)
