"""TokenCrossEntropy against a numpy reference, and its config."""

import keras
import numpy as np
import pytest

from ultimate_trainer.training.losses import TokenCrossEntropy


def _reference(targets, logits):
    """Cross-entropy per token in numpy: logsumexp minus the target's logit."""
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return log_z - picked


@pytest.mark.backends
def test_token_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 5, 11)).astype("float32")
    targets = rng.integers(0, 11, (3, 5)).astype("int32")
    loss = TokenCrossEntropy()
    np.testing.assert_allclose(float(loss(targets, logits)), _reference(targets, logits).mean(), rtol=1e-5)
    # Per-token weights (Keras' sample_weight), e.g. a padding mask.
    weights = rng.integers(0, 2, (3, 5)).astype("float32")
    expected = (_reference(targets, logits) * weights).sum() / targets.size
    np.testing.assert_allclose(float(loss(targets, logits, sample_weight=weights)), expected, rtol=1e-5)
    per_token = TokenCrossEntropy(reduction=None)(targets, logits)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(per_token), _reference(targets, logits), rtol=1e-5)


def test_token_cross_entropy_config_round_trips():
    loss = TokenCrossEntropy(reduction="sum", name="ce")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, TokenCrossEntropy)
    assert (restored.reduction, restored.name) == ("sum", "ce")
