"""Which settings a resume may change: the names --allow-changed-config takes.

A resume compares resolved values (the step count --epochs gives, the end LR
a recipe's min_lr_ratio gives, the batch --global-batch-size gives, the model a preset
gives), never what was typed. Settings of the kinds in `CHANGEABLE` may
change with --allow-changed-config; the others cannot, and `FIXED_BECAUSE`
says why. `checkpoint/resume.py` compares a checkpoint's settings with
this table; validation checks the names given.

Example:
    >>> sorted(parse_allowed("lr,--max-steps,total-tokens"))
    ['lr', 'max_steps']
"""

import dataclasses

from ultimate_trainer.config.parsers import ttt_kind
from ultimate_trainer.config.schema import ModelConfig, flag_name
from ultimate_trainer.errors import UserError

CHANGEABLE = ("schedule", "training")
FIXED_BECAUSE = {"data": "data stream", "model": "weights", "optimizer": "optimizer state"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One compared setting: `name` (its --allow-changed-config name, with
    `aliases`), the `flag` named in messages, its `kind` and how to read it:
    `schedule` settings from a schedule config (`key`), others from a `Config`
    (`read`)."""

    name: str
    flag: str
    kind: str
    read: object = None
    key: str = None
    aliases: tuple = ()


def _t(name):
    return lambda c: getattr(c.training, name)


def _m(name):
    return lambda c: getattr(c.model, name)


# Model fields that are inputs to others (a preset, a size) or change no weight and no math.
_MODEL_FREE = {"model_preset", "target_params", "prefer_depth", "flash_attention", "init_from", "lora_rank",
               "lora_alpha", "lora_targets"}
# Model fields compared as the other kinds below, or resolved first.
_MODEL_ELSEWHERE = {"seq_len", "state_passing", "dropout_rate", "router_aux_loss_coef", "router_z_loss_coef",
                    "num_kv_heads", "activation", "ttt_layer_type"}


def settings():
    yield Setting("max_steps", "--max-steps", "schedule", key="total_steps", aliases=("total_tokens", "epochs"))
    yield Setting("lr", "--learning-rate", "schedule", key="peak", aliases=("learning_rate",))
    yield Setting("lr_end", "--lr-end", "schedule", key="end", aliases=("min_lr_ratio",))
    yield Setting("warmup", "--warmup-steps", "schedule", key="warmup_steps", aliases=("warmup_steps",))
    yield Setting("weight_decay", "--weight-decay", "training", _t("weight_decay"))
    yield Setting("grad_clip", "--grad-clip", "training", _t("grad_clip"))
    yield Setting("precision", "--use-mixed-precision", "training",
                  lambda c: "bfloat16" if c.optimization.use_mixed_precision else "float32",
                  aliases=("use_mixed_precision", "mixed_precision"))
    yield Setting("dropout", "--dropout-rate", "training", _m("dropout_rate"), aliases=("dropout_rate",))
    yield Setting("aux_loss", "--router-aux-loss-coef", "training", _m("router_aux_loss_coef"),
                  aliases=("router_aux_loss_coef",))
    yield Setting("z_loss", "--router-z-loss-coef", "training", _m("router_z_loss_coef"),
                  aliases=("router_z_loss_coef",))
    yield Setting("optimizer", "--optimizer", "optimizer", _t("optimizer"))
    for name in ("batch_size", "gradient_accumulation_steps", "seed"):
        yield Setting(name, "--" + name.replace("_", "-"), "data", _t(name))
    yield Setting("seq_len", "--seq-len", "data", _m("seq_len"))
    yield Setting("stride", "--stride", "data", lambda c: c.loader.stride)
    yield Setting("shuffle_buffer_size", "--shuffle-buffer-size", "data", lambda c: c.loader.shuffle_buffer_size)
    yield Setting("state_passing", "--state-passing", "data", _m("state_passing"))
    yield Setting("num_kv_heads", "--num-kv-heads", "model", lambda c: c.model.num_kv_heads or c.model.num_heads)
    yield Setting("activation", "--activation", "model", lambda c: None if c.model.swiglu else c.model.activation)
    yield Setting("ttt_layer_type", "--ttt-layer-type", "model", lambda c: ttt_kind(c.model))
    for f in dataclasses.fields(ModelConfig):
        if f.name not in _MODEL_FREE | _MODEL_ELSEWHERE:
            yield Setting(f.name, flag_name(f), "model", _m(f.name))


def _names():
    """{accepted spelling: name} of the changeable settings, and {spelling: setting} of the fixed ones."""
    changeable, fixed = {}, {}
    for s in settings():
        spellings = {s.name, s.flag.lstrip("-").replace("-", "_"), *s.aliases}
        for word in spellings:
            (changeable if s.kind in CHANGEABLE else fixed)[word] = s.name if s.kind in CHANGEABLE else s
    return changeable, fixed


def changeable_names():
    """The names --allow-changed-config takes, in order.

    Example:
        >>> changeable_names()[:3]
        ['max_steps', 'lr', 'lr_end']
    """
    return [s.name for s in settings() if s.kind in CHANGEABLE]


def parse_allowed(text):
    """The settings `--allow-changed-config TEXT` lets differ, as canonical names;
    `UserError` for a name it does not know or a setting that cannot change.

    Example:
        >>> sorted(parse_allowed("lr,--max-steps,total-tokens"))
        ['lr', 'max_steps']
    """
    if text is None:
        return frozenset()
    changeable, fixed = _names()
    valid = ", ".join(changeable_names())
    allowed = set()
    for raw in str(text).split(","):
        word = raw.strip().lstrip("-").replace("-", "_").lower()
        if word in changeable:
            allowed.add(changeable[word])
        elif word in fixed:
            s = fixed[word]
            raise UserError(
                f"--allow-changed-config {raw.strip()}: {s.flag} cannot change on a resume, the checkpoint's "
                f"{FIXED_BECAUSE[s.kind]} would not fit; resume with its value"
                + ("" if s.kind == "model" else ", or start a new run from its weights with --init-from")
                + f". Names that can change: {valid}"
            )
        else:
            raise UserError(
                f"--allow-changed-config {raw.strip()!r}: not a setting it knows; give comma-separated names "
                f"from: {valid} (flag names such as learning-rate also work)"
            )
    return frozenset(allowed)
