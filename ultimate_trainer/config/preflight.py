"""The steps of resolution that reach outside the config: files, packages and
the model's parameter formula.

`preflight` checks what only the disk or the installed packages can tell
(the --init-from dir, the --data-files, the --tokenizer-path, wandb), once
the spec is resolved and validated. `sized_for_target` sizes the model for
--target-params, which needs the vocab size (possibly read from a tokenizer
or shard files) and `models.sizing`. They are the only functions in the
config package that import other layers, each inside the function, so the
package stays a leaf that `--help` and validation load alone.

Example:
    spec = sized_for_target(spec)   # d_model, layers, heads, d_ff for --target-params
    validate(spec)
    preflight(spec)                 # UserError("--init-from ckpt: no such checkpoint directory")
"""

import dataclasses
import importlib.util
from pathlib import Path

from ultimate_trainer.config.schema import SIZED_BY_PRESET
from ultimate_trainer.config.validate import positive, validate_target_params
from ultimate_trainer.errors import UserError


def preflight(cfg):
    """Checks the settings that name files or packages; `UserError` for the first missing one.

    Example:
        preflight(resolve_spec({"model.init_from": "nope"}))   # UserError: no such checkpoint directory
    """
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).is_dir():
        raise UserError(f"--init-from {cfg.model.init_from}: no such checkpoint directory")
    if cfg.output.wandb_project and importlib.util.find_spec("wandb") is None:
        raise UserError(
            f"--wandb-project {cfg.output.wandb_project} needs the wandb package; pip install wandb, or drop the flag"
        )
    if cfg.data.data_files:
        from ultimate_trainer.data import sources  # lazy: the data layer, above the config: only this step reads files

        sources.resolve_data_files(cfg.data.data_files)
    if cfg.tokenizer.tokenizer_path:
        from ultimate_trainer.data import tokenizers  # lazy: the data layer, above the config: only this step reads files

        tokenizers.peek_vocab_size(cfg.tokenizer.tokenizer_path)  # exists and is a tokenizer


def vocab_size_of(tokenizer_cfg):
    """The vocab size a tokenizer config gives, known before any data is read.

    `byte`: 258; a trained tokenizer: --vocab-size; --tokenizer-path: read from
    the files there. With --auto-vocab-size the size is only known after
    training, so this raises `UserError` (the caller needs the size now;
    `target_params_pending` says when the model waits for it).

    Example:
        >>> from ultimate_trainer.config import TokenizerConfig
        >>> vocab_size_of(TokenizerConfig()), vocab_size_of(TokenizerConfig(tokenizer="sentencepiece"))
        (258, 16000)
    """
    from ultimate_trainer.data import tokenizers  # lazy: the data layer, above the config: reads tokenizer files

    t = tokenizer_cfg
    if t.tokenizer_path:
        return tokenizers.peek_vocab_size(t.tokenizer_path)
    if t.tokenizer == "byte":
        return tokenizers.ByteTokenizer.vocab_size
    if t.auto_vocab_size:
        raise UserError(
            "the vocab size is needed before the data is read, but --auto-vocab-size picks it after training "
            "the tokenizer; pass --vocab-size N instead (a dry run with --auto-vocab-size prints the size it picks)"
        )
    return t.vocab_size


def planned_vocab_size(cfg):
    """The vocab size of a run, known before its data is read (`vocab_size_of`),
    where --data-dir gives it: the shards' tokenizer, or, before the shards
    exist, --vocab-size (a recipe states the size of the tokenizer its shards
    are made with).

    Example:
        planned_vocab_size(resolve_config({"run.recipe": "llama-1.36b"}))  # 32000
    """
    d = cfg.data.data_dir
    if d is None or cfg.tokenizer.tokenizer_path:
        return vocab_size_of(cfg.tokenizer)
    from ultimate_trainer.data import shards  # lazy: the data layer, above the config: reads the shards' metadata

    if shards.has_meta(d):
        return shards.read_meta(d)["tokenizer"]["vocab_size"]
    if "tokenizer.vocab_size" in cfg.explicit:
        return cfg.tokenizer.vocab_size
    raise UserError(
        f"--data-dir {d} holds no prepared shards yet, so the vocab size is unknown; make them with "
        f"`ultimate-trainer prepare-data --data-dir {d}`, or pass --vocab-size N (the size of their tokenizer)"
    )


def target_params_pending(cfg):
    """True when --target-params waits for --auto-vocab-size: the model is
    sized by `sized_for_vocab` once the tokenizer is trained.

    Example:
        target_params_pending(spec)   # False unless --target-params with --auto-vocab-size
    """
    t = cfg.tokenizer
    return (cfg.model.target_params is not None and t.auto_vocab_size and not t.tokenizer_path
            and t.tokenizer == "sentencepiece")


def sized_for_target(cfg):
    """A new spec whose model is sized for --target-params (`cfg` itself
    without it, or while the size waits for --auto-vocab-size).

    Example:
        spec = sized_for_target(resolve_spec({"model.target_params": 20_000_000}))
    """
    m = cfg.model
    validate_target_params(m, cfg.explicit)
    if m.target_params is None or target_params_pending(cfg):
        return cfg  # pending: sized once the tokenizer has chosen its vocab (sized_for_vocab)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **_solve_target(m, planned_vocab_size(cfg))))


def sized_for_vocab(cfg, vocab_size):
    """`cfg` itself, or (when `target_params_pending`) a new spec whose
    model is sized for `vocab_size`, the size the trained tokenizer has.

    Example:
        cfg = sized_for_vocab(cfg, tokenizer.vocab_size)   # after --auto-vocab-size picked it
    """
    if not target_params_pending(cfg):
        return cfg
    model = dataclasses.replace(cfg.model, **_solve_target(cfg.model, vocab_size))
    return dataclasses.replace(cfg, model=model)


def _solve_target(m, vocab):
    """{d_model, num_layers, num_heads, d_ff} for --target-params at `vocab`."""
    from ultimate_trainer.models import sizing  # lazy: the model's parameter formula; sizing takes this package's spec

    positive(m.target_params, "--target-params")
    solution = sizing.solve_target_params(
        m.target_params, vocab, m.seq_len, use_rope=m.rope, use_rmsnorm=m.rmsnorm,
        use_swiglu=m.swiglu, tie_embeddings=m.tie_embeddings, prefer_depth=m.prefer_depth, use_bias=m.use_bias,
    )
    if solution is None:
        smallest = sizing.Architecture(vocab, 64, 0, 1, 64, m.seq_len, use_rope=m.rope,
                                       tie_embeddings=m.tie_embeddings)
        embedding = sizing.count_params(smallest).embedding
        raise UserError(
            f"--target-params {m.target_params:,} has no architecture within 2% for vocab {vocab:,} "
            f"(the embeddings alone take {embedding:,} at d_model 64); raise --target-params, "
            f"add --tie-embeddings or use a smaller vocab"
        )
    return {name: getattr(solution, name) for name in SIZED_BY_PRESET}
