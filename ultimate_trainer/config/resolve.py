"""Resolution: flags and a YAML recipe -> one frozen `RunSpec`.

The order is: dataclass defaults, then the YAML recipe given with `--config`
(or `--recipe NAME`), then the size preset, then the flags typed on the
command line; the tokenizer-training flags imply a trained tokenizer. The
values are settled first and the spec is built once from them; every later
step (`sized_for_target`, `applied`) makes a new spec.

Example:
    >>> cfg = resolve_config({"model.model_preset": "nano"})
    >>> cfg.model.d_model
    128
"""

import difflib
import math

from ultimate_trainer.config.derived import applied, derive
from ultimate_trainer.config.preflight import preflight, sized_for_target
from ultimate_trainer.config.recipe_files import LR_RATIO, coerce, load_recipe, shipped_recipe
from ultimate_trainer.config.schema import SECTIONS, SIZE_PRESETS, SIZED_BY_PRESET, RunSpec, TrainingConfig, field_index
from ultimate_trainer.config.validate import validate
from ultimate_trainer.errors import UserError

# Where the training text comes from, and what only means something with one of them.
SOURCE_KEYS = ("data.data_dir", "data.dataset_id", "data.data_files")
SOURCE_SETTINGS = ("data.dataset_config", "data.split", "data.val_split")
# Tokenizer-training flags that ask for a trained tokenizer by themselves (the CLI guide's usage).
IMPLY_TRAINED = ("vocab_size", "auto_vocab_size", "tokenizer_train_examples", "tokenizer_model")


def resolve_config(cli_values, recipe_path=None):
    """Builds a validated, frozen `RunSpec` from {"section.field": value} flags.

    `cli_values` holds only what the user typed; `recipe_path` (or the
    `run.config` value) names a YAML recipe that the flags override. A data
    source among the flags (--data-dir, --dataset-id, --data-files) replaces
    the recipe's source and its split settings (and, when the recipe reads
    shards, the vocab size it states for them). The spec returned has the
    device-free `Derived` values in place (as one CPU would train it); a run
    derives again once its devices are known.

    Example:
        >>> resolve_config({"training.global_batch_size": 64}).training.gradient_accumulation_steps
        2
    """
    return applied(*resolve(cli_values, recipe_path))


def resolve(cli_values, recipe_path=None):
    """(spec, derived): the sized, validated and preflighted `RunSpec` as the
    user gave it, and the `Derived` values that follow from it on one CPU.

    Example:
        >>> spec, derived = resolve({"model.ttt_layer_type": "linear", "model.ttt_backbone": "mamba"})
        >>> spec.model.ttt_share_qk, derived.ttt_share_qk
        (False, True)
    """
    spec = sized_for_target(resolve_spec(cli_values, recipe_path))
    validate(spec)
    preflight(spec)
    return spec, derive(spec)


def resolve_spec(cli_values, recipe_path=None):
    """The spec the flags and recipe give, before sizing, validation and preflight.

    Example:
        >>> resolve_spec({"model.model_preset": "tiny"}).model.num_layers
        8
    """
    values = merged_values(cli_values, recipe_path)
    explicit = frozenset(values)
    values = {**values, **_implied_tokenizer(values, explicit), **_preset_dims(values, explicit)}
    sections = {attr: {} for attr, _, _ in SECTIONS}
    for key, value in values.items():
        attr, name = key.split(".", 1)
        sections[attr][name] = value
    return RunSpec(**{attr: cls(**sections[attr]) for attr, _, cls in SECTIONS}, explicit=explicit)


def merged_values(cli_values, recipe_path=None):
    """{"section.field": value}: the recipe's settings, overridden by the flags.

    Example:
        >>> merged_values({"model.d_model": 64})
        {'model.d_model': 64}
    """
    recipe_path = recipe_path or cli_values.get("run.config")
    if cli_values.get("run.recipe"):
        if recipe_path:
            raise UserError("--recipe and --config both name the recipe; pass only one")
        recipe_path = shipped_recipe(cli_values["run.recipe"])
    merged, lr_ratio = {}, None
    if recipe_path:
        index = field_index()
        recipe = load_recipe(recipe_path)
        lr_ratio = recipe.pop(LR_RATIO, None)
        if any(key in cli_values for key in SOURCE_KEYS):
            # A source typed on the command line replaces the recipe's, with the settings tied to it
            # (with --data-dir, --vocab-size states the size of the shards' tokenizer).
            tied = SOURCE_KEYS + SOURCE_SETTINGS + (("tokenizer.vocab_size",) if "data.data_dir" in recipe else ())
            recipe = {k: v for k, v in recipe.items() if k not in tied}
        for key, value in recipe.items():
            merged[key] = coerce(index[key.split(".", 1)[1]][1], value, f"--config {recipe_path}")
    merged.update(cli_values)
    if lr_ratio is not None:
        _lr_end_from_ratio(merged, lr_ratio, recipe_path, recipe)
    return merged


def _lr_end_from_ratio(merged, ratio, recipe_path, recipe):
    """A recipe's `min_lr_ratio` (the MoE guide's key, kept as an alias of --lr-end) as
    merged["training.lr_end"]: that fraction of the final peak, unless --lr-end was typed."""
    if "training.lr_end" in recipe:
        raise UserError(f"--config {recipe_path}: `lr_end` and `min_lr_ratio` both set the end learning rate; "
                        f"keep only one")
    try:
        fraction = float(ratio) if not isinstance(ratio, bool) else math.nan
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0 <= fraction <= 1:
        raise UserError(f"--config {recipe_path}: `min_lr_ratio` {ratio!r} must lie between 0 and 1 (a fraction of "
                        f"the peak learning rate)")
    merged.setdefault("training.lr_end", fraction * merged.get("training.learning_rate", TrainingConfig.learning_rate))


def _implied_tokenizer(values, explicit):
    """--vocab-size, --auto-vocab-size and the other tokenizer-training flags
    mean a trained tokenizer: the CLI guide's commands pass them without
    naming one (`--tokenizer sentencepiece` stays the explicit spelling)."""
    if "tokenizer.tokenizer" in explicit or values.get("tokenizer.tokenizer_path") or values.get("data.data_dir"):
        return {}  # an explicit choice wins; a loaded tokenizer or shards bring their own (validation says so)
    if any(f"tokenizer.{name}" in explicit and values[f"tokenizer.{name}"] is not False for name in IMPLY_TRAINED):
        return {"tokenizer.tokenizer": "sentencepiece"}
    return {}


def _preset_dims(values, explicit):
    """The --model-preset's sizes for the dims not given on purpose."""
    preset = values.get("model.model_preset")
    if preset is None:
        return {}
    if preset not in SIZE_PRESETS:
        near = difflib.get_close_matches(preset, list(SIZE_PRESETS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UserError(
            f"unknown --model-preset {preset!r}{hint}; choose one of "
            f"{', '.join(SIZE_PRESETS)}, or a shipped recipe with --recipe NAME"
        )
    if "model.target_params" in explicit and values["model.target_params"] is not None:
        raise UserError(
            "--model-preset and --target-params both choose the model size; pass only one"
        )
    dims = dict(zip(SIZED_BY_PRESET, SIZE_PRESETS[preset]))
    return {f"model.{name}": value for name, value in dims.items() if f"model.{name}" not in explicit}
