"""Runs one training job: plan, data, model, `fit`, checkpoints, summary.

Readable top to bottom, in the order the run happens.
"""

import json
import math
import time
from pathlib import Path

from ultimate_trainer import backend as backend_lib
from ultimate_trainer import config as config_lib
from ultimate_trainer.checkpoint.run_dir import prepare_output_dir
from ultimate_trainer.data import sources, tokenizers
from ultimate_trainer.training.plan import format_plan, make_plan

SAMPLE_PROMPTS = ("The ", "A function ", "In Python, ")


def say(message):
    print(message, flush=True)


def train(cfg):
    """Trains as `cfg` says; returns the process exit code."""
    out = Path(cfg.output.output_dir)
    prepare_output_dir(out, cfg.output.overwrite, dry_run=True)  # refuse early, before slow imports

    train_records, val_records, source_name = sources.load_records(cfg.data)
    tokenizer = tokenizers.make_tokenizer(
        cfg.tokenizer, train_records, val_records, Path(cfg.output.output_dir), None if cfg.run.json else say
    )
    plan = make_plan(cfg, tokenizer, train_records, val_records, source_name)
    devices = backend_lib.describe_devices()
    plan["backend"] = devices

    if cfg.run.dry_run:
        if cfg.run.json:
            print(json.dumps(plan, indent=2))
        else:
            say(_backend_line(devices))
            for line in format_plan(plan):
                say(line)
            say("dry run: nothing trained")
        return 0

    moved = prepare_output_dir(out, cfg.output.overwrite)
    say(_backend_line(devices))
    if moved:
        say(f"--overwrite: moved the previous run to {moved}")
    for line in format_plan(plan):
        say(line)
    return _fit(cfg, plan, tokenizer, train_records, val_records, out, devices)


def _backend_line(devices):
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(devices["devices"].items()))
    return (
        f"backend: {devices['backend']} {devices['backend_version']} "
        f"(keras {devices['keras_version']}); devices: {found}"
    )


def _fit(cfg, plan, tokenizer, train_records, val_records, out, devices):
    import keras

    from ultimate_trainer.checkpoint.store import init_from, save_checkpoint
    from ultimate_trainer.data.pipeline import eval_dataset, train_dataset
    from ultimate_trainer.models import lora
    from ultimate_trainer.models.causal_lm import build_causal_lm
    from ultimate_trainer.training import callbacks as cb
    from ultimate_trainer.training.generation import sample_text
    from ultimate_trainer.training.optimizers import build_optimizer
    from ultimate_trainer.training.schedules import WarmupCosine

    m, t, o, s = cfg.model, cfg.training, cfg.output, plan["schedule"]
    config_lib.write_json(cfg, out / "training_args.json")
    tokenizer.save(out)
    metrics_path = out / "metrics.jsonl"

    keras.utils.set_random_seed(t.seed)
    if cfg.optimization.use_mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        say("precision: bfloat16 compute, float32 weights")
    _say_attention_path(m, devices)

    model = build_causal_lm(m, tokenizer.vocab_size)
    if m.init_from:
        init_from(model, m.init_from)
        say(f"initialised from {m.init_from}")
    write_extra = None
    if m.use_lora:
        targets = lora.parse_targets(m.lora_targets)
        lora.enable_lora(model, m.lora_rank, m.lora_alpha, targets)

        def write_extra(directory):
            lora.save_lora(model, directory, m.lora_rank, m.lora_alpha, targets)
    trainable = sum(math.prod(v.shape) for v in model.trainable_weights)
    if (model.count_params(), trainable) != (plan["parameters"]["total"], plan["parameters"]["trainable"]):
        raise RuntimeError(
            f"built model has {model.count_params():,} parameters ({trainable:,} trainable) but "
            f"sizing.count_params says {plan['parameters']['total']:,} ({plan['parameters']['trainable']:,}); "
            f"the formula and the model have drifted apart"
        )
    schedule = WarmupCosine(t.learning_rate, s["lr_end"], s["warmup_steps"], s["total_steps"])
    model.compile(
        optimizer=build_optimizer(t, schedule, model),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )

    train_ds = train_dataset(
        train_records, tokenizer, m.seq_len, t.batch_size, cfg.loader.stride, cfg.loader.shuffle_buffer_size, t.seed
    )
    val_ds = eval_dataset(val_records, tokenizer, m.seq_len, t.batch_size)

    def evaluate():
        return model.evaluate(val_ds, steps=plan["data"]["eval_batches"], verbose=0, return_dict=True)["loss"]

    clock = cb.StepClock(
        s["total_steps"], (o.log_every, o.eval_every, o.save_every), t.gradient_accumulation_steps
    )
    tokens_per_step = s["tokens_per_step"]

    def save(step, name=None):
        path = save_checkpoint(
            model, tokenizer, cfg, out, name or f"checkpoint-{step}",
            {"step": step, "tokens_seen": step * tokens_per_step}, write_extra,
        )
        say(f"saved {path}")
        return path

    initial = cb.run_eval(evaluate, 0, metrics_path, say)
    logger = cb.MetricsLogger(clock, o.log_every, tokens_per_step, schedule, metrics_path, say)
    evaluator = cb.PeriodicEval(clock, o.eval_every, evaluate, metrics_path, say)
    callbacks = [
        cb.StopAtStep(clock),
        logger,
        evaluator,
        cb.PeriodicCheckpoint(clock, o.save_every, save),
    ]
    say(f"training {s['total_steps']:,} steps ({clock.epochs} keras epochs of {clock.epoch_steps} steps)")
    start = time.perf_counter()
    model.fit(
        train_ds,
        epochs=clock.epochs,
        steps_per_epoch=clock.fit_steps_per_epoch,
        callbacks=callbacks,
        shuffle=False,  # the pipeline shuffles; Keras cannot shuffle a stream
        verbose=0,
    )
    wall = time.perf_counter() - start
    final = cb.run_eval(evaluate, s["total_steps"], metrics_path, say)
    checkpoint = save(s["total_steps"])

    samples = [sample_text(model, tokenizer, p, seed=t.seed + i) for i, p in enumerate(SAMPLE_PROMPTS)]
    (out / "samples.txt").write_text("\n\n---\n\n".join(samples) + "\n")
    say("samples:")
    for text in samples:
        say("  " + text.replace("\n", "\n  "))

    trained_tokens = s["total_steps"] * tokens_per_step
    tokens_per_sec = trained_tokens / max(logger.train_seconds, 1e-9)
    summary = {
        "steps": s["total_steps"],
        "tokens": trained_tokens,
        "wall_seconds": wall,
        "train_seconds": logger.train_seconds,
        "tokens_per_sec": tokens_per_sec,
        "initial_val_loss": initial["val_loss"],
        "final_val_loss": final["val_loss"],
        "final_val_perplexity": final["val_perplexity"],
        "final_train_loss": logger.history[-1]["loss"] if logger.history else None,
        "val_loss_reduction": 1 - final["val_loss"] / initial["val_loss"],
        "checkpoint": str(checkpoint),
        "parameters": plan["parameters"],
        "architecture": plan["architecture"],
        "backend": devices,
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"done: {s['total_steps']:,} steps in {cb.format_seconds(wall)}, {tokens_per_sec:,.0f} tok/s; "
        f"val_loss {initial['val_loss']:.4f} -> {final['val_loss']:.4f} "
        f"({100 * summary['val_loss_reduction']:.0f}% lower); checkpoint {checkpoint}"
    )
    return 0


def _say_attention_path(model_cfg, devices):
    accel = backend_lib.accelerator(devices["devices"])
    if not model_cfg.flash_attention:
        say("attention: plain kernel (--no-flash-attention)")
    elif accel is None:
        say("attention: plain kernel; flash attention needs a GPU or TPU and no CPU kernel exists")
    else:
        say(f"attention: flash kernel where {devices['backend']} has one for this {accel}, else the plain kernel")
