"""Runs one training job: plan, data, model, `fit`, checkpoints, summary.

`train(cfg)` finds what to resume, reads the data and makes the `Plan`; a
`Trainer` then builds the model, restores it, fits it and finishes the run,
with a `CheckpointManager`, an `Evaluator`, a `MetricsSink` and a `RunSummary`.
Readable top to bottom, in the order the run happens.
"""

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import keras
import tensorflow as tf  # tf.data feeds every backend (data/pipeline.py)

from ultimate_trainer import backend as backend_lib
from ultimate_trainer import config as config_lib
from ultimate_trainer import distribution as distribution_lib
from ultimate_trainer.checkpoint import cloud
from ultimate_trainer.checkpoint.layout import MODEL_FILE
from ultimate_trainer.checkpoint.manager import CheckpointConfig, CheckpointManager
from ultimate_trainer.checkpoint.resume import check_resumable, find_checkpoint, read_state
from ultimate_trainer.checkpoint.run_dir import prepare_output_dir
from ultimate_trainer.checkpoint.store import check_architecture, init_from, rng_state, save_checkpoint, set_rng_state
from ultimate_trainer.data import shards, sources, tokenizers
from ultimate_trainer.data.inputs import ShardInputs, StreamInputs, load_streamed, unread_inputs
from ultimate_trainer.data.streamed import streamed
from ultimate_trainer.errors import UserError
from ultimate_trainer.models import lora, moe
from ultimate_trainer.models.causal_lm import build_causal_lm
from ultimate_trainer.training import callbacks as cb
from ultimate_trainer.training import interrupt, mfu, reporting
from ultimate_trainer.training.evaluator import Evaluator, perplexity
from ultimate_trainer.training.generation import sample_texts
from ultimate_trainer.training.losses import TokenCrossEntropy
from ultimate_trainer.training.optimizers import FiniteMean, build_optimizer
from ultimate_trainer.training.plan import Devices, format_plan, make_plan
from ultimate_trainer.training.schedules import WarmupCosine

SAMPLE_PROMPTS = ("The ", "A function ", "In Python, ")


# In a multi-process run only process 0 prints (and writes); see `train`.
_CHIEF = [True]


def say(message):
    if _CHIEF[0]:
        print(message, flush=True)


def _allocator_callbacks(devices):
    """What keeps `tune_allocator`'s settings in force during `fit`/`evaluate`."""
    return [cb.KeepAllocatorSettings()] if devices.allocator_kept else []


def train(cfg):
    """Trains as `cfg` says; returns the process exit code.

    Example:
        train(cli.parse_config(["--model-preset", "nano", "--max-steps", "20"]))   # 0
    """
    allocator_tuned = backend_lib.tune_allocator()  # before the big buffers exist
    # First: joining a cluster must come before anything asks jax for its devices.
    dist = distribution_lib.setup(cfg, dry_run=cfg.run.dry_run)
    _CHIEF[0] = dist.is_chief
    out = Path(cfg.output.output_dir)
    with dist.chief_first():  # process 0 fetches a remote checkpoint, then the others find it cached
        resume = _find_resume(cfg, out)
    # Resuming a checkpoint of this very output dir continues its run; anything else must not clobber one.
    continuing = resume is not None and out.resolve() in Path(resume).resolve().parents
    if not continuing and not cfg.run.eval_only:
        prepare_output_dir(out, cfg.output.overwrite, dry_run=True)  # refuse early, before slow imports
    upload_to = _upload_destination(cfg, out, dist)
    dist.barrier("output_dir_checked")  # every process checked before process 0 writes anything

    described = backend_lib.describe_devices()
    accel = backend_lib.accelerator(described["devices"])
    derived = config_lib.derive(cfg, data_parallel=dist.data_parallel, accel=accel,
                                bf16_missing=backend_lib.bf16_unsupported_reason() if accel else None)
    cfg = config_lib.applied(cfg, derived)  # the spec as these devices train it: batch split, precision default
    _say_batch(cfg, dist, derived.batch.line)
    with dist.chief_first():  # a tokenizer trained here is trained once, by process 0, and read by the others
        tokenizer, inputs = load_inputs(cfg, dist.micro_batch(cfg.training),
                                        plan_only=cfg.run.dry_run and resume is None, resume=resume)
    cfg = _sized_for_vocab(cfg, tokenizer)
    plan = build_plan(cfg, tokenizer, inputs, dist, allocator_tuned, resume, described)
    if cfg.run.dry_run:
        return _dry_run(cfg, plan)
    if cfg.run.eval_only:
        return _eval_only(cfg, plan, tokenizer, inputs, resume or cfg.model.init_from, dist)
    moved = None if continuing or not dist.is_chief else prepare_output_dir(out, cfg.output.overwrite)
    say(_backend_line(plan.devices))
    if moved:
        say(f"--overwrite: moved the previous run to {moved}")
    for line in format_plan(plan):
        say(line)
    return Trainer(cfg, plan, tokenizer, inputs, dist, resume, upload_to).run()


def _find_resume(cfg, out):
    """The verified checkpoint --resume-from names, or None."""
    if not cfg.output.resume_from:
        return None
    return find_checkpoint(cfg.output.resume_from, out, say,
                           bucket_for=lambda uri: cloud.bucket_for_uri(cfg.cloud, uri))


def _upload_destination(cfg, out, dist):
    """(bucket, prefix) the checkpoints are uploaded to, or None."""
    if not cfg.cloud.cloud_provider or not dist.is_chief or cfg.run.dry_run or cfg.run.eval_only:
        return None
    # Before any compute (tokenizer, model, first step): bad credentials or a missing bucket stop the run here.
    return cloud.upload_destination(cfg.cloud, out, say)


def _say_batch(cfg, dist, batch_line):
    if dist.data_parallel > 1 and not batch_line:
        t = cfg.training
        batch_line = (f"global batch {t.batch_size * dist.data_parallel * t.gradient_accumulation_steps} = "
                      f"{t.batch_size} per device x {dist.data_parallel} data-parallel devices x "
                      f"{t.gradient_accumulation_steps} accumulation steps")
    if batch_line and not cfg.run.json:
        say(batch_line)


def _sized_for_vocab(cfg, tokenizer):
    """`cfg` with --target-params sized for the tokenizer's vocab, when --auto-vocab-size left it open."""
    if not config_lib.target_params_pending(cfg):
        return cfg
    cfg = config_lib.sized_for_vocab(cfg, tokenizer.vocab_size)
    m = cfg.model
    if not cfg.run.json:
        say(f"--target-params {m.target_params:,} sized for the {tokenizer.vocab_size:,}-piece vocab that "
            f"--auto-vocab-size picked: d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, "
            f"d_ff {m.d_ff}")
    return cfg


def build_plan(cfg, tokenizer, inputs, dist, allocator_tuned=False, resume=None, described=None):
    """The run's `Plan`, once the devices are known; with a checkpoint to
    `resume`, checked to continue it.

    Example:
        build_plan(cfg, tokenizer, inputs, distribution.setup(cfg)).to_json()
    """
    described = described or backend_lib.describe_devices()
    chosen = backend_lib.choice()
    devices = Devices.from_described(described, allocator_kept=bool(allocator_tuned),
                                     chosen_by=chosen["reason"] if chosen.get("backend") == described["backend"]
                                     else None)
    defaults_line = distribution_lib.device_defaults(cfg, described)
    plan = make_plan(cfg, tokenizer, inputs, data_parallel=dist.data_parallel, distribution=dist.describe(),
                     devices=devices, notes=[defaults_line])
    # Only once the plan holds (a CPU peak may take a measurement).
    plan = dataclasses.replace(plan, peak_flops=_peak_flops(cfg, devices, dist.devices))
    if resume is None:
        return plan
    if cfg.model.use_lora:
        raise UserError(
            "resuming a LoRA run is not supported yet: its checkpoints hold the adapters merged into the "
            f"weights; start a new LoRA run with --init-from {resume}"
        )
    state = read_state(resume)
    resumed = check_resumable(cfg, resume, state, inputs, plan, tokenizer)
    lr_schedule = resumed.pop("lr_schedule")
    return plan.resumed({"checkpoint": str(resume), "step": state["step"], "data": state["data"], **resumed},
                        lr_schedule)


def _dry_run(cfg, plan):
    if cfg.run.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        say(_backend_line(plan.devices))
        for line in format_plan(plan, layout_rules=True):
            say(line)
        say("dry run: nothing trained")
    return 0


def _peak_flops(cfg, devices, count):
    """Peak FLOP/s of the `count` devices the run uses, and where the figure comes from."""
    if cfg.training.peak_flops:
        return {"total": cfg.training.peak_flops * count, "per_device": cfg.training.peak_flops, "source": "--peak-flops"}
    name = devices.device_names[0]
    accel = backend_lib.accelerator(devices.devices)
    # The precision the run computes in: a GPU without bfloat16 runs float32 even when asked.
    mixed = config_lib.trains_in_bfloat16(cfg, accel, backend_lib.bf16_unsupported_reason() if accel else None)
    per_device = mfu.table_peak(name, mixed, devices.backend)
    if per_device is not None:
        tf32 = not mixed and per_device != mfu.table_peak(name, False)
        return {"total": per_device * count, "per_device": per_device,
                "source": f"data sheet of {name}, {'bfloat16' if mixed else 'TF32' if tf32 else 'float32'}"}
    if accel is None:
        dtype = "bfloat16" if mixed else "float32"
        try:
            peak = mfu.cpu_peak(dtype, devices.backend)
        except (RuntimeError, OSError) as error:  # no peak is better than a wrong one
            return {"total": None, "per_device": None,
                    "source": f"the CPU peak could not be measured ({error}); pass --peak-flops for MFU"}
        return {"total": peak["flops"], "per_device": peak["flops"], "source": peak["source"],
                "cache_key": peak["cache_key"]}
    return {"total": None, "per_device": None, "source": f"unknown device {name!r}; pass --peak-flops for MFU"}


def _backend_line(devices):
    found = ", ".join(f"{n} {kind}" for kind, n in sorted(devices.devices.items()))
    line = f"backend: {devices.backend} {devices.backend_version} (keras {devices.keras_version}); devices: {found}"
    return line + (f"\nbackend chosen by {devices.chosen_by}" if devices.chosen_by else "")


def load_inputs(cfg, micro_batch=None, plan_only=False, resume=None):
    """The run's tokenizer and its input (shards from --data-dir, else streamed text);
    `micro_batch`: sequences per micro-batch over all devices (default --batch-size).
    `plan_only` (a dry run): data that cannot be read here (shards not prepared
    yet, a hub dataset without network) is planned from the flags instead."""
    m = cfg.model
    # TTT state passing: one stream per row of the whole (all-device) micro-batch.
    rows = (micro_batch or cfg.training.batch_size) if m.state_passing else None
    unread = unread_inputs(cfg, rows) if plan_only else None
    if unread:
        return unread
    streams, why = streamed(cfg.data)  # a large or remote source: no pass before training (data/streamed.py)
    if streams and not rows:
        saved = read_state(resume)["data"] if resume is not None else None
        return load_streamed(cfg, why, None if cfg.run.json else say, saved)
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
    eval_batch, batches = plan.data.eval_batch_size, plan.data.eval_batches
    with dist.scope():
        model = build_causal_lm(cfg.model, tokenizer.vocab_size)
        init_from(model, checkpoint)
        model.compile(loss=TokenCrossEntropy(), **backend_lib.compile_options(dist.strategy))
    loss = float(model.evaluate(dist.process_batches(inputs.eval_dataset(eval_batch)), steps=batches, verbose=0,
                                callbacks=_allocator_callbacks(plan.devices), return_dict=True)["loss"])
    result = {"checkpoint": str(checkpoint), "val_loss": loss, "val_perplexity": perplexity(loss),
              "val_tokens": batches * eval_batch * cfg.model.seq_len}
    if cfg.run.json:
        print(json.dumps(result))
    else:
        say(f"eval {checkpoint}: val_loss {loss:.4f} | val_ppl {result['val_perplexity']:.2f} ({batches} batches)")
    return 0


class Trainer:
    """One run's training: build the model, restore it, fit it, finish.

    `plan` is the run's `Plan`; `resume` the checkpoint it continues (or
    None); `upload_to` the (bucket, prefix) its checkpoints go to. `now` is
    the wall clock the summary measures with.

    Example:
        Trainer(cfg, plan, tokenizer, inputs, dist).run()   # the exit code
    """

    def __init__(self, cfg, plan, tokenizer, inputs, dist, resume=None, upload_to=None, now=time.perf_counter):
        self.cfg, self.plan, self.tokenizer, self.inputs, self.dist = cfg, plan, tokenizer, inputs, dist
        self.resume, self.upload_to, self.now = resume, upload_to, now
        self.out = Path(cfg.output.output_dir)
        self.micro = dist.micro_batch(cfg.training)  # sequences per micro-batch over all devices
        self.sink, self.uploader = reporting.NullSink(), None
        self.model, self.write_extra, self.start_step = None, None, 0
        self.schedule = self.checkpoints = self.evaluator = None  # made by `compile` and `fit`

    # ------------------------------------------------------------------ the run
    def run(self):
        """Fits, with the metrics sink and the uploader open (process 0 only), and closes them on every way out."""
        if not self.dist.is_chief:  # only process 0 writes logs, checkpoints and uploads
            return self.fit()
        self._open_reporting()
        try:
            return self.fit()
        finally:
            self._close_reporting()

    def fit(self):
        """Builds, restores, trains and finishes; returns the exit code."""
        if self.dist.is_chief:
            config_lib.write_json(self.cfg, self.out / "training_args.json")
            self.tokenizer.save(self.out)
        keras.utils.set_random_seed(self.cfg.training.seed)
        self._set_precision()
        _say_attention_path(self.cfg.model, self.plan.devices)
        # Build, compile and restore under a tf.distribute strategy (on jax the distribution is global).
        with self.dist.scope():
            self.build()
            self.compile()
            self.restore()
        self.checkpoints = self._checkpoint_manager()
        self.evaluator = self._evaluator()
        initial = self.evaluator.validate(self.start_step)
        moe.read_stats(self.model)  # from zero: a resumed checkpoint holds a window's partial sums
        clock, logger = self._clock_and_logger()
        start = self.now()
        self.train_loop(clock, logger)
        return self.finish(clock, logger, initial, self.now() - start)

    # ------------------------------------------------------------------ build and restore
    def _set_precision(self):
        if not self.cfg.optimization.use_mixed_precision:
            return
        unsupported = backend_lib.bf16_unsupported_reason()
        if unsupported:
            say(f"precision: float32; --use-mixed-precision asks for bfloat16, but {unsupported}")
        else:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            say("precision: bfloat16 compute, float32 weights")

    def build(self):
        """The model, initialised from --init-from, with LoRA adapters, checked against the plan's counts."""
        m = self.cfg.model
        # With state passing, each stream holds windows_per_row windows; the carried states restart with them.
        model = build_causal_lm(m, self.tokenizer.vocab_size, state_passing_rows=self.micro if m.state_passing else None,
                                stream_windows=self.inputs.windows_per_row if m.state_passing else None)
        if m.init_from:
            init_from(model, m.init_from)
            say(f"initialised from {m.init_from}")
        if m.use_lora:
            targets = lora.parse_targets(m.lora_targets)
            lora.enable_lora(model, m.lora_rank, m.lora_alpha, targets)
            self.write_extra = lambda directory: lora.save_lora(model, directory, m.lora_rank, m.lora_alpha, targets)
        layout_report = distribution_lib.check_layouts(model, self.dist)
        if layout_report is not None:
            for line in distribution_lib.format_layout_report(layout_report, self.dist):
                say(line)
        self.model = model
        self._check_counts()

    def _check_counts(self):
        trainable = sum(math.prod(v.shape) for v in self.model.trainable_weights)
        params, planned = self.model.count_params(), self.plan.parameters
        if (params, trainable) != (planned.total, planned.trainable):
            raise RuntimeError(
                f"built model has {params:,} parameters ({trainable:,} trainable) but "
                f"sizing.count_params says {planned.total:,} ({planned.trainable:,}); "
                f"the formula and the model have drifted apart"
            )

    def compile(self):
        t = self.cfg.training
        self.schedule = WarmupCosine.from_config(self.plan.schedule.lr_schedule)
        self.model.compile(optimizer=build_optimizer(t, self.schedule, self.model), loss=TokenCrossEntropy(),
                           **backend_lib.compile_options(self.dist.strategy))
        if t.skip_nonfinite:
            # A skipped update's loss stays out of the logged mean. Set untracked, as
            # `compile` sets it: the built model refuses new tracked state.
            object.__setattr__(self.model, "_loss_tracker", FiniteMean(name="loss"))

    def restore(self):
        """Weights, optimizer slots and RNG of the checkpoint resumed from; sets `start_step`."""
        if self.resume is None:
            return
        state = read_state(self.resume)
        check_architecture(self.model, self.resume, "--resume-from")
        self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(Path(self.resume) / MODEL_FILE)  # weights and optimizer slots, iterations included
        set_rng_state(self.model, state.get("rng"))
        self.start_step = state["step"]
        say(f"resumed from {self.resume} at step {self.start_step:,} (data window {state['data']['next_window']:,})")

    # ------------------------------------------------------------------ components
    def _open_reporting(self):
        o = self.cfg.output
        if self.upload_to is not None:
            bucket, prefix = self.upload_to
            self.uploader = cloud.Uploader(bucket, prefix, keep=o.save_total_limit, log=say)
            say(f"uploads: checkpoints, milestones, best_checkpoint and final_model go to {bucket.uri(prefix)} in "
                f"the background")
        self.sink = reporting.MetricsSink(self.out, o.tensorboard, o.wandb_project, o.wandb_run_name,
                                          self.cfg.to_dict(redact=True), wandb_entity=o.wandb_entity)

    def _close_reporting(self):
        if self.uploader is not None:
            say("uploads: waiting for the last uploads to finish")
            say(self.uploader.close(self.cfg.cloud.cloud_upload_wait))
        self.sink.close()
        # Drawn on every way out (done, interrupted, stopped on NaN): the curve so far.
        curve = reporting.plot_loss_curve(self.sink.path, self.out / reporting.LOSS_CURVE_FILE, title=str(self.out))
        if curve:
            say(f"loss curve: {curve}")

    def _checkpoint_manager(self):
        def write(name, state, **options):
            return save_checkpoint(self.model, self.tokenizer, self.cfg, self.out, name, state, self.write_extra,
                                   **options)

        config = CheckpointConfig.from_output(self.cfg.output, self.out, self.dist.is_chief, self.resume)
        return CheckpointManager(config, write, self.trainer_state, say, self.uploader,
                                 gather=lambda: self.dist.host_values(self.model))

    def _evaluator(self):
        val_ds = _with_workers(self.dist.process_batches(self.inputs.eval_dataset(self.plan.data.eval_batch_size)),
                               self.cfg.loader.num_workers)
        callbacks = _allocator_callbacks(self.plan.devices)

        def evaluate():
            return self.model.evaluate(val_ds, steps=self.plan.data.eval_batches, verbose=0, callbacks=callbacks,
                                       return_dict=True)["loss"]

        # A worse first evaluation after a resume must not replace the better best.
        best = read_state(self.resume).get("best") if self.resume is not None else None
        return Evaluator(evaluate, self.sink, say, enabled=self.cfg.output.eval, start_step=self.start_step,
                         best=best, on_best=self.checkpoints.save_best)

    def _save(self, step):
        """A regular checkpoint, and a mixture's realized shares so far beside it (log and metrics)."""
        path = self.checkpoints.save(step)
        shares = getattr(self.inputs, "mix_shares", lambda window: None)(step * self._sequences_per_step())
        if shares is not None and self.dist.is_chief:
            say(self.inputs.mix_report(step * self._sequences_per_step()))
            self.sink.write({"step": step, "mixture_records": shares[1],
                             **{f"mixture_share/{name}": share for name, share in shares[0].items()}})
        return path

    def _sequences_per_step(self):
        return self.micro * self.cfg.training.gradient_accumulation_steps

    def trainer_state(self, step):
        """What a checkpoint at `step` records beside the weights (trainer_state.json)."""
        t, s = self.cfg.training, self.plan.schedule
        sequences = self._sequences_per_step()
        return {
            "step": step,
            "tokens_seen": step * s.tokens_per_step,
            # Windows (sequences) drawn from the stream so far, micro-batches included.
            "data": self.inputs.state(step * sequences, t.seed),
            "sequences_per_step": sequences,
            "schedule": s.lr_schedule,  # a later resume continues this one
            "rng": rng_state(self.model),
            # The best validation so far, so a resumed run keeps a better best_checkpoint (local and in the bucket).
            **self.evaluator.state(),
        }

    def _clock_and_logger(self):
        o, t, s = self.cfg.output, self.cfg.training, self.plan.schedule
        intervals = (o.log_every, o.eval_every, o.save_every) + ((o.milestone_every,) if o.milestone_every else ())
        clock = cb.StepClock(s.total_steps, intervals, t.gradient_accumulation_steps, self.start_step)
        logger = cb.MetricsLogger(clock, o.log_every, s.tokens_per_step, self.schedule, self.sink, say,
                                  flops_per_token=self.plan.flops_per_token, peak=dict(self.plan.peak_flops or {}),
                                  skip_nonfinite=t.skip_nonfinite,
                                  moe_stats=(lambda: moe.read_stats(self.model)) if self.cfg.model.num_experts else None)
        return clock, logger

    # ------------------------------------------------------------------ train and finish
    def train_loop(self, clock, logger):
        """`fit` over the clock's segments, until the last step or a graceful stop."""
        o, t = self.cfg.output, self.cfg.training
        callbacks = [
            cb.StepCounter(clock),
            logger,
            cb.PeriodicEval(clock, o.eval_every, self.evaluator.validate),
            cb.PeriodicCheckpoint(clock, o.save_every, self._save),
            *([cb.PeriodicCheckpoint(clock, o.milestone_every, self.checkpoints.milestone)] if o.milestone_every else []),
            *_allocator_callbacks(self.plan.devices),
        ]
        total, accumulation = self.plan.schedule.total_steps, t.gradient_accumulation_steps
        say(f"training {total - self.start_step:,} steps, {self.start_step:,} -> {total:,} (Keras epochs of "
            f"{clock.epoch_steps} steps)")
        with interrupt.graceful_stop(clock, say):
            for first_step, epoch_steps, epochs in clock.segments():
                if clock.interrupted:
                    break
                # Each fit call reads the stream from exactly where the previous one stopped.
                start_window = first_step * self.micro * accumulation
                train_ds = _with_workers(
                    self.dist.process_batches(self.inputs.train_dataset(self.micro, t.seed, start_window=start_window)),
                    self.cfg.loader.num_workers,
                )
                self.model.fit(train_ds, epochs=epochs, steps_per_epoch=epoch_steps * accumulation,
                               callbacks=callbacks, verbose=0,
                               shuffle=False)  # the pipeline shuffles; Keras cannot shuffle a stream

    def finish(self, clock, logger, initial, wall):
        """After `fit`: the checkpoint of a stop, the error of a blow-up, or the final checkpoint and summary."""
        total = self.plan.schedule.total_steps
        if clock.interrupted and not clock.done:
            checkpoint = self.checkpoints.save(clock.step)
            say(f"stopped at step {clock.step:,} of {total:,}; the checkpoint is complete. Resume with the same flags "
                f"plus: --resume-from {checkpoint}")
            return 0
        if clock.nonfinite_after is not None:
            self._report_nonfinite(clock)
            return 3
        final = self.evaluator.validate(total)
        checkpoint = self._save(total)
        if self.checkpoints.milestone_due(total):
            self.checkpoints.milestone(total)
        samples = self._samples()
        if not self.dist.is_chief:
            return 0
        self.checkpoints.final(checkpoint)
        self._write_samples(samples)
        summary = reporting.RunSummary(self.plan, self.start_step, resumed=self.resume is not None,
                                       eval_enabled=self.cfg.output.eval)
        record = summary.record(wall, logger, initial, final, self.evaluator, checkpoint)
        reporting.RunSummary.write(record, self.out)
        say(reporting.RunSummary.line(record))
        return 0

    def _report_nonfinite(self, clock):
        skip = self.cfg.training.skip_nonfinite
        last = self.checkpoints.last_good()
        good = f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"
        print(
            f"error: the training loss or gradients became NaN or infinite after step {clock.nonfinite_after:,}"
            + (f" (more than --skip-nonfinite {skip} updates)" if skip else "")
            + f"; {good}. Lower --learning-rate, raise --warmup-steps or keep --grad-clip on, then --resume-from "
            f"that checkpoint with --allow-changed-config naming what you changed (--skip-nonfinite N steps over "
            f"rare bad batches)",
            file=sys.stderr,
        )

    def _samples(self):
        # Every process samples (its computations span all devices); process 0 writes.
        o, seed = self.cfg.output, self.cfg.training.seed
        if not o.sample_tokens:
            return []
        return sample_texts(self.model, self.tokenizer, SAMPLE_PROMPTS, o.sample_tokens, seed=seed)

    def _write_samples(self, samples):
        if not samples:
            return
        (self.out / "samples.txt").write_text("\n\n---\n\n".join(samples) + "\n")
        say("samples:")
        for text in samples:
            say("  " + text.replace("\n", "\n  "))


def _with_workers(dataset, num_workers):
    """`--num-workers N`: the input pipeline runs on a private pool of N threads."""
    if not num_workers:
        return dataset
    options = tf.data.Options()
    options.threading.private_threadpool_size = num_workers
    return dataset.with_options(options)


def _say_attention_path(model_cfg, devices):
    accel = backend_lib.accelerator(devices.devices)
    if not model_cfg.flash_attention:
        say("attention: plain kernel (--no-flash-attention)")
    elif accel is None:
        say("attention: plain kernel; flash attention needs a GPU or TPU and no CPU kernel exists")
    else:
        say(f"attention: flash kernel where {devices.backend} has one for this {accel}, else the plain kernel")
