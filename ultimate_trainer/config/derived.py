"""Values that follow from a resolved `RunSpec`, kept apart from it.

The spec holds what the user asked for; `Derived` holds what follows: the
TTT settings a Mamba-style backbone implies, the window stride, the batch
split for the data-parallel devices found, and the precision those devices
train in. `applied` makes the spec a run trains with (the one
`training_args.json` records and a resume compares) as a new object; the
user's spec is never changed.

Example:
    >>> from ultimate_trainer.config import resolve_config
    >>> spec = resolve_config({"model.model_preset": "nano", "training.global_batch_size": 64})
    >>> d = derive(spec, data_parallel=2)
    >>> d.batch.batch_size, d.batch.gradient_accumulation_steps, d.use_mixed_precision
    (32, 1, False)
    >>> applied(spec, d).training.gradient_accumulation_steps
    1
"""

import dataclasses

from ultimate_trainer.config.parsers import parse_device_batch_sizes
from ultimate_trainer.errors import UserError


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """Sequences per device per micro-batch, micro-batches per optimizer step,
    over `data_parallel` devices; `asked_global` is --global-batch-size (None:
    the split is --batch-size x --gradient-accumulation-steps as given).

    Example:
        >>> BatchSplit(16, 4, 2, 128).line
        'global batch 128 = 16 per device x 2 device(s) x 4 accumulation steps'
    """

    batch_size: int
    gradient_accumulation_steps: int
    data_parallel: int
    asked_global: int = None

    @property
    def global_batch(self):
        return self.batch_size * self.data_parallel * self.gradient_accumulation_steps

    @property
    def line(self):
        """How --global-batch-size was split, or None without it."""
        if not self.asked_global:
            return None
        return (f"global batch {self.asked_global} = {self.batch_size} per device x {self.data_parallel} device(s) x "
                f"{self.gradient_accumulation_steps} accumulation steps")


def batch_split(training_cfg, data_parallel):
    """The per-device batch and accumulation for `data_parallel` devices, as
    --global-batch-size and --device-batch-sizes ask (without them: as given).

    Example (the TTT recipes: global 256, `1:16,2:16,4:32,8:32`): 8 devices
    -> 32 x 1, 4 -> 32 x 2, 2 -> 16 x 8, 1 -> 16 x 16.
        >>> from ultimate_trainer.config import TrainingConfig
        >>> t = TrainingConfig(global_batch_size=256, device_batch_sizes="1:16,2:16,4:32,8:32")
        >>> s = batch_split(t, 4)
        >>> s.batch_size, s.gradient_accumulation_steps
        (32, 2)
    """
    t = training_cfg
    if not t.global_batch_size:
        return BatchSplit(t.batch_size, t.gradient_accumulation_steps, data_parallel)
    batch = t.batch_size
    if t.device_batch_sizes:
        table = parse_device_batch_sizes(t.device_batch_sizes)
        fitting = [d for d in table if d <= data_parallel]
        batch = table[max(fitting)] if fitting else table[min(table)]
    per_step = batch * data_parallel
    if t.global_batch_size % per_step:
        raise UserError(
            f"--global-batch-size {t.global_batch_size} is not a multiple of --batch-size {batch} x "
            f"{data_parallel} data-parallel device(s) = {per_step}; pick a global batch that is, or change --batch-size"
        )
    return BatchSplit(batch, t.global_batch_size // per_step, data_parallel, t.global_batch_size)


def trains_in_bfloat16(cfg, accel, bf16_missing):
    """Whether a run of `cfg` computes in bfloat16 on a device of kind `accel`
    ('gpu', 'tpu', or None for a CPU) whose bfloat16 support `bf16_missing`
    describes (None: it has it; else why not). The rule training applies:
    an explicit --use-mixed-precision / --no-use-mixed-precision (flag or
    YAML) wins, else bfloat16 on an accelerator, float32 on a CPU; where the
    device has no bfloat16 the trainer computes in float32 either way. `cost`
    prices a run with it.

    Example:
        >>> from ultimate_trainer.config import resolve_config
        >>> cfg = resolve_config({"model.model_preset": "nano"})
        >>> trains_in_bfloat16(cfg, "gpu", None), trains_in_bfloat16(cfg, None, None)
        (True, False)
    """
    if bf16_missing:
        return False
    if "optimization.use_mixed_precision" in cfg.explicit:
        return cfg.optimization.use_mixed_precision
    return accel is not None


@dataclasses.dataclass(frozen=True)
class Derived:
    """What follows from a spec and the devices it runs on.

    `ttt_share_qk` / `ttt_use_gate`: as given, or on for --ttt-backbone mamba
    (the paper's "(M)" blocks share Q/K and gate the output); `stride`: tokens
    from one window's start to the next (--stride, else --seq-len); `batch`:
    the `BatchSplit`; `use_mixed_precision`: the precision setting training
    applies (an explicit flag, else on for an accelerator).

    Example:
        >>> from ultimate_trainer.config import resolve_config
        >>> derive(resolve_config({"model.model_preset": "nano"}), accel="gpu").use_mixed_precision
        True
    """

    ttt_share_qk: bool
    ttt_use_gate: bool
    stride: int
    batch: BatchSplit
    use_mixed_precision: bool


def derive(spec, data_parallel=1, accel=None, bf16_missing=None):
    """The `Derived` values of `spec` on `data_parallel` devices of kind `accel`
    (None: a CPU) whose missing bfloat16 `bf16_missing` explains (None: has it).
    Before the devices are known, the defaults describe one CPU.

    Example:
        >>> from ultimate_trainer.config import resolve_config
        >>> d = derive(resolve_config({"model.ttt_layer_type": "linear", "model.ttt_backbone": "mamba"}))
        >>> d.ttt_share_qk, d.ttt_use_gate, d.stride
        (True, True, 256)
    """
    m = spec.model
    mamba = bool(m.ttt_layer_type) and m.ttt_backbone == "mamba"
    mixed = spec.optimization.use_mixed_precision
    if "optimization.use_mixed_precision" not in spec.explicit:  # given: kept (training falls back where it must)
        mixed = trains_in_bfloat16(spec, accel, bf16_missing)
    return Derived(
        ttt_share_qk=m.ttt_share_qk or mamba,
        ttt_use_gate=m.ttt_use_gate or mamba,
        stride=spec.loader.stride or m.seq_len,
        batch=batch_split(spec.training, data_parallel),
        use_mixed_precision=mixed,
    )


def applied(spec, derived):
    """A new spec: `spec` with the derived settings in place (the TTT
    implications, the batch split and the precision); what a run trains with,
    writes to training_args.json and compares on a resume. The stride stays
    as given (None means --seq-len), as checkpoints record it.

    Example:
        >>> from ultimate_trainer.config import resolve_config
        >>> spec = resolve_config({"model.model_preset": "nano"})
        >>> trained = applied(spec, derive(spec, accel="gpu"))
        >>> trained.optimization.use_mixed_precision, spec.optimization.use_mixed_precision
        (True, False)
    """
    return dataclasses.replace(
        spec,
        model=dataclasses.replace(spec.model, ttt_share_qk=derived.ttt_share_qk, ttt_use_gate=derived.ttt_use_gate),
        training=dataclasses.replace(spec.training, batch_size=derived.batch.batch_size,
                                     gradient_accumulation_steps=derived.batch.gradient_accumulation_steps),
        optimization=dataclasses.replace(spec.optimization, use_mixed_precision=derived.use_mixed_precision),
    )
