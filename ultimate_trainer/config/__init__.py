"""Typed run configuration: a frozen `RunSpec`, resolved once and never written back.

The package is a leaf: nothing in it imports keras or another layer of
ultimate_trainer at import time, so `--help`, validation and `--dry-run`
stay fast and the backend can still be chosen before keras loads. One
concern per module:

- `schema`: the section dataclasses (help, flag and default on every field), `RunSpec`, `training_args.json`.
- `parsers`: pure parsers of flag values (counts, mesh, cluster, LoRA targets, TTT kind, batch tables).
- `recipe_files`: YAML recipes (`--config`, `--recipe`), the MoE guide's shape included.
- `resolve`: flags + recipe -> `RunSpec` (presets, tokenizer implication); `resolve` gives (spec, `Derived`),
  `resolve_config` the spec with the derived values applied.
- `validate`: pure checks, one function per section.
- `preflight`: what reaches outside: files, packages, --target-params sizing.
- `derived`: values that follow from a spec and its devices (`Derived`: batch split, precision, TTT implications).
- `resume_settings`: which settings a resume may change (--allow-changed-config).

Example:
    >>> cfg = resolve_config({"model.model_preset": "nano"})
    >>> cfg.model.d_model
    128
"""

from ultimate_trainer.config.derived import BatchSplit, Derived, applied, batch_split, derive, trains_in_bfloat16
from ultimate_trainer.config.parsers import (
    cluster_settings,
    count,
    moe_block_indices,
    parse_device_batch_sizes,
    parse_lora_targets,
    parse_mesh,
    sas_token_problem,
    ttt_block_indices,
    ttt_kind,
)
from ultimate_trainer.config.preflight import (
    planned_vocab_size,
    preflight,
    sized_for_target,
    sized_for_vocab,
    target_params_pending,
    vocab_size_of,
)
from ultimate_trainer.config.recipe_files import RECIPE_KEYS, load_recipe, shipped_recipe
from ultimate_trainer.config.resolve import (
    IMPLY_TRAINED,
    SOURCE_KEYS,
    SOURCE_SETTINGS,
    resolve,
    resolve_config,
    resolve_spec,
)
from ultimate_trainer.config.schema import (
    REDACTED,
    SECTIONS,
    SIZE_PRESETS,
    CloudConfig,
    Config,
    DataConfig,
    DistributionConfig,
    LoaderConfig,
    ModelConfig,
    OptimizationConfig,
    OutputConfig,
    RunConfig,
    RunSpec,
    TokenizerConfig,
    TrainingConfig,
    field_index,
    flag_name,
    iter_fields,
    write_json,
)
from ultimate_trainer.config.validate import TRAINING_FLAGS, validate
from ultimate_trainer.errors import UserError

__all__ = [
    "BatchSplit", "CloudConfig", "Config", "DataConfig", "Derived", "DistributionConfig", "IMPLY_TRAINED",
    "LoaderConfig", "ModelConfig", "OptimizationConfig", "OutputConfig", "RECIPE_KEYS", "REDACTED", "RunConfig",
    "RunSpec", "SECTIONS", "SIZE_PRESETS", "SOURCE_KEYS", "SOURCE_SETTINGS", "TRAINING_FLAGS", "TokenizerConfig",
    "TrainingConfig", "UserError", "applied", "batch_split", "cluster_settings", "count", "derive", "field_index",
    "flag_name", "iter_fields", "load_recipe", "moe_block_indices", "parse_device_batch_sizes", "parse_lora_targets",
    "parse_mesh", "planned_vocab_size", "preflight", "resolve", "resolve_config", "resolve_spec", "sas_token_problem",
    "shipped_recipe", "sized_for_target", "sized_for_vocab", "target_params_pending", "trains_in_bfloat16",
    "ttt_block_indices", "ttt_kind", "validate", "vocab_size_of", "write_json",
]
