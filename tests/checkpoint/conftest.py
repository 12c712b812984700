"""Fixtures for the checkpoint tests."""

import pytest

from ultimate_trainer.checkpoint import store


@pytest.fixture(scope="session")
def saver():
    """save(dir, name, step) writes a real checkpoint of a tiny model."""
    import keras

    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.data.tokenizers import ByteTokenizer
    from ultimate_trainer.models.causal_lm import build_causal_lm

    cfg = resolve_config({"model.d_model": 16, "model.num_layers": 1, "model.num_heads": 2, "model.d_ff": 32,
                          "model.seq_len": 8})
    model = build_causal_lm(cfg.model, 258)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    def save(directory, name, step, **kw):
        return store.save_checkpoint(model, ByteTokenizer(), cfg, directory, name, {"step": step}, **kw)

    return save
