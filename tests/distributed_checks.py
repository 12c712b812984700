"""Checks that need several jax devices, run by tests/test_distribution.py in a
subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=4
(the flag must be set before jax starts). Prints one JSON object per check.

    python tests/distributed_checks.py layouts|layouts-fit|cli
"""

import contextlib
import io
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")


def _every_layer_model(**extra):
    """A model holding every weight type: attention, MLP, TTT-MLP with the
    share-QK convs, gate and Mamba-style pre-conv, MoE, carried TTT states."""
    from ultimate_trainer.models.causal_lm import CausalLM

    model = CausalLM(
        vocab_size=258, seq_len=16, d_model=32, num_layers=2, num_heads=4, d_ff=64,
        ttt={"kind": "mlp", "mini_batch_size": 8, "use_gate": True, "share_qk": True, "pre_conv": True},
        ttt_layers=[0], moe={"num_experts": 4, "top_k": 2}, moe_every=2, name="causal_lm", **extra,
    )
    model.build((None, 16))
    return model


def _fit_losses(model, x, y, steps):
    import keras

    model.compile(optimizer=keras.optimizers.AdamW(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return [float(model.train_on_batch(x, y)) for _ in range(steps)]


def layouts(fit=False):
    """fsdp on a 2x2 mesh: each weight's sharding, the replication check on a
    layout map with a rule taken out; with `fit`, also the losses of a model
    with every layer type against one device, and the optimizer slots'
    shardings."""
    import keras
    import numpy as np

    from ultimate_trainer import distribution as dl
    from ultimate_trainer.errors import UserError
    from ultimate_trainer.models import lora
    from ultimate_trainer.models.causal_lm import CausalLM

    tokens = np.random.default_rng(0).integers(0, 258, (4, 17)).astype("int32")
    x, y = tokens[:, :-1], tokens[:, 1:]
    out = {}

    if fit:
        keras.utils.set_random_seed(3)
        out["single_losses"] = _fit_losses(_every_layer_model(), x, y, 2)

    sizes = {"batch": 2, "model": 2}
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), keras.distribution.list_devices())
    layout_map = CausalLM.get_layout_map(mesh, fsdp=True)
    strategy = dl.keras_distribution("fsdp", mesh, layout_map, sizes)
    dist = dl.Distribution("fsdp", "jax", sizes, "test", strategy=strategy, layout_map=layout_map)
    keras.distribution.set_distribution(strategy)
    keras.utils.set_random_seed(3)
    model = _every_layer_model(state_passing_rows=4)
    report = dl.check_layouts(model, dist)
    out["report"] = {k: (len(v) if k != "adjusted" else v) for k, v in report.items()}
    # The specs of known weights, written out here rather than read from the map.
    spec = {v.path: tuple(v.value.sharding.spec) for v in model.variables}
    out["specs"] = {p: list(spec[p]) for p in (
        "causal_lm/block_1/attention/qkv/kernel", "causal_lm/block_1/attention/out/kernel",
        "causal_lm/block_0/mlp/gate_up/kernel", "causal_lm/block_0/mlp/down/kernel",
        "causal_lm/block_1/moe/experts_gate_up", "causal_lm/block_1/moe/experts_down",
        "causal_lm/block_1/moe/router/kernel", "causal_lm/block_0/ttt/w1", "causal_lm/block_0/ttt/w2",
        "causal_lm/block_0/ttt/b1", "causal_lm/block_0/ttt/q_proj/kernel", "causal_lm/block_0/ttt/o_proj/kernel",
        "causal_lm/block_0/ttt/conv_q/kernel", "causal_lm/block_0/pre_conv/conv/kernel",
        "causal_lm/token_embedding/embeddings", "causal_lm/token_embedding/reverse_embeddings",
        "causal_lm/carried_state_0_1", "causal_lm/final_norm/scale", "causal_lm/block_1/moe/stat_calls")}
    # Every weight against the map's rule fitted to its shape (fit_axes is unit-tested on its own).
    mismatched = []
    for v in model.variables:
        rule = layout_map[v.path]
        expected, _ = dl.fit_axes(tuple(rule.axes) if rule is not None else (), tuple(v.shape), sizes)
        actual = tuple(v.value.sharding.spec)
        while actual and actual[-1] is None:
            actual = actual[:-1]
        if actual != expected:
            mismatched.append([v.path, list(actual), list(expected)])
    out["mismatched"] = mismatched
    if fit:
        model.state_passing_rows = None  # train_on_batch without the carried-state path, as the single run
        out["sharded_losses"] = _fit_losses(model, x, y, 2)
        slots = [(v.path, tuple(v.value.sharding.spec), tuple(v._layout.axes)) for v in model.optimizer.variables
                 if v._layout is not None]
        out["slots_checked"] = len(slots)
        out["slots_mismatched"] = [s[0] for s in slots if dl._strip(s[1]) != dl._strip(s[2])]

    # LoRA adapters take their base kernel's axes.
    keras.utils.set_random_seed(3)
    dense = CausalLM(vocab_size=258, seq_len=16, d_model=32, num_layers=1, num_heads=4, d_ff=64, name="causal_lm")
    dense.build((None, 16))
    lora.enable_lora(dense, 4, targets=("qkv", "out", "up", "down"))
    lora_report = dl.check_layouts(dense, dist)
    out["lora_unmapped"] = len(lora_report["unmapped"])
    out["lora_specs"] = {v.path.split("/", 1)[1]: list(v.value.sharding.spec) for v in dense.variables
                         if "lora_kernel" in v.path and "block_0/attention" in v.path}

    # A layout map with the QKV rule taken out: reported, not accepted.
    broken = CausalLM.get_layout_map(mesh, fsdp=True)
    del broken[r".*/attention/qkv/kernel"]
    strategy = dl.keras_distribution("fsdp", mesh, broken, sizes)
    keras.distribution.set_distribution(strategy)
    incomplete = _every_layer_model()
    try:
        dl.check_layouts(incomplete, dl.Distribution("fsdp", "jax", sizes, "test", strategy=strategy,
                                                     layout_map=broken))
        out["incomplete_error"] = None
    except UserError as e:
        out["incomplete_error"] = str(e)
    print(json.dumps(out))


def cli():
    """Runs `main(argv)` for each case of argv on stdin (a JSON list of lists) in
    this one process and prints {"rc", "stdout", "stderr"} for each."""
    from ultimate_trainer.cli import main

    results = []
    for argv in json.loads(sys.stdin.read()):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(argv)
        results.append({"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()})
    print(json.dumps(results))


if __name__ == "__main__":
    {"layouts": layouts, "layouts-fit": lambda: layouts(fit=True), "cli": cli}[sys.argv[1]]()
