"""Finding the checkpoint a run resumes from and checking that it fits."""

import dataclasses
import json
import math
from pathlib import Path

from ultimate_trainer import config as config_lib
from ultimate_trainer.checkpoint import cloud
from ultimate_trainer.checkpoint.layout import MODEL_FILE, STATE_FILE, checkpoints_in, is_complete
from ultimate_trainer.checkpoint.store import CorruptCheckpoint, read_latest, verify_checkpoint
from ultimate_trainer.config.resume_settings import (  # noqa: F401  changeable_names: re-exported
    CHANGEABLE,
    FIXED_BECAUSE,
    changeable_names,
    parse_allowed,
    settings,
)
from ultimate_trainer.data.tokenizers import TOKENIZER_FILE
from ultimate_trainer.errors import UserError
from ultimate_trainer.training.plan import schedule_numbers

CLOUD_SCHEMES = ("s3://", "gs://", "az://", "https://")


def newest_valid(run_dir, what, log=print, preferred=None):
    """The newest checkpoint of `run_dir` that passes verification, trying
    `preferred` (the `latest` pointer's target) first; says which it skipped."""
    candidates = list(reversed(checkpoints_in(run_dir)))
    if preferred is not None:
        candidates = [preferred] + [c for c in candidates if c.resolve() != Path(preferred).resolve()]
    problems = []
    for checkpoint in candidates:
        try:
            verify_checkpoint(checkpoint, what)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"{what}: {len(problems)} checkpoint(s) failed verification ({problems[0]}); "
                f"falling back to {checkpoint}, the newest valid one")
        return checkpoint
    if problems:
        raise UserError(f"{what}: {run_dir} holds no valid checkpoint; the newest: {problems[0]}")
    raise UserError(f"{what}: {run_dir} holds no complete checkpoint-<step> directory")


REMOTE_CACHE_DIR = "remote-checkpoints"


def find_checkpoint(resume_from, output_dir, log=print, bucket_for=None):
    """Resolves `--resume-from` (a checkpoint dir, a run dir, or `latest` in
    `--output-dir`) to one verified checkpoint directory.

    `latest` follows the run's `latest` pointer and, when that checkpoint is
    missing or fails verification, falls back to the newest valid one, saying
    so; a run dir resumes from its newest valid checkpoint. A checkpoint
    named outright must verify: it is refused, not replaced. An `s3://`,
    `gs://`, `az://` or Azure `https://` URI is downloaded into
    `<output_dir>/remote-checkpoints/` first (`bucket_for(uri)` builds the
    bucket with the run's endpoint and credentials).

    Example:
        find_checkpoint("latest", "output_ultimate")   # .../checkpoint-1000
    """
    if str(resume_from).startswith(CLOUD_SCHEMES):
        bucket = bucket_for(resume_from) if bucket_for else None
        return cloud.fetch_for_resume(resume_from, Path(output_dir) / REMOTE_CACHE_DIR, bucket, log)
    if resume_from == "latest":
        pointer = read_latest(output_dir)
        if pointer is not None and not is_complete(pointer):
            log(f"--resume-from latest: {Path(output_dir) / 'latest'} names {pointer.name}, which is not a complete "
                f"checkpoint; looking for the newest valid one")
            pointer = None
        return newest_valid(output_dir, "--resume-from latest", log, preferred=pointer)
    path = Path(resume_from)
    if is_complete(path):
        verify_checkpoint(path, "--resume-from")
        return path
    if checkpoints_in(path):
        return newest_valid(path, f"--resume-from {resume_from}", log, preferred=read_latest(path))
    if not path.exists():
        raise UserError(f"--resume-from {resume_from}: no such directory")
    raise UserError(
        f"--resume-from {resume_from}: not a complete checkpoint (needs {MODEL_FILE} and {STATE_FILE}) "
        f"and holds no checkpoint-<step> directory"
    )


def read_state(checkpoint):
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


# ---------------------------------------------------------------- does this run continue the checkpoint's?
#
# A resume compares resolved values (the step count --epochs gives, the end LR
# a recipe's min_lr_ratio gives, the batch --global-batch-size gives, the model a preset
# gives), never what was typed. Which settings may change with
# --allow-changed-config is the config's table (config/resume_settings.py).


def _show(flag, value):
    if isinstance(value, bool):  # a --no-X flag is on when the setting is off
        return "on" if value != flag.startswith("--no-") else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "unset" if value is None else str(value)


@dataclasses.dataclass
class Difference:
    """A setting whose resolved value differs between the checkpoint and this run."""

    name: str
    flag: str
    kind: str
    theirs: str
    ours: str
    ours_flag: str = None  # this run sets it with another flag

    def text(self, first=False):
        ours = f"{self.ours_flag} {self.ours}" if self.ours_flag else self.ours
        return f"{self.flag} {self.theirs} (checkpoint) vs {ours} (this run)" if first else \
            f"{self.flag} {self.theirs} vs {ours}"

    def change(self):
        return f"{self.ours_flag or self.flag} {self.theirs} -> {self.ours}"


def saved_config(checkpoint):
    """The checkpoint's resolved `RunSpec`, read from its training_args.json; keys an
    older checkpoint lacks keep their defaults."""
    saved = json.loads((Path(checkpoint) / "training_args.json").read_text())
    spec = config_lib.RunSpec.from_dict(saved)
    ratio = saved.get("training", {}).get("min_lr_ratio")  # a field until issue 22, now a recipe alias of lr_end
    if ratio is not None and spec.training.lr_end is None:
        training = dataclasses.replace(spec.training, lr_end=ratio * spec.training.learning_rate)
        spec = dataclasses.replace(spec, training=training)
    return spec


def _sequences_per_step(saved, state):
    t = saved.training
    return state.get("sequences_per_step", t.batch_size * t.gradient_accumulation_steps)


def saved_schedule(saved, state):
    """The LR schedule the checkpoint's run used (a `WarmupCosine` config): recorded in
    its trainer_state.json, or, for older checkpoints, rebuilt from its settings."""
    if state.get("schedule"):
        return state["schedule"]
    t, seq_len = saved.training, saved.model.seq_len
    micro = _sequences_per_step(saved, state) // t.gradient_accumulation_steps
    n = schedule_numbers(t, seq_len, micro, state["data"]["windows_per_epoch"], seq_len + 1)
    return {"peak": t.learning_rate, "end": n["lr_end"], "warmup_steps": n["warmup_steps"], "total_steps": n["total_steps"]}


def _length_flag(t):
    return "--max-steps" if t.max_steps else "--total-tokens" if t.total_tokens else "--epochs"


def _length(t, steps):
    if t.max_steps:
        return str(steps)
    return f"{t.total_tokens if t.total_tokens else t.epochs} = {steps} steps"


def _same(a, b):
    """Equal, floats up to rounding (a recipe's min_lr_ratio 0.1 of 3e-4 is --lr-end 3e-5)."""
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _follows(name, old, new, saved, cfg):
    """Whether a changed end LR or warmup only follows another reported change: the
    default end is a fraction of the peak, and a run shorter than --warmup-steps
    warms up over 10% of its length."""
    if name == "lr_end":
        return _same(old["end"] / old["peak"], new["end"] / new["peak"])
    if name == "warmup":
        return old["total_steps"] != new["total_steps"] and saved.training.warmup_steps == cfg.training.warmup_steps
    return False


def _tokenizer_text(meta):
    return f"{meta.get('kind')} of {meta.get('vocab_size')} ids, fingerprint {meta.get('fingerprint')}"


def differences(cfg, checkpoint, state, inputs, plan, tokenizer):
    """Every resolved setting in which this run (`cfg`, its `plan`, `inputs` and
    `tokenizer`) differs from the checkpoint's, as `Difference`s in message order."""
    saved = saved_config(checkpoint)
    old, new = saved_schedule(saved, state), plan.schedule.lr_schedule
    found = []
    for s in settings():
        if s.kind == "schedule":
            theirs, ours = old[s.key], new[s.key]
            if _same(theirs, ours) or _follows(s.name, old, new, saved, cfg):
                continue
            if s.name == "max_steps":
                a, b = _length_flag(saved.training), _length_flag(cfg.training)
                found.append(Difference(s.name, a, s.kind, _length(saved.training, theirs),
                                        _length(cfg.training, ours), None if a == b else b))
            else:
                found.append(Difference(s.name, s.flag, s.kind, _show(s.flag, theirs), _show(s.flag, ours)))
        elif not _same(s.read(saved), s.read(cfg)):
            found.append(Difference(s.name, s.flag, s.kind, _show(s.flag, s.read(saved)), _show(s.flag, s.read(cfg))))
    theirs, ours = _sequences_per_step(saved, state), plan.schedule.global_batch_size
    if theirs != ours and not {"batch_size", "gradient_accumulation_steps"} & {d.name for d in found}:
        found.append(Difference("sequences_per_step", "sequences per step", "data", str(theirs),
                                f"{ours} (--batch-size per device x data-parallel devices x accumulation)"))
    data = state.get("data", {})
    windowing = {"seq_len", "stride", "state_passing", "batch_size"} & {d.name for d in found}  # explain the data's change
    if not windowing and (data.get("kind"), data.get("windows_per_epoch")) != (inputs.kind, inputs.windows_per_epoch):
        found.append(Difference("data", "data", "data", f"{data.get('kind')} of {data.get('windows_per_epoch')} windows "
                                f"per epoch", f"{inputs.kind} of {inputs.windows_per_epoch}"))
    path = Path(checkpoint) / TOKENIZER_FILE
    if path.is_file():
        meta, mine = json.loads(path.read_text()), tokenizer.describe()
        keys = [k for k in ("kind", "vocab_size", "fingerprint") if meta.get(k) is not None]
        if any(meta[k] != mine.get(k) for k in keys):
            found.append(Difference("tokenizer", "tokenizer", "model", _tokenizer_text(meta), _tokenizer_text(mine)))
    return found


def check_resumable(cfg, checkpoint, state, inputs, plan, tokenizer):
    """Refuses a resume that would not continue the checkpoint's run, in one line
    naming every differing setting with both values; returns what the run does
    instead: {"lr_schedule": the schedule config to train with, "changes": the
    differences --allow-changed-config allowed, "changed": a line saying what
    they do, or None}. With --eval-only only the model and tokenizer must match.

    A changed schedule continues from the LR the checkpoint's schedule had at
    its step (`schedules.WarmupCosine`'s `from_step`), so the LR does not jump.

    Example:
        resumed = check_resumable(cfg, "out/checkpoint-100", read_state(...), inputs, plan, tokenizer)
        plan = plan.resumed({"checkpoint": "out/checkpoint-100", ...}, resumed["lr_schedule"])
    """
    allowed = parse_allowed(cfg.output.allow_changed_config)
    found = differences(cfg, checkpoint, state, inputs, plan, tokenizer)
    if cfg.run.eval_only:
        found = [d for d in found if d.kind == "model"]
    refused = [d for d in found if d.name not in allowed]
    if refused:
        fixed = [d for d in refused if d.kind not in CHANGEABLE]
        missing = [d.name for d in refused if d.kind in CHANGEABLE]
        ways = []
        if fixed:
            why = " and ".join(dict.fromkeys(FIXED_BECAUSE[d.kind] for d in fixed))
            fresh = (f", or start a new run from its weights with --init-from {checkpoint}"
                     if any(d.kind != "model" for d in fixed) else "")
            if any(d.name == "tokenizer" for d in fixed):
                fresh += f" (--tokenizer-path {checkpoint} uses its tokenizer)"
            ways.append(f"{', '.join(d.flag for d in fixed)} cannot change on a resume, the checkpoint's {why} would "
                        f"not fit: resume with its values{fresh}")
        if missing:
            smooth = any(d.kind == "schedule" for d in refused)
            ways.append(f"{'to change the rest' if fixed else 'resume with its values, or to change them'} on purpose "
                        f"add --allow-changed-config {','.join(missing)}"
                        + (" (the learning rate then continues from the checkpoint's, without a jump)" if smooth else ""))
        raise UserError(
            f"--resume-from {checkpoint}: this run differs from the checkpoint's: "
            + ", ".join(d.text(first=i == 0) for i, d in enumerate(refused)) + "; " + "; ".join(ways)
        )
    schedule = saved_schedule(saved_config(checkpoint), state)
    if cfg.run.eval_only:
        return {"lr_schedule": schedule, "changes": [], "changed": None}
    parts = [d.change() for d in found]
    if any(d.kind == "schedule" for d in found):
        schedule, line = _continued(schedule, state["step"], plan.schedule.lr_schedule, checkpoint)
        parts.append(line)
    idle = sorted(allowed - {d.name for d in found})
    if idle:
        parts.append(f"{', '.join(idle)} as in the checkpoint")
    changed = f"--allow-changed-config {cfg.output.allow_changed_config}: " + "; ".join(parts) if allowed else None
    return {"lr_schedule": schedule, "changes": [dataclasses.asdict(d) for d in found], "changed": changed}


def _continued(old, step, new, checkpoint):
    """`new` (a schedule config), continued from the LR `old` has at `step`, and a line saying how."""
    from ultimate_trainer.training.schedules import continued  # heavy: imports keras, and config reads this module first

    if new["total_steps"] <= step:
        raise UserError(
            f"--resume-from {checkpoint} is at step {step:,}, and this run ends at step {new['total_steps']:,}; "
            f"give a run length beyond step {step:,}"
        )
    schedule = continued(old, step, new)
    lr, top = schedule["from_lr"], new["warmup_steps"] - 1
    end, total = f"{new['end']:g}", f"{new['total_steps']:,}"
    if step < top:
        how = f"rises to {new['peak']:g} at step {top:,} (the rest of the warmup), then decays by cosine to {end} at step {total}"
    elif math.isclose(new["end"], lr, rel_tol=1e-6):
        how = f"stays there to step {total} (warmup done)"
    else:
        how = f"{'decays' if new['end'] < lr else 'rises'} by cosine to {end} at step {total} (warmup done)"
    return schedule, (f"the learning rate continues from {lr:.4g} (the checkpoint's schedule at step {step:,}) and "
                      f"{how}")
