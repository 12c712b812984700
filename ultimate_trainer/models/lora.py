"""LoRA on top of Keras' own `Dense.enable_lora`: targets, freezing, adapter files, merging.

Keras already computes `x @ (W + A @ B * alpha / rank)` and, when a model is
saved, stores the merged kernel; this module chooses which projections get
adapters, freezes everything else, and saves, loads and merges adapters on
their own.
"""

import json
from pathlib import Path

import numpy as np

from ultimate_trainer.config.parsers import parse_lora_targets
from ultimate_trainer.errors import UserError

# --lora-targets name -> (block sublayer, Dense attribute)
TARGETS = {
    "qkv": ("attention", "qkv"),
    "out": ("attention", "out"),
    "up": ("mlp", "up"),  # the fused gate/up projection with SwiGLU
    "down": ("mlp", "down"),
}
DEFAULT_TARGETS = "qkv,out"
ADAPTER_FILE = "lora_adapter.npz"
ADAPTER_CONFIG = "lora_config.json"


# 'qkv,out' -> ('qkv', 'out'): the config's parser, whose names are the keys of `TARGETS`.
parse_targets = parse_lora_targets


def target_layers(model, targets):
    """Yields the Dense layers of `model` that `targets` name, block by block."""
    for block in model.blocks:
        for name in targets:
            sublayer, attr = TARGETS[name]
            yield getattr(getattr(block, sublayer), attr)


def _relative(path):
    # Strip the model's own name so adapters load onto any instance.
    return path.split("/", 1)[1]


def enable_lora(model, rank, alpha=None, targets=("qkv", "out")):
    """Adds rank-`rank` adapters to the target projections and freezes every other weight.

    Example:
        enable_lora(model, rank=8, targets=("qkv", "out"))
        model.count_params(), sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    """
    for dense in target_layers(model, targets):
        dense.enable_lora(rank, lora_alpha=alpha)
    for variable in model.weights:
        if "lora_kernel" not in variable.path:
            variable.trainable = False
    return model


def lora_weights(model):
    return {_relative(v.path): v for v in model.weights if "lora_kernel" in v.path}


def save_lora(model, directory, rank, alpha, targets):
    """Writes the adapters alone (`lora_adapter.npz` + `lora_config.json`) into `directory`."""
    import keras  # heavy: here, not above: the plan reads this module's names on --dry-run, without keras

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {path: keras.ops.convert_to_numpy(v) for path, v in lora_weights(model).items()}
    np.savez(directory / ADAPTER_FILE, **arrays)
    config = {"rank": rank, "alpha": alpha if alpha is not None else rank, "targets": list(targets)}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_lora(model, directory):
    """Enables LoRA on a base `model` as the saved adapter says and loads its weights."""
    directory = Path(directory)
    if not (directory / ADAPTER_CONFIG).is_file():
        raise UserError(f"{directory} holds no {ADAPTER_CONFIG}; point at a LoRA run's checkpoint")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    enable_lora(model, config["rank"], config["alpha"], tuple(config["targets"]))
    targets = lora_weights(model)
    with np.load(directory / ADAPTER_FILE) as saved:
        if set(saved.files) != set(targets):
            raise UserError(f"{directory}: the adapter does not fit this model (its layers differ)")
        for path, variable in targets.items():
            if tuple(saved[path].shape) != tuple(variable.shape):
                raise UserError(f"{directory}: adapter {path} has shape {saved[path].shape}, model wants {variable.shape}")
            variable.assign(saved[path])
    return config


def merge_lora(model):
    """Returns a new model without adapters whose kernels are `W + A @ B * alpha / rank`.

    Example:
        merged = merge_lora(model)   # same outputs, plain Dense layers
    """
    merged = type(model).from_config(model.get_config())
    merged.build((None, model.seq_len))
    values = {_relative(v.path): v for v in model.weights if "lora_kernel" not in v.path}
    for layer in model._flatten_layers():
        if getattr(layer, "lora_enabled", False):
            values[_relative(layer._kernel.path)] = layer.kernel  # Keras returns the merged kernel
    for variable in merged.weights:
        variable.assign(values[_relative(variable.path)])
    return merged
