"""ultimate_trainer: pretrain language models with Keras 3 on JAX, PyTorch or TensorFlow.

Example:
    from ultimate_trainer import load_model
    model, tokenizer = load_model("output_ultimate/checkpoint-170")
"""

__version__ = "0.1.0"


def load_model(checkpoint_dir):
    """Returns `(model, tokenizer)` from a checkpoint directory; see `checkpoint.store.load_model`."""
    # lazy: every submodule import runs this file first; loading the checkpoint code (and keras) here would slow them all
    from ultimate_trainer.checkpoint.store import load_model as _load

    return _load(checkpoint_dir)
