"""Pure validation of a resolved `RunSpec`: one function per section.

Nothing here reads a file, imports a package or touches the network (that is
`preflight`); each check raises `UserError` naming the bad value and the fix.

Example:
    validate(spec)   # raises UserError("--num-heads 5 does not divide --d-model 128; ...")
"""

import dataclasses

from ultimate_trainer.config.derived import batch_split
from ultimate_trainer.config.parsers import (
    TFDS_PREFIX,
    cluster_settings,
    moe_block_indices,
    parse_data_mix,
    parse_device_batch_sizes,
    parse_lora_targets,
    parse_mesh,
    parse_tfds_id,
    sas_token_problem,
    ttt_block_indices,
)
from ultimate_trainer.config.resume_settings import parse_allowed
from ultimate_trainer.config.schema import DataConfig, flag_name, iter_fields
from ultimate_trainer.errors import UserError

# Flags that only mean something when a tokenizer is trained here.
TRAINING_FLAGS = ("tokenizer_model", "auto_vocab_size", "vocab_size", "min_vocab_size", "max_vocab_size",
                  "tokenizer_train_examples", "retrain_tokenizer")
# A trained tokenizer's fixed ids: 4 special pieces and 256 byte-fallback pieces
# (data/tokenizers.py SP_MIN_VOCAB; tests/config check they agree).
SP_MIN_VOCAB = 4 + 256


def positive(value, flag, allow_none=False):
    """Raises `UserError` unless `value` is a positive number (or None, if allowed).

    Example:
        >>> positive(0, "--epochs")
        Traceback (most recent call last):
        ultimate_trainer.errors.UserError: --epochs must be a positive number, got 0
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"{flag} must be a positive number, got {value!r}")


def flags():
    """{field name: its flag} for messages."""
    return {f.name: flag_name(f) for _, _, f in iter_fields()}


def validate(cfg):
    """Checks the whole config once; raises `UserError` naming the bad value and the fix.

    Example:
        validate(spec)   # after resolution, before preflight
    """
    names = flags()
    _validate_choices(cfg, names)
    _validate_model(cfg.model, cfg.explicit, names)
    _validate_ttt(cfg.model, cfg.explicit, names, cfg.loader)
    _validate_moe(cfg.model, cfg.explicit, names)
    _validate_lora(cfg.model, cfg.explicit, names)
    _validate_training(cfg.training, cfg.explicit, names)
    _validate_output(cfg.output, cfg.explicit, names)
    _validate_cloud(cfg.cloud, cfg.output.resume_from, names)
    _validate_distribution(cfg.distribution)
    _validate_loader(cfg, names)
    _validate_data(cfg.data, cfg.explicit, names)
    _validate_streamed_only(cfg.data, cfg.model)
    _validate_tokenizer_of(cfg, names)
    if cfg.run.json and not (cfg.run.dry_run or cfg.run.eval_only):
        raise UserError("--json only applies to --dry-run and --eval-only; add one of them")
    if cfg.run.eval_only and not (cfg.model.init_from or cfg.output.resume_from):
        raise UserError("--eval-only needs the checkpoint to evaluate: add --init-from CHECKPOINT")


def _validate_choices(cfg, names):
    for attr, _, f in iter_fields():
        value = getattr(getattr(cfg, attr), f.name)
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UserError(f"{names[f.name]} {value!r} is not one of {', '.join(choices)}")


def _validate_model(m, explicit, names):
    for name in ("d_model", "num_layers", "num_heads", "d_ff", "seq_len"):
        positive(getattr(m, name), names[name])
    positive(m.num_kv_heads, names["num_kv_heads"], allow_none=True)
    if m.d_model % m.num_heads:
        divisors = [h for h in range(1, min(m.d_model, 64) + 1) if m.d_model % h == 0][-3:]
        raise UserError(
            f"--num-heads {m.num_heads} does not divide --d-model {m.d_model}; "
            f"pick heads so that d_model % heads == 0 (e.g. {', '.join(map(str, divisors))})"
        )
    if m.num_kv_heads and m.num_heads % m.num_kv_heads:
        raise UserError(
            f"--num-kv-heads {m.num_kv_heads} does not divide --num-heads {m.num_heads}; "
            f"pick a divisor of {m.num_heads}"
        )
    if m.rope and (m.d_model // m.num_heads) % 2:
        raise UserError(
            f"head size {m.d_model // m.num_heads} (--d-model / --num-heads) must be even for "
            f"rotary embeddings; change --num-heads or pass --no-rope"
        )
    if not 0 <= m.dropout_rate < 1:
        raise UserError(f"--dropout-rate must be in [0, 1), got {m.dropout_rate}")
    if m.swiglu and "model.activation" in explicit and m.activation != "gelu":
        raise UserError(
            f"--activation {m.activation} applies to the plain MLP only; add --no-swiglu "
            f"(SwiGLU always gates with SiLU)"
        )


def validate_target_params(m, explicit):
    """The checks of --target-params and --prefer-depth that come before sizing."""
    if m.target_params is None:
        if m.prefer_depth:
            raise UserError("--prefer-depth only applies with --target-params N; add it or drop --prefer-depth")
        return
    positive(m.target_params, "--target-params")
    given = [n for n in ("d_model", "num_layers", "num_heads", "d_ff") if f"model.{n}" in explicit]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"--target-params chooses {flag} itself; drop {flag} or drop --target-params")


def _validate_ttt(m, explicit, names, loader):
    others = ("ttt_layers", "ttt_mini_batch_size", "ttt_base_lr", "ttt_use_gate", "ttt_share_qk", "ttt_backbone",
              "state_passing")
    if not m.ttt_layer_type:
        given = [names[n] for n in others if f"model.{n}" in explicit and getattr(m, n) not in (None, False)]
        if given:
            raise UserError(f"{given[0]} configures TTT layers; add --ttt-layer-type linear|mlp")
        return
    if m.state_passing:
        if m.seq_len % m.ttt_mini_batch_size:
            raise UserError(
                f"--state-passing needs --seq-len ({m.seq_len}) to be a multiple of --ttt-mini-batch-size "
                f"({m.ttt_mini_batch_size}), so each window ends on a whole inner step; "
                f"try --seq-len {m.seq_len // m.ttt_mini_batch_size * m.ttt_mini_batch_size or m.ttt_mini_batch_size}"
            )
        if loader.stride not in (None, m.seq_len):
            raise UserError(
                f"--stride {loader.stride}: --state-passing reads each stream contiguously (each window starts "
                f"at the previous window's last target, stride --seq-len); drop --stride"
            )
    positive(m.ttt_mini_batch_size, names["ttt_mini_batch_size"])
    positive(m.ttt_base_lr, names["ttt_base_lr"], allow_none=True)
    if m.ttt_layers is not None:
        try:
            indices = [int(i) for i in str(m.ttt_layers).split(",") if i.strip()]
        except ValueError:
            indices = None
        if not indices or any(not 0 <= i < m.num_layers for i in indices):
            raise UserError(
                f"--ttt-layers {m.ttt_layers!r}: give comma-separated block indices from 0 to {m.num_layers - 1}"
            )
    if (m.d_model // m.num_heads) % 2:
        raise UserError(
            f"head size {m.d_model // m.num_heads} must be even: TTT layers apply RoPE within each mini-batch; "
            f"change --num-heads"
        )
    if m.use_lora:
        raise UserError("--use-lora targets attention projections and cannot be combined with --ttt-layer-type yet")


def _validate_moe(m, explicit, names):
    others = ("experts_top_k", "moe_every", "capacity_factor", "router_aux_loss_coef", "router_z_loss_coef")
    if m.num_experts is None or m.num_experts < 0:
        raise UserError(f"--num-experts must be zero (dense) or positive, got {m.num_experts}")
    if not m.num_experts:
        given = [names[n] for n in others if f"model.{n}" in explicit]
        if given:
            raise UserError(f"{given[0]} configures mixture-of-experts layers; add --num-experts N")
        return
    if not 1 <= m.experts_top_k <= m.num_experts:
        raise UserError(
            f"--experts-top-k {m.experts_top_k} must lie between 1 and --num-experts {m.num_experts}"
        )
    if not 1 <= m.moe_every <= m.num_layers:
        raise UserError(
            f"--moe-every {m.moe_every} must lie between 1 and --num-layers {m.num_layers} "
            f"(every k-th block is MoE)"
        )
    for name in ("capacity_factor", "router_aux_loss_coef", "router_z_loss_coef"):
        if getattr(m, name) < 0:
            raise UserError(f"{names[name]} must be zero or positive, got {getattr(m, name)}")
    if m.use_lora:
        ffn = [t for t in parse_lora_targets(m.lora_targets) if t in ("up", "down")]
        if ffn:
            raise UserError(
                f"--lora-targets {ffn[0]} adapts the dense MLP, which MoE blocks replace with experts; "
                f"use --lora-targets qkv,out with --num-experts"
            )


def _validate_lora(m, explicit, names):
    if m.use_bias and len(set(ttt_block_indices(m.num_layers, m.ttt_layer_type, m.ttt_layers)) &
                          set(moe_block_indices(m.num_layers, m.num_experts, m.moe_every))) == m.num_layers:
        raise UserError(
            "--use-bias adds biases to attention and dense-MLP projections, but every block here has a TTT layer "
            "and MoE experts, which take none; drop --use-bias"
        )
    positive(m.lora_rank, names["lora_rank"])
    positive(m.lora_alpha, names["lora_alpha"], allow_none=True)
    if m.use_lora:
        parse_lora_targets(m.lora_targets)
    elif {"model.lora_rank", "model.lora_alpha", "model.lora_targets"} & explicit:
        raise UserError("--lora-rank, --lora-alpha and --lora-targets need --use-lora; add it")


def _validate_training(t, explicit, names):
    for name in ("epochs", "batch_size", "gradient_accumulation_steps", "learning_rate"):
        positive(getattr(t, name), names[name])
    for name in ("max_steps", "peak_flops", "total_tokens", "global_batch_size"):
        positive(getattr(t, name), names[name], allow_none=True)
    if t.max_steps is not None and t.total_tokens is not None:
        raise UserError("--max-steps and --total-tokens both set the run length; pass only one")
    if t.global_batch_size and "training.gradient_accumulation_steps" in explicit:
        raise UserError("--global-batch-size derives --gradient-accumulation-steps; pass only one of them")
    if t.device_batch_sizes is not None:
        if not t.global_batch_size:
            raise UserError("--device-batch-sizes picks the per-device batch for --global-batch-size; add it")
        parse_device_batch_sizes(t.device_batch_sizes)
    if t.global_batch_size:
        batch_split(t, 1)  # a global batch that one device cannot reach is wrong everywhere
    if t.optimizer not in ("adamw", "muon") and "training.weight_decay" in explicit and t.weight_decay:
        raise UserError(f"--weight-decay applies to --optimizer adamw and muon only, not {t.optimizer}; drop one of them")
    for name in ("weight_decay", "warmup_steps", "grad_clip", "skip_nonfinite"):
        if getattr(t, name) < 0:
            raise UserError(f"{names[name]} must be zero or positive, got {getattr(t, name)}")
    if t.lr_end is not None and not 0 <= t.lr_end <= t.learning_rate:
        raise UserError(
            f"--lr-end {t.lr_end} must lie between 0 and --learning-rate {t.learning_rate}"
        )


def _validate_output(o, explicit, names):
    for name, what in (("wandb_run_name", "run"), ("wandb_entity", "entity")):
        if getattr(o, name) and not o.wandb_project:
            raise UserError(f"{names[name]} names a W&B {what}; add --wandb-project PROJECT")
    if o.allow_changed_config is not None:
        if not o.resume_from:
            raise UserError("--allow-changed-config applies to --resume-from; add it, or drop --allow-changed-config")
        parse_allowed(o.allow_changed_config)
    positive(o.save_total_limit, names["save_total_limit"], allow_none=True)
    positive(o.milestone_every, names["milestone_every"], allow_none=True)
    for name in ("log_every", "save_every", "eval_every"):
        positive(getattr(o, name), names[name])
    positive(o.eval_steps, names["eval_steps"], allow_none=True)
    if o.sample_tokens < 0:
        raise UserError(f"--sample-tokens must be zero (no samples) or positive, got {o.sample_tokens}")
    if not o.eval:
        given = [names[n] for n in ("eval_every", "eval_steps") if f"output.{n}" in explicit]
        if given:
            raise UserError(f"{given[0]} schedules validation, which --no-eval turns off; drop one of them")
    if not o.output_dir:
        raise UserError("--output-dir must not be empty")


def _validate_distribution(d):
    if d.mesh is not None:
        if d.distribution in ("auto", "none"):
            raise UserError(f"--mesh {d.mesh} lays out --distribution data, fsdp or model; add one of them")
        parse_mesh(d.mesh)
    if d.num_processes is not None and d.num_processes < 1:
        raise UserError(f"--num-processes must be a positive number, got {d.num_processes}")
    cluster_settings(d)


def _validate_cloud(c, resume_from, names):
    if bool(c.cloud_provider) != bool(c.cloud_bucket):
        given, missing = ("cloud_provider", "cloud_bucket") if c.cloud_provider else ("cloud_bucket", "cloud_provider")
        raise UserError(f"{names[given]} needs {names[missing]} too (uploads go to PROVIDER + BUCKET)")
    from_azure = str(resume_from or "").startswith(("az://", "https://"))
    if c.cloud_provider != "azure" and not from_azure:
        for name in ("azure_sas_token", "azure_account_name"):
            if getattr(c, name):
                raise UserError(f"{names[name]} applies to --cloud-provider azure (or an az:// --resume-from) only")
    if c.cloud_region and c.cloud_provider == "azure":
        raise UserError(
            f"{names['cloud_region']} does not apply to --cloud-provider azure: an Azure storage account, not a "
            f"container, has a region (chosen when the account is created); drop the flag"
        )
    if c.cloud_region and not c.cloud_provider and not str(resume_from or "").startswith("s3://"):
        raise UserError(
            f"{names['cloud_region']} applies to uploads (--cloud-provider s3 or gcs) and to an s3:// --resume-from "
            f"only; drop it or add --cloud-provider"
        )
    if c.azure_sas_token:
        problem = sas_token_problem(c.azure_sas_token)
        if problem:
            raise UserError(f"{names['azure_sas_token']} {problem}")
    if c.cloud_upload_wait < 0:
        raise UserError(f"{names['cloud_upload_wait']} must be zero or positive, got {c.cloud_upload_wait}")
    if c.cloud_endpoint_url and not c.cloud_endpoint_url.startswith(("http://", "https://")):
        raise UserError(f"--cloud-endpoint-url {c.cloud_endpoint_url!r}: give a URL, e.g. http://127.0.0.1:9000")


def _validate_loader(cfg, names):
    loader, seq_len = cfg.loader, cfg.model.seq_len
    positive(loader.shuffle_buffer_size, names["shuffle_buffer_size"])
    if loader.stride is not None and not 1 <= loader.stride <= seq_len:
        raise UserError(
            f"--stride {loader.stride} must lie between 1 and --seq-len {seq_len} (the step from one "
            f"window's start to the next; default --seq-len)"
        )
    positive(loader.shard_tokens, names["shard_tokens"])
    positive(loader.num_workers, names["num_workers"], allow_none=True)
    if cfg.data.data_dir is not None:
        _validate_shard_source(cfg)
        # Whether the shards exist is checked when they are read: `cost`, `recipes` and a dry run plan without them.
    if not loader.use_streaming and cfg.data.data_dir is None:
        raise UserError(
            "--no-use-streaming reads pre-tokenized shards: add --data-dir DIR "
            "(make it with `ultimate-trainer prepare-data --data-dir DIR`)"
        )


def _validate_shard_source(cfg):
    if cfg.loader.tokenize_on_fly:
        raise UserError("--tokenize-on-fly streams from the sources, --data-dir reads shards; pass only one")
    if "loader.shuffle_buffer_size" in cfg.explicit:
        raise UserError(
            "--shuffle-buffer-size applies to streaming; shards (--data-dir) are shuffled over the whole epoch"
        )
    # --vocab-size states the size of the shards' tokenizer (checked when they are read).
    source_flags = [
        k for k in cfg.explicit
        if k.startswith(("data.", "tokenizer."))
        and k not in ("data.data_dir", "tokenizer.tokenizer_path", "tokenizer.vocab_size")
    ]
    if source_flags:
        name = source_flags[0].split(".", 1)[1]
        raise UserError(
            f"--{name.replace('_', '-')} does not apply with --data-dir: the shards already hold their "
            f"tokenized data and tokenizer; pass such flags to `prepare-data` instead"
        )


def _validate_streamed_only(d, m):
    """Sources and bounds only the streamed input reads (data/streamed.py)."""
    if d.eval_tokens and not (d.dataset_id or d.data_files or d.data_mix):
        raise UserError(f"--eval-tokens {d.eval_tokens} bounds the validation of --dataset-id, --data-files or "
                        f"--data-mix; the default data holds out a fixed slice (bound it with --max-val-examples)")
    tfds = bool(d.dataset_id and d.dataset_id.startswith(TFDS_PREFIX))
    if m.state_passing and (d.data_mix or tfds or d.eval_tokens):
        what = "--data-mix" if d.data_mix else "--eval-tokens" if d.eval_tokens else f"--dataset-id {d.dataset_id}"
        raise UserError(f"--state-passing reads one contiguous stream per batch row from a counted source, which "
                        f"{what} is not; train it without --state-passing, or on --data-files / --data-dir")


def _validate_data(d, explicit, names):
    positive(d.max_train_examples, names["max_train_examples"], allow_none=True)
    positive(d.max_val_examples, names["max_val_examples"], allow_none=True)
    if not 0 < d.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1, got {d.val_fraction}")
    positive(d.eval_tokens, names["eval_tokens"], allow_none=True)
    chosen = [names[n] for n in ("dataset_id", "data_files", "data_mix") if getattr(d, n)]
    if len(chosen) > 1:
        raise UserError(f"{' and '.join(chosen)} {'both' if len(chosen) == 2 else 'all'} choose the data; pass only one")
    if d.data_mix:
        for source, _ in parse_data_mix(d.data_mix):
            if source.startswith(TFDS_PREFIX):
                parse_tfds_id(source)
    if d.dataset_id and d.dataset_id.startswith(TFDS_PREFIX):
        parse_tfds_id(d.dataset_id)
        if d.dataset_config:
            raise UserError(f"--dataset-config {d.dataset_config} does not apply to --dataset-id {d.dataset_id}; "
                            f"write the config into the id: tfds:NAME/CONFIG")
    tfds_used = any(s.startswith(TFDS_PREFIX) for s in [d.dataset_id or ""] + [
        s for s, _ in (parse_data_mix(d.data_mix) if d.data_mix else ())])
    if d.tfds_data_dir and not tfds_used:
        raise UserError(f"--tfds-data-dir {d.tfds_data_dir} applies to TFDS sources only; pass --dataset-id "
                        f"tfds:NAME (or a tfds: source in --data-mix), or drop --tfds-data-dir")
    if not (d.dataset_id or d.data_mix):
        defaults = {f.name: f.default for f in dataclasses.fields(DataConfig)}
        for name in ("dataset_config", "split", "val_split"):
            if f"data.{name}" in explicit and getattr(d, name) != defaults[name]:
                raise UserError(
                    f"{names[name]} applies to --dataset-id only; local files and the default data hold out "
                    f"a slice by --val-fraction instead"
                )
    if d.val_split is not None and d.val_split == d.split:
        raise UserError(f"--val-split {d.val_split} is also the training --split; validate on another split")
    if not d.text_column:
        raise UserError("--text-column must not be empty")


def _validate_tokenizer_of(cfg, names):
    if cfg.data.data_dir is not None and "tokenizer.vocab_size" in cfg.explicit:
        # With shards, --vocab-size states the size of their tokenizer, not one to train.
        positive(cfg.tokenizer.vocab_size, names["vocab_size"])
        _validate_tokenizer(cfg.tokenizer, cfg.explicit - {"tokenizer.vocab_size"}, names)
    else:
        _validate_tokenizer(cfg.tokenizer, cfg.explicit, names)


def _validate_tokenizer(t, explicit, names):
    given = [name for name in TRAINING_FLAGS if f"tokenizer.{name}" in explicit and getattr(t, name) is not False]
    if t.tokenizer_path:
        if given:
            raise UserError(
                f"{names[given[0]]} trains a tokenizer, but --tokenizer-path loads one; drop one of them"
            )
        if "tokenizer.tokenizer" in explicit and t.tokenizer == "byte":
            raise UserError("--tokenizer byte needs no file; drop --tokenizer-path, or drop --tokenizer byte")
        return  # that it exists and is a tokenizer: preflight
    if t.tokenizer != "sentencepiece":
        if given:
            raise UserError(f"{names[given[0]]} applies to a trained tokenizer; add --tokenizer sentencepiece")
        return
    for name in ("vocab_size", "min_vocab_size", "max_vocab_size", "tokenizer_train_examples"):
        positive(getattr(t, name), names[name])
    if t.auto_vocab_size:
        if "tokenizer.vocab_size" in explicit:
            raise UserError("--vocab-size and --auto-vocab-size both set the vocab size; pass only one")
        if t.min_vocab_size > t.max_vocab_size:
            raise UserError(
                f"--min-vocab-size {t.min_vocab_size} is above --max-vocab-size {t.max_vocab_size}; swap or fix them"
            )
        low, low_flag = t.min_vocab_size, "--min-vocab-size"
    else:
        if {"tokenizer.min_vocab_size", "tokenizer.max_vocab_size"} & explicit:
            raise UserError("--min-vocab-size and --max-vocab-size bound --auto-vocab-size; add it or drop them")
        low, low_flag = t.vocab_size, "--vocab-size"
    if low <= SP_MIN_VOCAB:
        raise UserError(
            f"{low_flag} {low} leaves no room for learned pieces: a trained tokenizer holds "
            f"{SP_MIN_VOCAB} fixed ids (4 special, 256 bytes) first; use a few hundred more"
        )
