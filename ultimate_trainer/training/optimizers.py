"""Optimizer construction: AdamW without decay on norms, biases and embeddings,
Muon for the hidden weight matrices (`--optimizer muon`), plus the
per-update statistics the progress line shows (gradient norm, non-finite
updates) and `--skip-nonfinite`."""

import keras
from keras import ops

from ultimate_trainer import backend as backend_lib
from ultimate_trainer.models.moe import EXPERT_KERNELS


def no_decay_variables(model):
    """Norm scales, biases (all 1-D) and embedding tables are not decayed,
    as in GPT-2/LLaMA training code: decaying them pulls norms towards zero
    and rare tokens' embeddings towards the origin."""
    return [v for v in model.trainable_variables if len(v.shape) < 2 or "embedding" in v.path]


def _dense(gradient):
    """tensorflow gives an embedding's gradient as IndexedSlices, one row per
    lookup; keras ops square those rows without summing repeated ids first,
    which misstates the norm (Keras' own global-norm clip has this flaw)."""
    if type(gradient).__name__ == "IndexedSlices":
        # lazy: only tensorflow gives IndexedSlices, so only a tensorflow run gets here; the others never load it
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)
    return gradient


class UpdateStats:
    """Mixin for a Keras optimizer: gradient-norm statistics, a skip for
    non-finite updates, and a schedule that counts updates.

    - `grad_norm_sum` / `updates_seen` give the mean global gradient norm
      (after accumulation, before clipping) since the logger last reset them;
      the norm is computed once and also used for `global_clipnorm`.
    - `nonfinite_updates` counts updates whose gradients held NaN or inf.
      With `skip_nonfinite` on, such an update (or micro-batch) leaves every
      weight and slot as it was; only `iterations` moves on, so the
      accumulation phase and the schedule stay aligned with the data.
    - Keras evaluates a schedule at the micro-batch counter; with gradient
      accumulation that runs warmup and decay `accumulation` times too fast.
      Here the schedule sees the update count (`iterations`).

    The statistics are optimizer variables, so they live inside the compiled
    step on every backend and are read only when a line is logged.

    Example:
        opt = build_optimizer(cfg.training, schedule, model)
        model.compile(optimizer=opt, loss=...)
        model.fit(...)
        mean_norm = float(opt.grad_norm_sum) / max(float(opt.updates_seen), 1)
    """

    skip_nonfinite = False

    def build(self, variables):
        super().build(variables)
        self.grad_norm_sum = self.add_variable((), initializer="zeros", dtype="float32", name="grad_norm_sum")
        self.updates_seen = self.add_variable((), initializer="zeros", dtype="float32", name="updates_seen")
        self.nonfinite_updates = self.add_variable((), initializer="zeros", dtype="int32", name="nonfinite_updates")
        self._stats = [self.grad_norm_sum, self.updates_seen, self.nonfinite_updates]

    def _get_current_learning_rate(self):
        if isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    def _clip_gradients(self, grads):
        # Called once per update, on the (accumulated) gradients; under a
        # tensorflow MirroredStrategy on each replica's share, so the shares are summed first.
        grads, replicas = backend_lib.replica_summed_gradients(grads)
        norm = ops.sqrt(sum(ops.sum(ops.square(ops.cast(_dense(g), "float32"))) for g in grads if g is not None))
        finite = ops.isfinite(norm)
        self.grad_norm_sum.assign_add(ops.where(finite, norm, 0.0))
        self.updates_seen.assign_add(ops.cast(finite, "float32"))
        if not self.skip_nonfinite:
            self.nonfinite_updates.assign_add(1 - ops.cast(finite, "int32"))
        if self.global_clipnorm:
            scale = self.global_clipnorm / ops.maximum(norm, self.global_clipnorm) / replicas
            return [g if g is None else g * ops.cast(scale, g.dtype) for g in grads]
        if replicas > 1:  # Keras sums the replicas' gradients after this
            grads = [g if g is None else g / replicas for g in grads]
        return super()._clip_gradients(grads)

    def apply(self, grads, trainable_variables=None):
        if not self.skip_nonfinite:
            return super().apply(grads, trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        finite = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads if g is not None]))
        keep = [v for v in list(self._trainable_variables) + list(self.variables)
                if v is not self._iterations and all(v is not s for s in self._stats)]
        before = [ops.copy(v.value) for v in keep]  # a copy: torch assigns in place
        super().apply(grads, trainable_variables)
        for variable, old in zip(keep, before):
            variable.assign(ops.where(finite, variable.value, old))
        self.nonfinite_updates.assign_add(1 - ops.cast(finite, "int32"))

    def pop_grad_norm(self):
        """The mean gradient norm since the last call (None if no update), then resets it."""
        seen = float(ops.convert_to_numpy(self.updates_seen.value))
        mean = float(ops.convert_to_numpy(self.grad_norm_sum.value)) / seen if seen else None
        self.grad_norm_sum.assign(0.0)
        self.updates_seen.assign(0.0)
        return mean

    @property
    def nonfinite_count(self):
        return int(ops.convert_to_numpy(self.nonfinite_updates.value))


class FiniteMean(keras.metrics.Mean):
    """A mean that leaves out NaN and inf values: the loss tracker under
    `--skip-nonfinite`, so a skipped update does not poison the logged loss."""

    def update_state(self, values, sample_weight=None):
        finite = ops.isfinite(values)
        weight = ops.cast(finite, "float32")
        if sample_weight is not None:
            weight = weight * ops.cast(sample_weight, "float32")
        return super().update_state(ops.where(finite, values, ops.zeros_like(values)), weight)


class ExpertMatrices:
    """Mixin for `keras.optimizers.Muon`: MoE expert kernels are Muon matrices too.

    Keras' Muon sends every variable that is not 2-D to its AdamW branch, but
    an expert kernel `[experts, in, out]` (models/moe.py) is a stack of
    independent matrices, so it gets Muon's update per expert: the
    Newton-Schulz iteration already works on the last two axes, and the
    Moonlight scale `rms_rate * sqrt(max(in, out))` uses those two as well
    (Keras reads axes 0 and 1).
    """

    def _should_use_adamw(self, variable):
        if _is_expert_kernel(variable):
            return False
        return super()._should_use_adamw(variable)

    def lr_adjust(self, x):
        if self.rms_rate is None or len(x.shape) == 2:
            return super().lr_adjust(x)
        return x * ops.sqrt(ops.maximum(x.shape[-2], x.shape[-1])) * self.rms_rate


def _is_expert_kernel(variable):
    return len(variable.shape) == 3 and variable.path.rsplit("/", 1)[-1] in EXPERT_KERNELS


# Muon's authors keep the input embedding, the LM head and every 0/1-D weight
# on AdamW; Keras' Muon does so for 0/1-D weights and, with exclude_embeddings,
# for any path holding "embedding", which covers the token table, the learned
# positions and the LM head (ReversibleEmbedding's reverse_embeddings). The
# router is a classifier over experts, like the LM head over tokens, so it stays
# on AdamW as well.
MUON_EXCLUDE_LAYERS = ["/router/"]


_CLASSES = {}


def _with_update_stats(optimizer, skip_nonfinite):
    """Makes `optimizer` an `UpdateStats` of its own (backend) class.

    The class swap keeps the backend's implementation (torch maps AdamW to a
    fused one in `__new__`); serialization names the Keras class, so a saved
    model still loads where this package is not installed.
    """
    base = type(optimizer)
    if base not in _CLASSES:
        mixins = (UpdateStats, ExpertMatrices) if issubclass(base, keras.optimizers.Muon) else (UpdateStats,)
        _CLASSES[base] = type(base.__name__, (*mixins, base), {"__module__": base.__module__})
    optimizer.__class__ = _CLASSES[base]
    optimizer.skip_nonfinite = bool(skip_nonfinite)
    return optimizer


def build_optimizer(training_cfg, schedule, model):
    """The optimizer a run asks for, with schedule, clipping and accumulation.

    Gradient accumulation is Keras' own: the optimizer averages
    `gradient_accumulation_steps` micro-batch gradients, clips the average
    and applies it once; `UpdateStats` makes the schedule count updates.

    `muon` is Keras' Muon: the Muon update for 2-D hidden weights and expert
    kernels, its AdamW branch (same schedule, betas 0.9/0.95) for the rest
    (`MUON_EXCLUDE_LAYERS`); with Moonlight's update scale (rms_rate 0.2) both
    branches take the same learning rate and `--weight-decay`.
    """
    t = training_cfg
    common = dict(
        learning_rate=schedule,
        global_clipnorm=t.grad_clip or None,
        gradient_accumulation_steps=t.gradient_accumulation_steps if t.gradient_accumulation_steps > 1 else None,
    )
    if t.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(momentum=0.9, **common)
    elif t.optimizer == "muon":
        optimizer = keras.optimizers.Muon(
            adam_beta_1=0.9, adam_beta_2=0.95, epsilon=1e-8, weight_decay=t.weight_decay,
            adam_weight_decay=t.weight_decay, exclude_layers=MUON_EXCLUDE_LAYERS, exclude_embeddings=True, **common,
        )
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    elif t.optimizer == "adam":
        optimizer = keras.optimizers.Adam(beta_1=0.9, beta_2=0.95, epsilon=1e-8, **common)
    else:
        optimizer = keras.optimizers.AdamW(
            weight_decay=t.weight_decay, beta_1=0.9, beta_2=0.95, epsilon=1e-8, **common
        )
        optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    return _with_update_stats(optimizer, t.skip_nonfinite)
