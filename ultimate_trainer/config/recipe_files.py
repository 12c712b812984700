"""YAML recipes: `--config FILE` and `--recipe NAME` read into {"section.field": value}.

A recipe uses the flag groups as sections (`model:`, `training:`, ...), flat
top-level field names, or the MoE guide's shape (`RECIPE_KEYS`). Values are
converted to each field's type here, so a wrong one names its key.

Example:
    values = load_recipe(shipped_recipe("ttt-125m"))   # {"model.ttt_layer_type": "linear", ...}
"""

import dataclasses
import difflib
from pathlib import Path

import yaml

from ultimate_trainer import recipes
from ultimate_trainer.config.parsers import mix_text
from ultimate_trainer.config.schema import RENAMED, SECTIONS, field_index
from ultimate_trainer.errors import UserError


def shipped_recipe(name):
    """The YAML file of the shipped recipe `name` (the one place that knows where they live).

    Example:
        >>> shipped_recipe("ttt-125m").name
        'ttt-125m.yaml'
    """
    return recipes.recipe_path(name)


LR_RATIO = "training.min_lr_ratio"  # a recipe key that is no field (`resolve.merged_values` turns it into lr_end)

# Keys of the MoE guide's recipe shape (configs/production_training.yaml) -> config keys.
# Its sections `model`, `training` and `data` also take this config's own field names.
RECIPE_KEYS = {
    "model.n_layers": "model.num_layers",
    "model.n_heads": "model.num_heads",
    "model.n_kv_heads": "model.num_kv_heads",
    "model.n_experts": "model.num_experts",
    "model.top_k": "model.experts_top_k",
    "model.max_seq_len": "model.seq_len",
    "model.vocab_size": "tokenizer.vocab_size",
    "training.max_lr": "training.learning_rate",
    "training.min_lr_ratio": LR_RATIO,  # the end LR as a fraction of the peak: --lr-end once the peak is final
    "training.checkpoint_dir": "output.output_dir",
    "training.save_interval": "output.save_every",
    "training.save_total_limit": "output.save_total_limit",
    "training.log_interval": "output.log_every",
    "data.dataset_name": "data.dataset_id",
    "data.mix": "data.data_mix",  # a list of {source, weight}: `parsers.mix_text` makes it the flag's text
    "data.max_examples": "data.max_train_examples",
    "data.tokenize_on_fly": "loader.tokenize_on_fly",
    "data.use_streaming": "loader.use_streaming",
    "data.num_workers": "loader.num_workers",
    "evaluation.enabled": "output.eval",
    "evaluation.eval_steps": "output.eval_steps",
    "evaluation.eval_interval": "output.eval_every",
    "mixed_precision.bf16": "optimization.use_mixed_precision",
    "wandb.project": "output.wandb_project",
    "wandb.run_name": "output.wandb_run_name",
    "wandb.name": "output.wandb_run_name",
    "wandb.entity": "output.wandb_entity",
    **RENAMED,  # the fields' old names
    "wandb.enabled": None,  # false: drop the section's settings; true: needs wandb.project
}

# The old names as flat top-level keys.
FLAT_RENAMED = {old.split(".", 1)[1]: new for old, new in RENAMED.items()}


def load_recipe(path):
    """Reads a YAML recipe into {"section.field": value}.

    Accepts sections named after the flag groups (`model:`, `training:`, ...),
    flat top-level keys, and the MoE guide's shape (`RECIPE_KEYS`: sections
    model, training, data, evaluation, mixed_precision, wandb). An unknown key
    is an error naming the nearest valid one.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"--config {path}: no such file; pass the path of a YAML recipe "
            f"(`ultimate-trainer recipes` lists the shipped ones, which --recipe NAME runs)"
        )
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"--config {path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    index = field_index()
    sections = {attr: cls for attr, _, cls in SECTIONS}
    guide_sections = {key.split(".")[0] for key in RECIPE_KEYS}
    out = {}

    def unknown(key, valid):
        near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        raise UserError(f"--config {path}: unknown key `{key}`{hint}")

    wandb_enabled = None
    for key, value in data.items():
        if (key in sections or key in guide_sections) and isinstance(value, dict):
            names = {f.name for f in dataclasses.fields(sections[key])} if key in sections else set()
            aliases = {k.split(".", 1)[1] for k in RECIPE_KEYS if k.startswith(key + ".")}
            for sub, subvalue in value.items():
                full = f"{key}.{sub}"
                if full == "wandb.enabled":
                    wandb_enabled = subvalue
                elif full == "data.mix":
                    out[RECIPE_KEYS[full]] = mix_text(subvalue, f"--config {path}: `data.mix`")
                elif full in RECIPE_KEYS:
                    out[RECIPE_KEYS[full]] = subvalue
                elif sub in names:
                    out[full] = subvalue
                else:
                    unknown(full, [f"{key}.{n}" for n in names | aliases])
        elif key == "wandb" and value in (None, False):
            wandb_enabled = False
        elif key in index:
            out[f"{index[key][0]}.{key}"] = value
        elif key in FLAT_RENAMED:
            out[FLAT_RENAMED[key]] = value
        else:
            unknown(key, list(index) + list(sections) + sorted(guide_sections))
    if wandb_enabled is False:
        for name in ("output.wandb_project", "output.wandb_run_name", "output.wandb_entity"):
            out.pop(name, None)
    elif wandb_enabled is not None and not out.get("output.wandb_project"):
        raise UserError(f"--config {path}: `wandb.enabled: {wandb_enabled}` needs `wandb.project: NAME`")
    return out


def coerce(f, value, source):
    """Converts a recipe value to the field's type, or explains why not."""
    if value is None:
        return None
    kind = f.metadata.get("type") or type(f.default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: `{f.name}` must be true or false, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: `{f.name}` must be {kind.__name__}, got {value!r}") from None
