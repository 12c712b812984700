"""The run plan: model shape, parameter counts and step/token arithmetic.

Computed before any weight exists, from the closed-form formulas, so that
`--dry-run` shows exactly what a run will cost.
"""

import dataclasses
import math

from ultimate_trainer.config import ttt_kind
from ultimate_trainer.distribution import format_distribution
from ultimate_trainer.errors import UserError
from ultimate_trainer.models import sizing
from ultimate_trainer.models.lora import parse_targets


def eval_batches_for(val_windows, batch_size, limit=None, whole=False):
    """Validation batches; `whole`: full batches only (a batch split over several
    devices must fill them all), the last windows left out."""
    count = val_windows // batch_size if whole else math.ceil(val_windows / batch_size)
    return min(count, limit) if limit else count


def lora_targets(model_cfg):
    if not model_cfg.use_lora:
        return ()
    return parse_targets(model_cfg.lora_targets)


def model_summary(model_cfg, vocab_size):
    m = model_cfg
    counts = sizing.count_params(sizing.Architecture.from_model_config(m, vocab_size))
    moe_blocks = sizing.moe_block_indices(m.num_layers, m.num_experts, m.moe_every)
    ttt_blocks = sizing.ttt_block_indices(m.num_layers, ttt_kind(m), m.ttt_layers)
    architecture = {
        "preset": m.model_preset,
        "block_style": sizing.block_style(m.rope, m.rmsnorm, m.swiglu),
        "vocab_size": vocab_size,
        "seq_len": m.seq_len,
        "num_layers": m.num_layers,
        "d_model": m.d_model,
        "num_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads or m.num_heads,
        "head_dim": m.d_model // m.num_heads,
        "d_ff": m.d_ff,
        "mlp": "swiglu" if m.swiglu else m.activation,
        "norm": "rmsnorm" if m.rmsnorm else "layernorm",
        "positions": "rope" if m.rope else "learned",
        "tie_embeddings": m.tie_embeddings,
        "biases": m.use_bias,
        "dropout_rate": m.dropout_rate,
        "lora": {"rank": m.lora_rank, "alpha": m.lora_alpha or m.lora_rank, "targets": list(lora_targets(m))}
        if m.use_lora
        else None,
        "init_from": m.init_from,
        "ttt": {"kind": ttt_kind(m), "blocks": list(ttt_blocks), "mini_batch_size": m.ttt_mini_batch_size,
                "base_lr": m.ttt_base_lr, "use_gate": m.ttt_use_gate, "share_qk": m.ttt_share_qk,
                "backbone": m.ttt_backbone, "state_passing": m.state_passing}
        if ttt_blocks
        else None,
        "moe": {"num_experts": m.num_experts, "top_k": m.experts_top_k, "blocks": list(moe_blocks),
                "capacity_factor": m.capacity_factor or None, "router_aux_loss_coef": m.router_aux_loss_coef,
                "router_z_loss_coef": m.router_z_loss_coef}
        if moe_blocks
        else None,
    }
    params = {
        "total": counts.total,
        "non_embedding": counts.non_embedding,
        "embedding": counts.embedding,
        "trainable": counts.trainable,
        "active": counts.active,  # per token: MoE blocks count top_k of their experts
    }
    # FLOPs follow the parameters a token passes through, not the experts it skips.
    flops = sizing.flops_per_token(
        counts.active_non_embedding, vocab_size, m.d_model, m.num_layers, m.seq_len, ttt_layers=len(ttt_blocks),
        ttt_flops=sizing.ttt_flops_per_token(m.d_model, m.num_heads, ttt_kind(m), m.ttt_mini_batch_size)
        if ttt_blocks else 0,
    )
    return architecture, params, flops


def schedule_numbers(t, seq_len, micro_batch, windows_per_epoch, window):
    """The run length, warmup and end learning rate that `t` (a `TrainingConfig`)
    gives with `micro_batch` sequences per micro-batch over all devices, as a
    dict with the rule that set the length and notes on what was adjusted.

    Example:
        schedule_numbers(cfg.training, 256, 32, inputs.windows_per_epoch, inputs.window)["total_steps"]
    """
    sequences_per_step = micro_batch * t.gradient_accumulation_steps
    tokens_per_step = sequences_per_step * seq_len
    notes = []
    if t.max_steps:
        total_steps = t.max_steps
        rule = f"--max-steps {t.max_steps}"
    elif t.total_tokens:
        total_steps = max(1, t.total_tokens // tokens_per_step)
        rule = (
            f"--total-tokens {t.total_tokens:,} / ({micro_batch} batch x "
            f"{t.gradient_accumulation_steps} accumulation x {seq_len} seq_len) = {total_steps:,} steps"
        )
    else:
        steps_per_epoch = windows_per_epoch // sequences_per_step
        if steps_per_epoch == 0:
            raise UserError(
                f"the training data holds {windows_per_epoch} windows of {window} tokens, fewer than one "
                f"step of {sequences_per_step}; lower --batch-size, --gradient-accumulation-steps or "
                f"--seq-len, or add data"
            )
        total_steps = t.epochs * steps_per_epoch
        rule = (
            f"{t.epochs} epochs x {steps_per_epoch:,} steps ({windows_per_epoch:,} windows / "
            f"{sequences_per_step} sequences per step)"
        )
    warmup = t.warmup_steps
    if warmup >= total_steps:
        warmup = max(1, total_steps // 10)
        notes.append(
            f"--warmup-steps {t.warmup_steps} is not shorter than the run ({total_steps} steps); "
            f"warming up over {warmup} steps (10%) instead"
        )
    lr_end = t.lr_end if t.lr_end is not None else t.learning_rate / 10
    return {"total_steps": total_steps, "rule": rule, "warmup_steps": warmup, "lr_end": lr_end, "notes": notes}


@dataclasses.dataclass(frozen=True)
class Parameters:
    """Parameter counts from the closed-form formulas (`active`: per token; MoE blocks count top_k experts).

    Example:
        plan.parameters.total - plan.parameters.embedding   # the non-embedding count
    """

    total: int
    non_embedding: int
    embedding: int
    trainable: int
    active: int


@dataclasses.dataclass(frozen=True)
class DataPlan:
    """What the run reads: `described` is the inputs' own description (kind, source,
    record counts); counts are None for data a dry run cannot read here.

    Example:
        inputs.eval_dataset(plan.data.eval_batch_size)   # plan.data.eval_batches of them
    """

    described: dict
    tokenizer: dict
    train_tokens_per_epoch: int
    val_tokens: int
    window: int
    window_step: int
    windows_per_epoch: int
    val_windows: int
    eval_batches: int
    eval_batch_size: int

    def to_json(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "described"}
        return {**self.described, **fields}


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    """The run's length and learning-rate schedule; `lr_schedule` is what
    `schedules.WarmupCosine.from_config` builds from (a resume may continue another one).

    Example:
        WarmupCosine.from_config(plan.schedule.lr_schedule), plan.schedule.total_steps
    """

    rule: str
    total_steps: int
    steps_per_epoch: int
    epochs: float
    batch_size: int
    data_parallel: int
    global_batch_size: int
    gradient_accumulation_steps: int
    tokens_per_step: int
    total_tokens: int
    total_flops: float
    learning_rate: float
    lr_end: float
    warmup_steps: int
    optimizer: str
    lr_schedule: dict

    def to_json(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Devices:
    """The backend and devices this process sees; `allocator_kept`: `backend.tune_allocator`
    kept freed host memory (the run keeps that setting in force during `fit`).

    Example:
        Devices.from_described(backend.describe_devices(), allocator_kept=backend.tune_allocator())
    """

    backend: str
    backend_version: str
    keras_version: str
    devices: dict
    device_names: list
    allocator_kept: bool = False
    chosen_by: str = None

    @classmethod
    def from_described(cls, described, allocator_kept=False, chosen_by=None):
        """From `backend.describe_devices()`'s dict."""
        return cls(**described, allocator_kept=allocator_kept, chosen_by=chosen_by)

    def to_json(self):
        found = {"backend": self.backend, "backend_version": self.backend_version,
                 "keras_version": self.keras_version, "devices": self.devices, "device_names": self.device_names,
                 "host_allocator": ALLOCATOR_KEPT if self.allocator_kept else "as configured"}
        return found if self.chosen_by is None else {**found, "chosen_by": self.chosen_by}


ALLOCATOR_KEPT = "kept freed memory (glibc mallopt)"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run will do, built once after the devices are known.

    `to_json()` is what `--dry-run --json` prints. The model's `architecture`,
    `distribution`, `peak_flops`, `sizing` and `resume` are plain data (dicts).

    Example:
        plan = make_plan(cfg, tokenizer, inputs, devices=devices)
        plan.schedule.total_steps, plan.data.eval_batch_size, plan.to_json()["parameters"]["total"]
    """

    architecture: dict
    parameters: Parameters
    flops_per_token: float
    data: DataPlan
    schedule: SchedulePlan
    sizing: dict = None
    notes: tuple = ()
    distribution: dict = None
    devices: Devices = None
    peak_flops: dict = None
    resume: dict = None

    def resumed(self, resume, lr_schedule):
        """This plan continuing a checkpoint: `resume` describes it, `lr_schedule` is the schedule trained with."""
        schedule = dataclasses.replace(self.schedule, lr_schedule=lr_schedule)
        return dataclasses.replace(self, schedule=schedule, resume=resume)

    def to_json(self):
        found = {
            "architecture": self.architecture,
            "parameters": dataclasses.asdict(self.parameters),
            "flops_per_token": self.flops_per_token,
            "data": self.data.to_json(),
            "schedule": self.schedule.to_json(),
            "sizing": self.sizing,
            "notes": list(self.notes),
        }
        extra = {"distribution": self.distribution, "backend": self.devices and self.devices.to_json(),
                 "peak_flops": self.peak_flops, "resume": self.resume}
        return {**found, **{k: v for k, v in extra.items() if v is not None}}


def make_plan(cfg, tokenizer, inputs, data_parallel=1, distribution=None, devices=None, peak_flops=None, notes=()):
    """The run's `Plan`, from the resolved config and its data.

    `inputs` is a `data.inputs.StreamInputs` or `ShardInputs`, or for a dry run
    whose data cannot be read here an `UnreadInputs`, whose unknown counts stay
    None in the plan; `data_parallel` devices each take --batch-size sequences
    of every micro-batch. `distribution` (`Distribution.describe()`), `devices`
    (`Devices`), `peak_flops` and the device `notes` complete it.

    Example:
        make_plan(cfg, tokenizer, inputs).schedule.total_steps
    """
    m, t = cfg.model, cfg.training
    architecture, params, flops = model_summary(m, tokenizer.vocab_size)
    found = []
    data = _data_plan(cfg, tokenizer, inputs, data_parallel, found)
    if data.windows_per_epoch is None and not (t.max_steps or t.total_tokens):
        raise UserError(
            f"--dry-run: {inputs.source} cannot be read here, as {inputs.reason}, so the steps of --epochs "
            f"{t.epochs} are unknown; add --max-steps N or --total-tokens N to plan the run"
        )
    schedule = _schedule_plan(t, m.seq_len, data_parallel, inputs, flops, found)
    return Plan(architecture=architecture, parameters=Parameters(**params), flops_per_token=flops, data=data,
                schedule=schedule, sizing=_sizing(m, params["total"]),
                notes=tuple(found + _config_notes(cfg) + [n for n in notes if n]),
                distribution=distribution, devices=devices, peak_flops=peak_flops)


def _data_plan(cfg, tokenizer, inputs, data_parallel, notes):
    """The data part of the plan: validation batches that fill every device; adds its `notes`."""
    micro_batch = cfg.training.batch_size * data_parallel
    unread = inputs.windows_per_epoch is None
    val_windows = inputs.val_windows
    if val_windows == 0:
        raise UserError(
            f"the validation data holds {inputs.val_tokens} tokens, fewer than one window of {inputs.window}; "
            f"raise --val-fraction or --max-val-examples, or lower --seq-len"
        )
    eval_batch = micro_batch
    if data_parallel > 1 and not unread and val_windows < micro_batch:
        # A smaller validation batch that still fills every device equally.
        eval_batch = val_windows // data_parallel * data_parallel
        if eval_batch == 0 and cfg.output.eval:
            raise UserError(
                f"the validation data holds {val_windows} windows, fewer than the {data_parallel} data-parallel "
                f"devices; raise --val-fraction or --max-val-examples, or pass --no-eval"
            )
        notes.append(f"validation batches of {eval_batch} (the {val_windows} validation windows hold less than "
                     f"one training micro-batch of {micro_batch})")
    if unread:
        eval_batches = cfg.output.eval_steps  # None: the whole validation set, size unknown
        planned = tokenizer.describe().get("planned")
        notes.append(f"not read here: {inputs.source}, as {inputs.reason}; its token, record and window counts "
                     f"are unknown" + (f", and the tokenizer is {planned}" if planned else ""))
    else:
        eval_batches = eval_batches_for(val_windows, eval_batch, cfg.output.eval_steps, whole=data_parallel > 1) \
            if eval_batch else 0
    if getattr(inputs, "rows", None):
        per_row = "" if unread else f", {inputs.windows_per_row:,} windows per epoch"
        notes.append(
            f"--state-passing: each of the {inputs.rows} batch rows reads its own contiguous stream of the training "
            f"data{per_row}, in order (not shuffled); TTT states carry over between its windows and restart with "
            f"each epoch"
        )
    return DataPlan(described=inputs.describe(), tokenizer=tokenizer.describe(),
                    train_tokens_per_epoch=inputs.train_tokens, val_tokens=inputs.val_tokens, window=inputs.window,
                    window_step=inputs.step, windows_per_epoch=inputs.windows_per_epoch, val_windows=val_windows,
                    eval_batches=eval_batches, eval_batch_size=eval_batch)


def _schedule_plan(t, seq_len, data_parallel, inputs, flops, notes):
    """The schedule part of the plan (`t`: a `TrainingConfig`); adds its `notes`."""
    micro_batch = t.batch_size * data_parallel
    sequences_per_step = micro_batch * t.gradient_accumulation_steps
    tokens_per_step = sequences_per_step * seq_len
    windows_per_epoch = inputs.windows_per_epoch
    steps_per_epoch = None if windows_per_epoch is None else windows_per_epoch // sequences_per_step
    numbers = schedule_numbers(t, seq_len, micro_batch, windows_per_epoch, inputs.window)
    total_steps, warmup, lr_end = numbers["total_steps"], numbers["warmup_steps"], numbers["lr_end"]
    notes += numbers["notes"]
    return SchedulePlan(
        rule=numbers["rule"], total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        epochs=total_steps / steps_per_epoch if steps_per_epoch else None, batch_size=t.batch_size,
        data_parallel=data_parallel, global_batch_size=sequences_per_step,
        gradient_accumulation_steps=t.gradient_accumulation_steps, tokens_per_step=tokens_per_step,
        total_tokens=total_steps * tokens_per_step, total_flops=total_steps * tokens_per_step * flops,
        learning_rate=t.learning_rate, lr_end=lr_end, warmup_steps=warmup, optimizer=t.optimizer,
        lr_schedule={"peak": t.learning_rate, "end": lr_end, "warmup_steps": warmup, "total_steps": total_steps},
    )


def _config_notes(cfg):
    """Notes on flags that do less than a user may expect."""
    m, notes = cfg.model, []
    if m.use_lora and not m.init_from:
        notes.append("--use-lora without --init-from trains adapters on a randomly initialised base model")
    restated = [flag for key, flag in (("loader.use_streaming", "--use-streaming"),
                                       ("loader.tokenize_on_fly", "--tokenize-on-fly"))
                if key in cfg.explicit and getattr(cfg.loader, key.split(".")[1]) and not cfg.data.data_dir]
    if restated:
        notes.append(f"{' and '.join(restated)}: text sources are always streamed and tokenized while training; "
                     f"accepted as the guides write it, changes nothing")
    return notes


def _sizing(model_cfg, total):
    if model_cfg.target_params is None:
        return None
    return {
        "target_params": model_cfg.target_params,
        "prefer_depth": model_cfg.prefer_depth,
        "total_params": total,
        "deviation": total / model_cfg.target_params - 1,
        "aspect_ratio": model_cfg.d_model / model_cfg.num_layers,
    }


def format_plan(plan, layout_rules=False):
    """Human-readable lines for a `Plan` (`layout_rules`: also each rule of the layout map)."""
    plan = plan.to_json()
    a, p, d, s = plan["architecture"], plan["parameters"], plan["data"], plan["schedule"]
    if d["kind"] == "unread":
        data_line = (f"data: {d['source']}, not read here ({d['tokenizer']['kind']} tokenizer, vocab "
                     f"{d['tokenizer']['vocab_size']:,})")
    else:
        data_line = (f"data: {d['source']}; {d['train_records']:,} train / {d['val_records']:,} val records, "
                     f"{d['train_tokens_per_epoch']:,} train / {d['val_tokens']:,} val tokens "
                     f"({d['tokenizer']['kind']} tokenizer)")
    lines = [
        f"model: {a['block_style']} decoder"
        + (f" (preset {a['preset']})" if a["preset"] else "")
        + f", {a['num_layers']} layers, d_model {a['d_model']}, {a['num_heads']} heads"
        + (f" ({a['num_kv_heads']} kv)" if a["num_kv_heads"] != a["num_heads"] else "")
        + f" of {a['head_dim']}, d_ff {a['d_ff']} ({a['mlp']}), {a['norm']}, {a['positions']} positions, "
        + ("biases, " if a.get("biases") else "")
        + f"vocab {a['vocab_size']}, seq_len {a['seq_len']}"
        + (f"; TTT-{a['ttt']['kind'].capitalize()} in {len(a['ttt']['blocks'])} of {a['num_layers']} blocks "
           f"(mini-batch {a['ttt']['mini_batch_size']}, {a['ttt']['backbone']} backbone"
           f"{', state passing' if a['ttt']['state_passing'] else ''})" if a.get("ttt") else "")
        + (f"; MoE in {len(a['moe']['blocks'])} of {a['num_layers']} blocks: {a['moe']['num_experts']} experts of "
           f"d_ff {a['d_ff']}, top-{a['moe']['top_k']}, "
           + (f"capacity factor {a['moe']['capacity_factor']:g}" if a["moe"]["capacity_factor"] else "dropless")
           if a.get("moe") else ""),
        f"parameters: {p['total']:,} total, {p['non_embedding']:,} non-embedding, {p['trainable']:,} trainable"
        + (f" (LoRA rank {a['lora']['rank']} on {', '.join(a['lora']['targets'])}; the base is frozen)" if a["lora"] else "")
        + (f"; {p['active']:,} active per token ({p['active'] - p['embedding']:,} non-embedding)"
           if a.get("moe") else ""),
        data_line,
        f"steps: {s['rule']} -> {s['total_steps']:,} steps of {s['tokens_per_step']:,} tokens = "
        f"{s['total_tokens']:,} tokens, {s['total_flops'] / 1e12:,.1f} TFLOP "
        f"({plan['flops_per_token'] / 1e6:,.1f} MFLOP/token)",
        f"optimizer: {s['optimizer']}, lr {s['learning_rate']:g} -> {s['lr_end']:g} (cosine), "
        f"warmup {s['warmup_steps']} steps",
    ]
    if plan.get("sizing"):
        z = plan["sizing"]
        lines.insert(1, (
            f"sizing: --target-params {z['target_params']:,}{' --prefer-depth' if z['prefer_depth'] else ''} -> "
            f"d_model {a['d_model']}, {a['num_layers']} layers, {a['num_heads']} heads, d_ff {a['d_ff']}: "
            f"{z['total_params']:,} parameters ({100 * z['deviation']:+.2f}%), d_model/layers {z['aspect_ratio']:.0f}"
        ))
    if plan.get("distribution"):
        lines += format_distribution(plan["distribution"], rules=layout_rules)
    if plan.get("peak_flops"):
        peak = plan["peak_flops"]
        lines.append(
            f"MFU peak: {peak['total'] / 1e9:,.0f} GFLOP/s ({peak['source']})" if peak["total"] else f"MFU: {peak['source']}"
        )
    if plan.get("resume"):
        r = plan["resume"]
        lines.append(
            f"resume: {r['checkpoint']} at step {r['step']:,} (data window {r['data']['next_window']:,}, "
            f"epoch {r['data']['epoch']}); {s['total_steps'] - r['step']:,} steps to go"
        )
        if r.get("changed"):
            lines.append(f"resume: {r['changed']}")
    return lines + [f"note: {n}" for n in plan["notes"]]
