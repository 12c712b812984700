"""Optimizer construction: AdamW without decay on norms, biases and embeddings."""

import keras


def no_decay_variables(model):
    """Norm scales, biases (all 1-D) and embedding tables are not decayed,
    as in GPT-2/LLaMA training code: decaying them pulls norms towards zero
    and rare tokens' embeddings towards the origin."""
    return [v for v in model.trainable_variables if len(v.shape) < 2 or "embedding" in v.path]


def build_optimizer(training_cfg, schedule, model):
    """The optimizer a run asks for, with schedule, clipping and accumulation.

    Gradient accumulation is Keras' own: the optimizer averages
    `gradient_accumulation_steps` micro-batch gradients, clips the average
    and applies it once, and its `iterations` (which drive the schedule)
    count applied updates only.
    """
    t = training_cfg
    common = dict(
        learning_rate=schedule,
        global_clipnorm=t.grad_clip or None,
        gradient_accumulation_steps=t.gradient_accumulation_steps if t.gradient_accumulation_steps > 1 else None,
    )
    if t.optimizer == "sgd":
        return keras.optimizers.SGD(momentum=0.9, **common)
    if t.optimizer == "adam":
        return keras.optimizers.Adam(beta_1=0.9, beta_2=0.95, epsilon=1e-8, **common)
    optimizer = keras.optimizers.AdamW(
        weight_decay=t.weight_decay, beta_1=0.9, beta_2=0.95, epsilon=1e-8, **common
    )
    optimizer.exclude_from_weight_decay(var_list=no_decay_variables(model))
    return optimizer
