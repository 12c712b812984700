"""Runs one training job: plan, data, model, `fit`, checkpoints, summary.

Readable top to bottom, in the order the run happens.
"""

import json
import math
import sys
import time
from pathlib import Path

from ultimate_trainer import backend as backend_lib
from ultimate_trainer import config as config_lib
from ultimate_trainer import distribution as distribution_lib
from ultimate_trainer.checkpoint.resume import check_resumable, find_checkpoint, read_state
from ultimate_trainer.checkpoint.run_dir import prepare_output_dir
from ultimate_trainer.data import shards, sources, tokenizers
from ultimate_trainer.errors import UserError
from ultimate_trainer.training.plan import format_plan, make_plan

SAMPLE_PROMPTS = ("The ", "A function ", "In Python, ")


# In a multi-process run only process 0 prints (and writes); see `train`.
_CHIEF = [True]


def say(message):
    if _CHIEF[0]:
        print(message, flush=True)


ALLOCATOR_KEPT = "kept freed memory (glibc mallopt)"


def _allocator_callbacks(plan):
    """What keeps `tune_allocator`'s settings in force during `fit`/`evaluate`."""
    from ultimate_trainer.training import callbacks as cb

    return [cb.KeepAllocatorSettings()] if plan["backend"]["host_allocator"] == ALLOCATOR_KEPT else []


def train(cfg):
    """Trains as `cfg` says; returns the process exit code."""
    allocator_tuned = backend_lib.tune_allocator()  # before the big buffers exist
    # First: joining a cluster must come before anything asks jax for its devices.
    dist = distribution_lib.setup(cfg, dry_run=cfg.run.dry_run)
    _CHIEF[0] = dist.is_chief
    out = Path(cfg.output.output_dir)
    resume = None
    with dist.chief_first():  # process 0 fetches a remote checkpoint, then the others find it cached
        if cfg.output.resume_from:
            from ultimate_trainer.checkpoint import cloud

            resume = find_checkpoint(cfg.output.resume_from, out, say,
                                     bucket_for=lambda uri: cloud.bucket_for_uri(cfg.cloud, uri))
    # Resuming a checkpoint of this very output dir continues its run; anything else must not clobber one.
    continuing = resume is not None and out.resolve() in Path(resume).resolve().parents
    if not continuing and not cfg.run.eval_only:
        prepare_output_dir(out, cfg.output.overwrite, dry_run=True)  # refuse early, before slow imports
    upload_to = None
    if cfg.cloud.cloud_provider and dist.is_chief and not cfg.run.dry_run and not cfg.run.eval_only:
        from ultimate_trainer.checkpoint import cloud

        # Before any compute (tokenizer, model, first step): bad credentials or a missing bucket stop the run here.
        upload_to = cloud.upload_destination(cfg.cloud, out, say)
    dist.barrier("output_dir_checked")  # every process checked before process 0 writes anything

    devices = backend_lib.describe_devices()
    accel = backend_lib.accelerator(devices["devices"])
    derived = config_lib.derive(cfg, data_parallel=dist.data_parallel, accel=accel,
                                bf16_missing=backend_lib.bf16_unsupported_reason() if accel else None)
    cfg = config_lib.applied(cfg, derived)  # the spec as these devices train it: batch split, precision default
    batch_line = derived.batch.line
    if dist.data_parallel > 1 and not batch_line:
        t = cfg.training
        batch_line = (f"global batch {t.batch_size * dist.data_parallel * t.gradient_accumulation_steps} = "
                      f"{t.batch_size} per device x {dist.data_parallel} data-parallel devices x "
                      f"{t.gradient_accumulation_steps} accumulation steps")
    if batch_line and not cfg.run.json:
        say(batch_line)
    with dist.chief_first():  # a tokenizer trained here is trained once, by process 0, and read by the others
        tokenizer, inputs = load_inputs(cfg, dist.micro_batch(cfg.training),
                                        plan_only=cfg.run.dry_run and resume is None)
    if config_lib.target_params_pending(cfg):
        cfg = config_lib.sized_for_vocab(cfg, tokenizer.vocab_size)
        m = cfg.model
        if not cfg.run.json:
            say(f"--target-params {m.target_params:,} sized for the {tokenizer.vocab_size:,}-piece vocab that "
                f"--auto-vocab-size picked: d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, "
                f"d_ff {m.d_ff}")
    plan = make_plan(cfg, tokenizer, inputs, data_parallel=dist.data_parallel)
    plan["distribution"] = dist.describe()
    devices["host_allocator"] = ALLOCATOR_KEPT if allocator_tuned else "as configured"
    if backend_lib.choice().get("backend") == devices["backend"]:
        devices["chosen_by"] = backend_lib.choice()["reason"]
    plan["backend"] = devices
    defaults_line = distribution_lib.device_defaults(cfg, devices)
    if defaults_line:
        plan["notes"].append(defaults_line)
    plan["peak_flops"] = _peak_flops(cfg, devices, dist.devices)
    if resume is not None:
        if cfg.model.use_lora:
            raise UserError(
                "resuming a LoRA run is not supported yet: its checkpoints hold the adapters merged into the "
                f"weights; start a new LoRA run with --init-from {resume}"
            )
        state = read_state(resume)
        resumed = check_resumable(cfg, resume, state, inputs, plan, tokenizer)
        plan["schedule"]["lr_schedule"] = resumed.pop("lr_schedule")
        plan["resume"] = {"checkpoint": str(resume), "step": state["step"], "data": state["data"], **resumed}

    if cfg.run.dry_run:
        if cfg.run.json:
            print(json.dumps(plan, indent=2))
        else:
            say(_backend_line(devices))
            for line in format_plan(plan, layout_rules=True):
                say(line)
            say("dry run: nothing trained")
        return 0

    if cfg.run.eval_only:
        return _eval_only(cfg, plan, tokenizer, inputs, resume or cfg.model.init_from, dist)
    moved = None if continuing or not dist.is_chief else prepare_output_dir(out, cfg.output.overwrite)
    say(_backend_line(devices))
    if moved:
        say(f"--overwrite: moved the previous run to {moved}")
    for line in format_plan(plan):
        say(line)
    return _fit(cfg, plan, tokenizer, inputs, out, devices, dist, resume, upload_to)


def _peak_flops(cfg, devices, count):
    """Peak FLOP/s of the `count` devices the run uses, and where the figure comes from."""
    from ultimate_trainer.training import mfu

    if cfg.training.peak_flops:
        return {"total": cfg.training.peak_flops * count, "per_device": cfg.training.peak_flops, "source": "--peak-flops"}
    name = devices["device_names"][0]
    accel = backend_lib.accelerator(devices["devices"])
    # The precision the run computes in: a GPU without bfloat16 runs float32 even when asked.
    mixed = config_lib.trains_in_bfloat16(cfg, accel, backend_lib.bf16_unsupported_reason() if accel else None)
    per_device = mfu.table_peak(name, mixed, devices["backend"])
    if per_device is not None:
        tf32 = not mixed and per_device != mfu.table_peak(name, False)
        return {"total": per_device * count, "per_device": per_device,
                "source": f"data sheet of {name}, {'bfloat16' if mixed else 'TF32' if tf32 else 'float32'}"}
    if accel is None:
        dtype = "bfloat16" if mixed else "float32"
        try:
            peak = mfu.cpu_peak(dtype, devices["backend"])
        except (RuntimeError, OSError) as error:  # no peak is better than a wrong one
            return {"total": None, "per_device": None,
                    "source": f"the CPU peak could not be measured ({error}); pass --peak-flops for MFU"}
        return {"total": peak["flops"], "per_device": peak["flops"], "source": peak["source"],
                "cache_key": peak["cache_key"]}
    return {"total": None, "per_device": None, "source": f"unknown device {name!r}; pass --peak-flops for MFU"}


def _backend_line(devices):
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(devices["devices"].items()))
    line = (
        f"backend: {devices['backend']} {devices['backend_version']} "
        f"(keras {devices['keras_version']}); devices: {found}"
    )
    return line + (f"\nbackend chosen by {devices['chosen_by']}" if devices.get("chosen_by") else "")


def load_inputs(cfg, micro_batch=None, plan_only=False):
    """The run's tokenizer and its input (shards from --data-dir, else streamed text);
    `micro_batch`: sequences per micro-batch over all devices (default --batch-size).
    `plan_only` (a dry run): data that cannot be read here (shards not prepared
    yet, a hub dataset without network) is planned from the flags instead."""
    from ultimate_trainer.data.inputs import ShardInputs, StreamInputs, unread_inputs

    m = cfg.model
    # TTT state passing: one stream per row of the whole (all-device) micro-batch.
    rows = (micro_batch or cfg.training.batch_size) if m.state_passing else None
    unread = unread_inputs(cfg, rows) if plan_only else None
    if unread:
        return unread
    if cfg.data.data_dir:
        meta = shards.read_meta(cfg.data.data_dir)
        if cfg.tokenizer.tokenizer_path:
            tokenizer = tokenizers.make_tokenizer(cfg.tokenizer)
        else:
            tokenizer = tokenizers.load_tokenizer(cfg.data.data_dir)
        shards.check_tokenizer(meta, tokenizer, cfg.data.data_dir)
        if "tokenizer.vocab_size" in cfg.explicit and tokenizer.vocab_size != cfg.tokenizer.vocab_size:
            raise UserError(
                f"--data-dir {cfg.data.data_dir}: its shards' tokenizer has {tokenizer.vocab_size:,} ids, but "
                f"--vocab-size (or the recipe) says {cfg.tokenizer.vocab_size:,}; prepare the shards with the "
                f"tokenizer the recipe names, or pass --vocab-size {tokenizer.vocab_size}"
            )
        return tokenizer, ShardInputs(cfg.data.data_dir, meta, m.seq_len, cfg.loader.stride, rows)
    train_records, val_records, source_name = sources.open_records(cfg.data)
    tokenizer = tokenizers.make_tokenizer(
        cfg.tokenizer, train_records, val_records, Path(cfg.output.output_dir), None if cfg.run.json else say,
        vocab_size_given="tokenizer.vocab_size" in cfg.explicit,
    )
    inputs = StreamInputs(
        train_records, val_records, tokenizer, source_name, m.seq_len, cfg.loader.stride,
        cfg.loader.shuffle_buffer_size, rows,
    )
    return tokenizer, inputs


def _eval_only(cfg, plan, tokenizer, inputs, checkpoint, dist):
    """`--eval-only`: the validation loss of a checkpoint, nothing written."""
    from ultimate_trainer.checkpoint.store import init_from
    from ultimate_trainer.models.causal_lm import build_causal_lm
    from ultimate_trainer.training.losses import TokenCrossEntropy

    eval_batch = plan["data"]["eval_batch_size"]
    with dist.scope():
        model = build_causal_lm(cfg.model, tokenizer.vocab_size)
        init_from(model, checkpoint)
        model.compile(loss=TokenCrossEntropy(), **backend_lib.compile_options(dist.strategy))
    batches = plan["data"]["eval_batches"]
    loss = float(model.evaluate(dist.process_batches(inputs.eval_dataset(eval_batch)), steps=batches, verbose=0,
                                callbacks=_allocator_callbacks(plan), return_dict=True)["loss"])
    result = {"checkpoint": str(checkpoint), "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)),
              "val_tokens": batches * eval_batch * cfg.model.seq_len}
    if cfg.run.json:
        print(json.dumps(result))
    else:
        say(f"eval {checkpoint}: val_loss {loss:.4f} | val_ppl {result['val_perplexity']:.2f} ({batches} batches)")
    return 0


def _fit(cfg, plan, tokenizer, inputs, out, devices, dist, resume=None, upload_to=None):
    from ultimate_trainer.training import reporting

    o = cfg.output
    uploader = None
    if not dist.is_chief:  # only process 0 writes logs, checkpoints and uploads
        return _fit_with(reporting.NullSink(), None, cfg, plan, tokenizer, inputs, out, devices, dist, resume)
    if upload_to is not None:
        from ultimate_trainer.checkpoint import cloud

        bucket, prefix = upload_to
        uploader = cloud.Uploader(bucket, prefix, keep=o.save_total_limit, log=say)
        say(f"uploads: checkpoints, milestones, best_checkpoint and final_model go to {bucket.uri(prefix)} in the "
            f"background")
    sink = reporting.MetricsSink(out, o.tensorboard, o.wandb_project, o.wandb_run_name, cfg.to_dict(redact=True),
                                 wandb_entity=o.wandb_entity)
    try:
        return _fit_with(sink, uploader, cfg, plan, tokenizer, inputs, out, devices, dist, resume)
    finally:
        if uploader is not None:
            say("uploads: waiting for the last uploads to finish")
            say(uploader.close(cfg.cloud.cloud_upload_wait))
        sink.close()
        # Drawn on every way out (done, interrupted, stopped on NaN): the curve so far.
        curve = reporting.plot_loss_curve(sink.path, out / reporting.LOSS_CURVE_FILE, title=str(out))
        if curve:
            say(f"loss curve: {curve}")


def _fit_with(sink, uploader, cfg, plan, tokenizer, inputs, out, devices, dist, resume):
    import keras

    from ultimate_trainer.checkpoint.store import (
        MODEL_FILE,
        check_architecture,
        init_from,
        link_copy,
        prune_checkpoints,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )
    from ultimate_trainer.models import lora
    from ultimate_trainer.models.causal_lm import build_causal_lm
    from ultimate_trainer.training import callbacks as cb
    from ultimate_trainer.training import interrupt
    from ultimate_trainer.training.generation import sample_text
    from ultimate_trainer.training.losses import TokenCrossEntropy
    from ultimate_trainer.training.optimizers import FiniteMean, build_optimizer
    from ultimate_trainer.training.schedules import WarmupCosine

    m, t, o, s = cfg.model, cfg.training, cfg.output, plan["schedule"]
    chief = dist.is_chief
    if chief:
        config_lib.write_json(cfg, out / "training_args.json")
        tokenizer.save(out)
    micro = dist.micro_batch(t)  # sequences per micro-batch over all devices

    keras.utils.set_random_seed(t.seed)
    if cfg.optimization.use_mixed_precision:
        unsupported = backend_lib.bf16_unsupported_reason()
        if unsupported:
            say(f"precision: float32; --use-mixed-precision asks for bfloat16, but {unsupported}")
        else:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            say("precision: bfloat16 compute, float32 weights")
    _say_attention_path(m, devices)

    # Build, compile and restore under a tf.distribute strategy (on jax the distribution is global).
    with dist.scope():
        model = build_causal_lm(m, tokenizer.vocab_size, state_passing_rows=micro if m.state_passing else None)
        if m.state_passing:
            # Each stream holds this many windows; the carried states restart with the streams every epoch.
            model.stream_windows = inputs.windows_per_row
        if m.init_from:
            init_from(model, m.init_from)
            say(f"initialised from {m.init_from}")
        write_extra = None
        if m.use_lora:
            targets = lora.parse_targets(m.lora_targets)
            lora.enable_lora(model, m.lora_rank, m.lora_alpha, targets)

            def write_extra(directory):
                lora.save_lora(model, directory, m.lora_rank, m.lora_alpha, targets)
        layout_report = distribution_lib.check_layouts(model, dist)
        if layout_report is not None:
            for line in distribution_lib.format_layout_report(layout_report, dist):
                say(line)
        trainable = sum(math.prod(v.shape) for v in model.trainable_weights)
        params = model.count_params()
        if (params, trainable) != (plan["parameters"]["total"], plan["parameters"]["trainable"]):
            raise RuntimeError(
                f"built model has {params:,} parameters ({trainable:,} trainable) but "
                f"sizing.count_params says {plan['parameters']['total']:,} ({plan['parameters']['trainable']:,}); "
                f"the formula and the model have drifted apart"
            )
        schedule = WarmupCosine.from_config(s["lr_schedule"])
        model.compile(
            optimizer=build_optimizer(t, schedule, model),
            loss=TokenCrossEntropy(),
            **backend_lib.compile_options(dist.strategy),
        )
        if t.skip_nonfinite:
            # A skipped update's loss stays out of the logged mean. Set untracked, as
            # `compile` sets it: the built model refuses new tracked state.
            object.__setattr__(model, "_loss_tracker", FiniteMean(name="loss"))

        start_step = 0
        if resume is not None:
            state = read_state(resume)
            check_architecture(model, resume, "--resume-from")
            model.optimizer.build(model.trainable_variables)
            model.load_weights(Path(resume) / MODEL_FILE)  # weights and optimizer slots, iterations included
            set_rng_state(model, state.get("rng"))
            start_step = state["step"]
            say(f"resumed from {resume} at step {start_step:,} (data window {state['data']['next_window']:,})")

    val_ds = _with_workers(dist.process_batches(inputs.eval_dataset(plan["data"]["eval_batch_size"])),
                           cfg.loader.num_workers)

    def evaluate():
        return model.evaluate(val_ds, steps=plan["data"]["eval_batches"], verbose=0, callbacks=_allocator_callbacks(plan),
                              return_dict=True)["loss"]

    accumulation = t.gradient_accumulation_steps
    intervals = (o.log_every, o.eval_every, o.save_every) + ((o.milestone_every,) if o.milestone_every else ())
    clock = cb.StepClock(s["total_steps"], intervals, accumulation, start_step)
    tokens_per_step = s["tokens_per_step"]
    saved = {}

    def _state(step):
        return {
            "step": step,
            "tokens_seen": step * tokens_per_step,
            # Windows (sequences) drawn from the stream so far, micro-batches included.
            "data": inputs.state(step * micro * accumulation, t.seed),
            "sequences_per_step": micro * accumulation,
            "schedule": s["lr_schedule"],  # a later resume continues this one
            "rng": rng_state(model),
            # The best validation so far, so a resumed run keeps a better best_checkpoint (local and in the bucket).
            **({"best": {"val_loss": best["val_loss"], "step": best.get("step")}} if math.isfinite(best["val_loss"]) else {}),
        }

    def save(step):
        if step in saved:
            return saved[step]
        # Every process takes part (weights split across processes are gathered); process 0 writes.
        with dist.host_values(model):
            path = out / f"checkpoint-{step}"
            if chief:
                path = save_checkpoint(model, tokenizer, cfg, out, path.name, _state(step), write_extra, latest=True)
        saved[step] = path
        if not chief:
            return path
        say(f"saved {path}")
        if uploader is not None:
            uploader.submit(path)
        if o.save_total_limit:
            # A checkpoint not uploaded yet is kept locally until it is.
            keep = ([resume] if resume else []) + (uploader.pending if uploader is not None else [])
            for gone in prune_checkpoints(out, o.save_total_limit, protect=keep):
                for key in [k for k, v in saved.items() if v == gone]:
                    del saved[key]
                say(f"--save-total-limit {o.save_total_limit}: removed {gone}")
        return path

    def save_milestone(step):
        with dist.host_values(model):
            if chief:
                path = save_checkpoint(model, tokenizer, cfg, out, f"milestone-{step}", _state(step), write_extra)
                say(f"saved milestone {path}")
                if uploader is not None:
                    uploader.submit(path)

    best = {"val_loss": math.inf}
    if resume is not None:  # a worse first evaluation after a resume must not replace the better best
        best.update(read_state(resume).get("best") or {})

    def validate(step):
        if not o.eval_enabled:  # --no-eval
            return {"val_loss": None, "val_perplexity": None}
        record = cb.run_eval(evaluate, step, sink, say)
        if step > start_step and record["val_loss"] < best["val_loss"]:
            best.update(record)
            with dist.host_values(model):
                if chief:
                    save_checkpoint(model, tokenizer, cfg, out, "best_checkpoint", _state(step), write_extra,
                                    replace=True)
                    if uploader is not None:
                        uploader.submit(out / "best_checkpoint")
            say(f"best validation loss so far: saved {out / 'best_checkpoint'}")
        return record

    initial = validate(start_step)
    from ultimate_trainer.models import moe

    moe.read_stats(model)  # from zero: a resumed checkpoint holds a window's partial sums
    logger = cb.MetricsLogger(clock, o.log_every, tokens_per_step, schedule, sink, say,
                              flops_per_token=plan["flops_per_token"], peak=plan["peak_flops"],
                              skip_nonfinite=t.skip_nonfinite,
                              moe_stats=(lambda: moe.read_stats(model)) if m.num_experts else None)
    callbacks = [
        cb.StepCounter(clock),
        logger,
        cb.PeriodicEval(clock, o.eval_every, validate),
        cb.PeriodicCheckpoint(clock, o.save_every, save),
        *([cb.PeriodicCheckpoint(clock, o.milestone_every, save_milestone)] if o.milestone_every else []),
        *_allocator_callbacks(plan),
    ]
    remaining = s["total_steps"] - start_step
    say(f"training {remaining:,} steps, {start_step:,} -> {s['total_steps']:,} (Keras epochs of {clock.epoch_steps} steps)")
    start = time.perf_counter()
    with interrupt.graceful_stop(clock, say):
        for first_step, epoch_steps, epochs in clock.segments():
            if clock.interrupted:
                break
            # Each fit call reads the stream from exactly where the previous one stopped.
            train_ds = _with_workers(
                dist.process_batches(inputs.train_dataset(micro, t.seed, start_window=first_step * micro * accumulation)),
                cfg.loader.num_workers,
            )
            model.fit(
                train_ds,
                epochs=epochs,
                steps_per_epoch=epoch_steps * accumulation,
                callbacks=callbacks,
                shuffle=False,  # the pipeline shuffles; Keras cannot shuffle a stream
                verbose=0,
            )
    wall = time.perf_counter() - start
    if clock.interrupted and not clock.done:
        checkpoint = save(clock.step)
        say(
            f"stopped at step {clock.step:,} of {s['total_steps']:,}; the checkpoint is complete. Resume with the "
            f"same flags plus: --resume-from {checkpoint}"
        )
        return 0
    if clock.nonfinite_after is not None:
        good = f"the last good checkpoint is {saved[max(saved)]}" if saved else "no checkpoint was saved before it"
        print(
            f"error: the training loss or gradients became NaN or infinite after step {clock.nonfinite_after:,}"
            + (f" (more than --skip-nonfinite {t.skip_nonfinite} updates)" if t.skip_nonfinite else "")
            + f"; {good}. Lower --learning-rate, raise --warmup-steps or keep --grad-clip on, then --resume-from "
            f"that checkpoint with --allow-changed-config naming what you changed (--skip-nonfinite N steps over "
            f"rare bad batches)",
            file=sys.stderr,
        )
        return 3
    final = validate(s["total_steps"])
    checkpoint = save(s["total_steps"])
    if o.milestone_every and s["total_steps"] % o.milestone_every == 0:
        save_milestone(s["total_steps"])
    # Every process samples (its computations span all devices); process 0 writes.
    samples = [sample_text(model, tokenizer, p, o.sample_tokens, seed=t.seed + i)
               for i, p in enumerate(SAMPLE_PROMPTS)] if o.sample_tokens else []
    if not chief:
        return 0
    final_model = link_copy(checkpoint, out / "final_model")
    say(f"final model: {final_model}")
    if uploader is not None:
        uploader.submit(final_model)
    if samples:
        (out / "samples.txt").write_text("\n\n---\n\n".join(samples) + "\n")
        say("samples:")
        for text in samples:
            say("  " + text.replace("\n", "\n  "))

    trained_tokens = (s["total_steps"] - start_step) * tokens_per_step  # in this process
    tokens_per_sec = trained_tokens / max(logger.train_seconds, 1e-9)
    summary = {
        "steps": s["total_steps"],
        "resumed_from_step": start_step if resume is not None else None,
        "tokens": s["total_steps"] * tokens_per_step,
        "wall_seconds": wall,
        "train_seconds": logger.train_seconds,
        "tokens_per_sec": tokens_per_sec,
        "mfu": logger.peak.mfu(plan["flops_per_token"] * tokens_per_sec),
        "peak_flops": plan["peak_flops"],
        "initial_val_loss": initial["val_loss"],
        "final_val_loss": final["val_loss"],
        "final_val_perplexity": final["val_perplexity"],
        "final_train_loss": logger.history[-1]["loss"] if logger.history else None,
        "val_loss_reduction": 1 - final["val_loss"] / initial["val_loss"] if o.eval_enabled else None,
        "best_val_loss": best["val_loss"] if o.eval_enabled else None,
        "best_step": best.get("step"),
        "checkpoint": str(checkpoint),
        "parameters": plan["parameters"],
        "architecture": plan["architecture"],
        "backend": devices,
        "distribution": plan["distribution"],
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(
        f"done: {s['total_steps']:,} steps in {cb.format_seconds(wall)}, {tokens_per_sec:,.0f} tok/s; "
        + (f"val_loss {initial['val_loss']:.4f} -> {final['val_loss']:.4f} "
           f"({100 * summary['val_loss_reduction']:.0f}% lower); " if o.eval_enabled else "no validation (--no-eval); ")
        + f"checkpoint {checkpoint}"
    )
    return 0


def _with_workers(dataset, num_workers):
    """`--num-workers N`: the input pipeline runs on a private pool of N threads."""
    if not num_workers:
        return dataset
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = num_workers
    return dataset.with_options(options)


def _say_attention_path(model_cfg, devices):
    accel = backend_lib.accelerator(devices["devices"])
    if not model_cfg.flash_attention:
        say("attention: plain kernel (--no-flash-attention)")
    elif accel is None:
        say("attention: plain kernel; flash attention needs a GPU or TPU and no CPU kernel exists")
    else:
        say(f"attention: flash kernel where {devices['backend']} has one for this {accel}, else the plain kernel")
