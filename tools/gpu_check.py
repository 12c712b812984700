"""One-call GPU check: flash attention, bf16 against float32 training, and MFU.

Meant for a single short run on a real GPU (docs/benchmarks.md has one on an
NVIDIA H200); it prints its figures and a table at the end, and writes them
as JSON. Each backend runs in its own process (Keras picks its backend once
per process), one after the other so their timings do not share the GPU:

- matmul: an n x n x n product in bf16 and float32 (float32 at the
  backend's default precision, and on jax also at "highest"), the ceiling to
  read the MFU against.
- attention, jax and torch: `keras.ops.dot_product_attention` in bf16,
  causal, with `flash_attention=True` and `False`, forward and
  forward+backward (median of timed repeats after warm-up), each against a
  float64 numpy reference (relative error on batch 0, the first heads). What
  really ran is read off the program, not assumed: on jax, the cuDNN fused
  attention custom call in the lowered program (Keras falls back to XLA's
  plain kernel without raising when cuDNN refuses); on torch, the SDPA
  kernel in the profiler's trace (Keras' `flash_attention=False` lets SDPA
  pick, which may still be a fused kernel). Then the same for our
  `CausalSelfAttention` layer with `flash_attention=None` (auto, what a
  run uses) under mixed_bfloat16, forward and backward.
- training, jax: our `CausalLM` built as `training/trainer.py` builds it
  (`build_causal_lm`, `build_optimizer`, `TokenCrossEntropy`,
  `compile_options`), trained with `fit` on the same batches from the same
  seed in Keras mixed_bfloat16 and float32; tokens/s is the median of the
  timed windows after a warm-up window (compile), the loss is each window's
  mean. The fused attention calls in the model's forward+backward are
  counted from its lowered program.
- MFU = FLOPs/token (`training/plan.model_summary`, the run's own
  accounting) x tokens/s / the data-sheet peak of `training/mfu.PEAKS`
  (bf16 peak for mixed_bfloat16, float32 peak otherwise), and the same
  achieved rate over the measured matmul rate.

On a machine without a GPU the fused kernels do not exist: `flash_attention=
True` raises, and the script says so and times the plain kernel only. Use
`--small` there (tiny sizes) to check that the script runs.

Example:
    python tools/gpu_check.py --small                     # CPU: does it run
    python tools/gpu_check.py --json /tmp/gpu_check.json  # on the GPU: the real sizes
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# attention (batch, seq, heads, head_dim); model (ModelConfig fields); vocab, batch, matmul n;
# fit: steps per window and timed windows (one warm-up window more).
SIZES = {
    # `medium` (sizing.SIZE_PRESETS), 162M parameters with a 32,000 vocabulary, seq 1024.
    "full": dict(attention=(8, 2048, 16, 64), reference_heads=4,
                 model=dict(d_model=768, num_layers=12, num_heads=12, d_ff=3072, seq_len=1024),
                 vocab=32000, batch=16, matmul=8192, steps=10, windows=4),
    "small": dict(attention=(2, 128, 4, 32), reference_heads=2,
                  model=dict(d_model=64, num_layers=2, num_heads=4, d_ff=128, seq_len=64),
                  vocab=512, batch=4, matmul=256, steps=2, windows=2),
}
LEARNING_RATE = 3e-4
# cuDNN fused attention's custom-call targets in jax's lowered programs
# (jax/_src/cudnn/fused_attention_stablehlo.py); the backward one shares the prefix.
CUDNN_FMHA, CUDNN_FMHA_BACKWARD = "cudnn$fmha", "cudnn$fmhaSoftmaxBackward"


def _median_seconds(launch, sync, target=0.1, repeats=5):
    """Median seconds per call of `launch` over `repeats` timed loops, after a
    warm-up (compile, handles) and with the loop length chosen so a repeat
    takes about `target` seconds; also the spread (max / min - 1)."""
    sync(launch())
    start = time.perf_counter()
    sync(launch())
    once = max(time.perf_counter() - start, 1e-6)
    iters = max(1, min(200, int(target / once)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = launch()
        sync(out)
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times), max(times) / min(times) - 1


def _reference_attention(q, k, v, heads):
    """Causal softmax attention in float64 numpy for batch 0 and the first
    `heads` heads: `[seq, heads, head_dim]`."""
    import numpy as np

    q, k, v = (np.asarray(t[0, :, :heads], dtype=np.float64) for t in (q, k, v))
    seq, dim = q.shape[0], q.shape[-1]
    q, k, v = (t.transpose(1, 0, 2) for t in (q, k, v))  # [heads, seq, dim]: batched BLAS matmuls
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2)


def _rel_error(out, ref, heads):
    import numpy as np

    out = np.asarray(out[0, :, :heads], dtype=np.float64)
    if not np.isfinite(out).all():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _attention_flops(shape, backward):
    """Causal attention FLOPs, the masked half not credited (as FlashAttention
    reports): 2 matmuls forward, 5 more backward, each 2·B·H·S²·D / 2."""
    b, s, h, d = shape
    return (7 if backward else 2) * b * h * s * s * d


def _learnable_tokens(rows, length, vocab, seed=0):
    """Token rows where each token is its predecessor's fixed successor three
    times in four, else a Zipf draw: structure a model learns in a few dozen
    steps, so the two precisions' losses part if either computes wrongly."""
    import numpy as np

    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab)
    weights = 1.0 / np.arange(1, vocab + 1)
    draws = rng.choice(vocab, (rows, length), p=weights / weights.sum())
    follow = rng.random((rows, length)) < 0.75
    tokens = draws.copy()
    for t in range(1, length):
        tokens[:, t] = np.where(follow[:, t], successor[tokens[:, t - 1]], draws[:, t])
    return tokens.astype("int32")


def _matmul_rates(backend, n, products, sync):
    """{"n", label: {"tflops", "spread"}} for each (label, launch) that
    `products` yields, `launch()` being one n x n x n product."""
    rates = {"n": n}
    for label, launch in products:
        seconds, spread = _median_seconds(launch, sync)
        rates[label] = {"tflops": 2 * n**3 / seconds / 1e12, "spread": spread}
        print(f"[{backend}] matmul {n}^3 {label}: {rates[label]['tflops']:.1f} TFLOP/s", flush=True)
    return rates


def _time_attention(entry, shape, forward, forward_backward, sync):
    """Times `forward()` and `forward_backward()` into `entry`."""
    for label, fn, backward in (("forward", forward, False), ("forward_backward", forward_backward, True)):
        seconds, spread = _median_seconds(fn, sync)
        entry[label] = {"ms": seconds * 1e3, "tflops": _attention_flops(shape, backward) / seconds / 1e12,
                        "spread": spread}


def _attention_line(backend, flash, ran, entry):
    return (f"[{backend}] attention flash={flash}: {ran}; rel err {entry['rel_error_vs_float64']:.2e}, "
            f"fwd {entry['forward']['ms']:.3f} ms, fwd+bwd {entry['forward_backward']['ms']:.3f} ms")


def _layers_per_policy(keras, heads, head_dim):
    """Our attention layer as a run builds it (`flash_attention` None: auto),
    under mixed_bfloat16 then float32; the global policy goes back to float32."""
    from ultimate_trainer.models.attention import CausalSelfAttention

    for policy in ("mixed_bfloat16", "float32"):
        keras.mixed_precision.set_global_policy(policy)
        yield policy, CausalSelfAttention(num_heads=heads, head_dim=head_dim)
    keras.mixed_precision.set_global_policy("float32")


class _Results:
    """The worker's figures, rewritten to its JSON file after every section, so
    what finished survives a section that fails or a run cut off by a time limit."""

    def __init__(self, path, backend):
        self.path, self.data = path, {"backend": backend, "errors": {}}

    def set(self, key, value):
        self.data[key] = value
        self.save()

    def section(self, name, fn):
        print(f"[{self.data['backend']}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one failing check must not lose the others' figures
            import traceback

            traceback.print_exc()
            self.data["errors"][name] = f"{type(e).__name__}: {e}"[:500]
        print(f"[{self.data['backend']}] {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        self.save()

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=2, default=str)


# ---------------------------------------------------------------- jax worker


def _keras_flash_verdict_jax(b, s, h, d, dtype):
    """What Keras' auto rule (`flash_attention=None`) decides for q, k, v of
    this shape and dtype on jax, with cuDNN's reason when it says no."""
    import jax.numpy as jnp

    try:
        from keras.src.backend.jax.nn import _can_use_flash_attention
    except ImportError as e:  # a private helper: another Keras may not have it
        return f"unknown ({e})"
    q = jnp.zeros((b, s, h, d), dtype)
    try:
        _can_use_flash_attention(q, q, q, None, raise_error=True)
        return "flash"
    except Exception as e:
        return f"plain: {type(e).__name__}: {e}"[:200]



def _jax_worker(sizes, results):
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    device = jax.devices()[0]
    on_gpu = device.platform == "gpu"
    results.set("device", {"platform": device.platform, "kind": device.device_kind, "jax": jax.__version__,
                           "keras": keras.__version__,
                           "default_matmul_precision": str(jax.config.jax_default_matmul_precision)})
    print(f"[jax] device: {device.platform} {device.device_kind}; jax {jax.__version__}, keras {keras.__version__}",
          flush=True)
    sync = jax.block_until_ready

    def matmul():
        n = sizes["matmul"]
        keys = jax.random.split(jax.random.PRNGKey(1), 2)

        def products():
            for label, dtype, precision in (("bfloat16", jnp.bfloat16, None), ("float32", jnp.float32, None),
                                            ("float32_highest", jnp.float32, "highest")):
                a, b = (jax.random.normal(key, (n, n), jnp.float32).astype(dtype) for key in keys)
                product = jax.jit(lambda a, b, p=precision: jnp.dot(a, b, precision=p))
                yield label, lambda: product(a, b)

        results.set("matmul", _matmul_rates("jax", n, products(), sync))

    results.section("matmul", matmul)

    def attention():
        from keras import ops

        shape, heads = sizes["attention"], sizes["reference_heads"]
        keys = jax.random.split(jax.random.PRNGKey(2), 4)
        q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in keys)
        ref = _reference_attention(*(np.asarray(t.astype(jnp.float32)) for t in (q, k, v)), heads)
        out = {"shape": list(shape), "dtype": "bfloat16", "causal": True}
        for flash in (True, False):
            def forward(q, k, v, flash=flash):
                return ops.dot_product_attention(q, k, v, is_causal=True, flash_attention=flash)

            def loss(q, k, v, forward=forward):
                return jnp.sum(forward(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))

            entry = {}
            try:
                lowered = jax.jit(forward).lower(q, k, v).as_text()
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"[jax] attention flash={flash}: not run ({entry['error'][:200]})", flush=True)
                if not on_gpu:
                    print("[jax]   (no GPU here: the fused kernel exists only on a GPU or TPU)", flush=True)
                out[f"flash_{flash}"] = entry
                continue
            entry["fused_kernel"] = CUDNN_FMHA in lowered
            fwd = jax.jit(forward)
            fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            entry["rel_error_vs_float64"] = _rel_error(np.asarray(fwd(q, k, v).astype(jnp.float32)), ref, heads)
            _time_attention(entry, shape, lambda fwd=fwd: fwd(q, k, v), lambda f=fwd_bwd: f(q, k, v), sync)
            print(_attention_line("jax", flash, f"fused kernel {entry['fused_kernel']}", entry), flush=True)
            out[f"flash_{flash}"] = entry
        results.set("attention", out)

    results.section("attention", attention)

    def layer():
        b, s, h, d = sizes["attention"]
        found = {}
        for policy, attn in _layers_per_policy(keras, h, d):
            x = jax.random.normal(jax.random.PRNGKey(3), (b, s, h * d), jnp.float32)
            attn.build(x.shape)
            trainable = [var.value for var in attn.trainable_variables]

            def loss(trainable, x):
                y, _ = attn.stateless_call(trainable, [], x)
                return jnp.sum(y.astype(jnp.float32))

            text = jax.jit(jax.value_and_grad(loss)).lower(trainable, x).as_text()
            backward = text.count(CUDNN_FMHA_BACKWARD)
            found[policy] = {"forward_fused": text.count(CUDNN_FMHA) - backward, "backward_fused": backward,
                             "keras_verdict": _keras_flash_verdict_jax(b, s, h, d, attn.compute_dtype)}
            print(f"[jax] CausalSelfAttention (flash auto), {policy}: fused attention calls forward "
                  f"{found[policy]['forward_fused']}, backward {backward}; Keras' check for "
                  f"{attn.compute_dtype}: {found[policy]['keras_verdict']}", flush=True)
        results.set("layer", found)

    results.section("layer", layer)

    def train():
        from ultimate_trainer.backend import compile_options, tune_allocator
        from ultimate_trainer.config import ModelConfig, TrainingConfig
        from ultimate_trainer.models.causal_lm import build_causal_lm
        from ultimate_trainer.training import mfu
        from ultimate_trainer.training.losses import TokenCrossEntropy
        from ultimate_trainer.training.optimizers import build_optimizer
        from ultimate_trainer.training.plan import model_summary

        tune_allocator()  # as a real run does
        vocab, batch, steps, windows = sizes["vocab"], sizes["batch"], sizes["steps"], sizes["windows"]
        model_cfg = ModelConfig(**sizes["model"], dropout_rate=0.0)
        seq = model_cfg.seq_len
        _, params, flops = model_summary(model_cfg, vocab)
        tokens = _learnable_tokens(batch * steps, seq + 1, vocab)
        runs = {}
        results.set("train", {"model": dict(sizes["model"], vocab=vocab, batch=batch), "params": params,
                              "flops_per_token": flops, "steps_per_window": steps, "timed_windows": windows,
                              "runs": runs})
        for precision in ("bfloat16", "float32"):
            keras.backend.clear_session()
            keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
            keras.utils.set_random_seed(0)
            model = build_causal_lm(model_cfg, vocab)
            if model.count_params() != params["total"]:
                raise RuntimeError(f"built {model.count_params():,} parameters, plan says {params['total']:,}")
            first_weights = float(np.sum(np.asarray(model.trainable_variables[0].value, dtype=np.float64)))
            loss_fn = TokenCrossEntropy()
            trainable = [var.value for var in model.trainable_variables]
            non_trainable = [var.value for var in model.non_trainable_variables]

            def loss(trainable, x, y):
                logits, _ = model.stateless_call(trainable, non_trainable, x)
                return loss_fn(y, logits)

            text = jax.jit(jax.value_and_grad(loss)).lower(trainable, tokens[:batch, :-1], tokens[:batch, 1:]).as_text()
            backward = text.count(CUDNN_FMHA_BACKWARD)
            model.compile(optimizer=build_optimizer(TrainingConfig(learning_rate=LEARNING_RATE), LEARNING_RATE, model),
                          loss=TokenCrossEntropy(), **compile_options())
            times = []

            class Timer(keras.callbacks.Callback):
                def on_epoch_begin(self, epoch, logs=None):
                    self.start = time.perf_counter()

                def on_epoch_end(self, epoch, logs=None):
                    float(logs["loss"])  # waits for the window's last step
                    times.append(time.perf_counter() - self.start)

            history = model.fit(tokens[:, :-1], tokens[:, 1:], batch_size=batch, epochs=windows + 1,
                                steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[Timer()])
            rates = [steps * batch * seq / t for t in times[1:]]
            rate = statistics.median(rates)
            peak = mfu.table_peak(device.device_kind, precision == "bfloat16")
            runs[precision] = {
                "tokens_per_sec": rate, "windows_tokens_per_sec": rates, "warmup_window_s": times[0],
                "window_losses": [float(x) for x in history.history["loss"]],
                "achieved_tflops": rate * flops / 1e12,
                "peak_flops": peak, "mfu": mfu.mfu(flops, rate, peak) if peak else None,
                "forward_fused_attention": text.count(CUDNN_FMHA) - backward, "backward_fused_attention": backward,
                "first_weight_sum": first_weights,
            }
            run = runs[precision]
            shown_mfu = f"{100 * run['mfu']:.1f}%" if peak else "n/a (no data-sheet peak for this device)"
            print(f"[jax] train {precision}: {rate:,.0f} tok/s (windows "
                  f"{', '.join(f'{r:,.0f}' for r in rates)}; warm-up {times[0]:.1f} s), losses "
                  f"{', '.join(f'{x:.3f}' for x in run['window_losses'])}, MFU {shown_mfu}, fused attention "
                  f"fwd {run['forward_fused_attention']} bwd {backward}", flush=True)
            results.save()
        keras.mixed_precision.set_global_policy("float32")

    results.section("train", train)


# -------------------------------------------------------------- torch worker


def _sdpa_ops(profile):
    """The SDPA implementations a profile ran (aten op names) and its CUDA kernels
    that name an attention kernel."""
    ops_run, kernels = set(), set()
    for event in profile.events():
        name = event.name
        if name.startswith(("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
                            "aten::_cudnn_attention")):
            ops_run.add(name)
        device_type = str(getattr(event, "device_type", ""))
        if "CUDA" in device_type and any(word in name.lower() for word in ("flash", "fmha", "attention", "sdpa")):
            kernels.add(name[:120])
    return sorted(ops_run), sorted(kernels)


class _recording_keras_flash_verdicts:
    """Records what Keras' auto rule decides (`flash_attention=None` asks
    `_can_use_flash_attention`) while the block runs, as a list of booleans."""

    def __enter__(self):
        self.verdicts = []
        try:
            from keras.src.backend.torch import nn
        except ImportError:
            self.module = None
            return self.verdicts
        self.module, self.original = nn, nn._can_use_flash_attention

        def recording(*args, **kwargs):
            verdict = self.original(*args, **kwargs)
            self.verdicts.append(bool(verdict))
            return verdict

        nn._can_use_flash_attention = recording
        return self.verdicts

    def __exit__(self, *exc):
        if self.module is not None:
            self.module._can_use_flash_attention = self.original
        return False


def _torch_worker(sizes, results):
    import keras
    import numpy as np
    import torch
    from keras import ops

    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    name = torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu"
    results.set("device", {"platform": dev, "kind": name, "torch": torch.__version__, "keras": keras.__version__,
                           "allow_tf32": torch.backends.cuda.matmul.allow_tf32})
    print(f"[torch] device: {dev} {name}; torch {torch.__version__}, keras {keras.__version__}", flush=True)

    def sync(_):
        if on_gpu:
            torch.cuda.synchronize()

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])

    def matmul():
        n = sizes["matmul"]
        gen = torch.Generator(device=dev).manual_seed(1)

        def products():
            for label, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
                a, b = (torch.randn(n, n, device=dev, generator=gen).to(dtype) for _ in range(2))
                yield label, lambda: a @ b

        results.set("matmul", _matmul_rates("torch", n, products(), sync))

    results.section("matmul", matmul)

    def attention():
        shape, heads = sizes["attention"], sizes["reference_heads"]
        gen = torch.Generator(device=dev).manual_seed(2)
        q, k, v, g = (torch.randn(*shape, device=dev, generator=gen).to(torch.bfloat16) for _ in range(4))
        ref = _reference_attention(*(t.float().cpu().numpy() for t in (q, k, v)), heads)
        out = {"shape": list(shape), "dtype": "bfloat16", "causal": True}
        for flash in (True, False):
            entry = {}

            def forward(q=q, k=k, v=v, flash=flash):
                return ops.dot_product_attention(q, k, v, is_causal=True, flash_attention=flash)

            try:
                with torch.no_grad():
                    first = forward()
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"[:300]
                print(f"[torch] attention flash={flash}: not run ({entry['error'][:200]})", flush=True)
                if not on_gpu:
                    print("[torch]   (no GPU here: the flash kernel exists only on a GPU)", flush=True)
                out[f"flash_{flash}"] = entry
                continue
            entry["rel_error_vs_float64"] = _rel_error(first.float().cpu().numpy(), ref, heads)
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

            def forward_backward(flash=flash):
                y = ops.dot_product_attention(qg, kg, vg, is_causal=True, flash_attention=flash)
                y.backward(g)
                return y

            with torch.profiler.profile(activities=activities) as profile:
                forward_backward()
                sync(None)
            entry["sdpa_ops"], entry["kernels"] = _sdpa_ops(profile)

            def inference(forward=forward):
                with torch.no_grad():
                    return forward()

            _time_attention(entry, shape, inference, forward_backward, sync)
            print(_attention_line("torch", flash, ", ".join(entry["sdpa_ops"]) or "no SDPA op", entry), flush=True)
            out[f"flash_{flash}"] = entry
        results.set("attention", out)

    results.section("attention", attention)

    def layer():
        b, s, h, d = sizes["attention"]
        found = {}
        for policy, attn in _layers_per_policy(keras, h, d):
            x = torch.randn(b, s, h * d, device=dev)
            with _recording_keras_flash_verdicts() as verdicts:
                with torch.profiler.profile(activities=activities) as profile:
                    attn(x).float().sum().backward()
                    sync(None)
            sdpa_ops, kernels = _sdpa_ops(profile)
            found[policy] = {"sdpa_ops": sdpa_ops, "kernels": kernels, "keras_verdict": verdicts}
            print(f"[torch] CausalSelfAttention (flash auto), {policy}: Keras chose flash {verdicts}; ran "
                  f"{', '.join(sdpa_ops) or 'no SDPA op'}; kernels {', '.join(kernels) or '-'}", flush=True)
        results.set("layer", found)

    results.section("layer", layer)


# ------------------------------------------------------------- orchestrator


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _get(data, *keys):
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _short_ops(names):
    return ", ".join(n.replace("aten::_scaled_dot_product_", "").replace("aten::", "") for n in names) or "no SDPA op"


def summarize(found):
    """The closing table, from the workers' results ({backend: results})."""
    lines = []
    backends = list(found)
    jax_r, torch_r = found.get("jax", {}), found.get("torch", {})
    devices = "; ".join(f"{b}: {_get(r, 'device', 'kind')} ({_get(r, 'device', b)}, keras "
                        f"{_get(r, 'device', 'keras')})" for b, r in found.items())
    lines.append(f"device: {devices}")
    lines.append("")
    lines.append("| check | " + " | ".join(backends) + " |")
    lines.append("|---|" + "---|" * len(backends))

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(found[b]) for b in backends) + " |")

    n = next((_get(r, "matmul", "n") for r in found.values() if _get(r, "matmul", "n")), None)
    row(f"matmul {n}^3 bf16, TFLOP/s", lambda r: _fmt(_get(r, "matmul", "bfloat16", "tflops"), ".1f"))
    row(f"matmul {n}^3 float32 (default precision), TFLOP/s",
        lambda r: _fmt(_get(r, "matmul", "float32", "tflops"), ".1f"))
    row(f"matmul {n}^3 float32 (highest), TFLOP/s",
        lambda r: _fmt(_get(r, "matmul", "float32_highest", "tflops"), ".1f"))
    shape = next((_get(r, "attention", "shape") for r in found.values() if _get(r, "attention", "shape")), None)
    for flash in (True, False):
        key = f"flash_{flash}"

        def kernel(r, key=key):
            entry = _get(r, "attention", key)
            if entry is None:
                return "-"
            if "error" in entry:
                return "not run: " + entry["error"][:60]
            if "fused_kernel" in entry:
                return "cuDNN fused" if entry["fused_kernel"] else "plain (XLA)"
            return _short_ops(entry.get("sdpa_ops", []))

        row(f"attention flash={flash}: kernel that ran", kernel)
        row(f"attention flash={flash}: fwd ms (TFLOP/s)",
            lambda r, key=key: "-" if _get(r, "attention", key, "forward") is None else
            f"{_get(r, 'attention', key, 'forward', 'ms'):.3f} ({_get(r, 'attention', key, 'forward', 'tflops'):.1f})")
        row(f"attention flash={flash}: fwd+bwd ms (TFLOP/s)",
            lambda r, key=key: "-" if _get(r, "attention", key, "forward_backward") is None else
            f"{_get(r, 'attention', key, 'forward_backward', 'ms'):.3f} "
            f"({_get(r, 'attention', key, 'forward_backward', 'tflops'):.1f})")
        row(f"attention flash={flash}: rel err vs float64",
            lambda r, key=key: _fmt(_get(r, "attention", key, "rel_error_vs_float64"), ".2e"))

    def speedup(r, part):
        fast, slow = _get(r, "attention", "flash_True", part, "ms"), _get(r, "attention", "flash_False", part, "ms")
        return f"{slow / fast:.2f}x" if fast and slow else "-"

    row("attention speed-up flash / plain, fwd", lambda r: speedup(r, "forward"))
    row("attention speed-up flash / plain, fwd+bwd", lambda r: speedup(r, "forward_backward"))
    for policy in ("mixed_bfloat16", "float32"):
        def layer_path(r, policy=policy):
            entry = _get(r, "layer", policy)
            if entry is None:
                return "-"
            if "forward_fused" in entry:
                return (f"cuDNN fused calls fwd {entry['forward_fused']}, bwd {entry['backward_fused']} "
                        f"(Keras' check: {entry['keras_verdict'][:80]})")
            return f"Keras chose flash {entry['keras_verdict']}; ran {_short_ops(entry['sdpa_ops'])}"

        row(f"our CausalSelfAttention (flash auto), {policy}", layer_path)
    lines.append("")
    if shape:
        lines.append(f"attention shape (batch, seq, heads, head_dim) = {tuple(shape)}, bf16, causal; "
                     f"TFLOP/s credits half the scores (causal)")

    train = jax_r.get("train")
    if train and train.get("runs"):
        m = train["model"]
        lines.append("")
        lines.append(f"training (jax, fit): d_model {m['d_model']}, {m['num_layers']} layers, {m['num_heads']} heads, "
                     f"d_ff {m['d_ff']}, vocab {m['vocab']}, seq {m['seq_len']}, batch {m['batch']}; "
                     f"{train['params']['total']:,} parameters; {train['flops_per_token']:,} FLOPs/token; "
                     f"{train['steps_per_window']} steps x {train['timed_windows']} timed windows")
        lines.append("")
        lines.append("| precision | tok/s | achieved TFLOP/s | MFU (data-sheet peak) | of measured matmul | "
                     "loss per window | fused attention calls fwd/bwd |")
        lines.append("|---|---|---|---|---|---|---|")
        matmul = jax_r.get("matmul", {})
        for precision, r in train["runs"].items():
            measured = _get(matmul, "bfloat16" if precision == "bfloat16" else "float32", "tflops")
            of_matmul = f"{100 * r['achieved_tflops'] / measured:.0f}%" if measured else "-"
            peak = f" of {r['peak_flops'] / 1e12:.0f}" if r["peak_flops"] else ""
            lines.append(f"| {precision} | {r['tokens_per_sec']:,.0f} | {r['achieved_tflops']:.1f} | "
                         f"{_fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')}{peak} | {of_matmul} | "
                         f"{', '.join(f'{x:.3f}' for x in r['window_losses'])} | "
                         f"{r['forward_fused_attention']}/{r['backward_fused_attention']} |")
        bf16, fp32 = train["runs"].get("bfloat16"), train["runs"].get("float32")
        if bf16 and fp32:
            gap = max(abs(a - b) for a, b in zip(bf16["window_losses"], fp32["window_losses"]))
            lines.append("")
            lines.append(f"bf16 / float32 = {bf16['tokens_per_sec'] / fp32['tokens_per_sec']:.2f}x tokens/s; "
                         f"largest loss gap over the windows {gap:.4f} (last window {bf16['window_losses'][-1]:.3f} vs "
                         f"{fp32['window_losses'][-1]:.3f}); same initial weights: "
                         f"{bf16['first_weight_sum'] == fp32['first_weight_sum']}")
    errors = {f"{b}.{k}": v for b, r in found.items() for k, v in r.get("errors", {}).items()}
    for where, error in errors.items():
        lines.append(f"error in {where}: {error}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny sizes, to check on a CPU that the script runs")
    parser.add_argument("--backends", default="jax,torch",
                        help="comma-separated, run in this order: jax (matmul, attention, layer, training) and/or "
                             "torch (matmul, attention, layer)")
    parser.add_argument("--json", help="write all figures here (default: $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--worker-timeout", type=float, default=400,
                        help="seconds each backend's process may run before it is stopped; what it finished is kept")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SIZES["small" if args.small else "full"]
    if args.worker:
        results = _Results(args.result, args.worker)
        (_jax_worker if args.worker == "jax" else _torch_worker)(sizes, results)
        return 0

    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - {"jax", "torch"}
    if unknown or not backends:
        parser.error(f"--backends takes jax and/or torch, not {args.backends!r}")
    json_path = args.json or (os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") else None)
    found = {}
    for backend in backends:
        result_path = f"{json_path or '/tmp/gpu_check'}.{backend}.partial"
        if os.path.exists(result_path):
            os.remove(result_path)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, "--result", result_path]
        cmd += ["--small"] if args.small else []
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
        start = time.perf_counter()
        try:
            code = subprocess.run(cmd, env=env, timeout=args.worker_timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"stopped after {args.worker_timeout:.0f} s"
        print(f"{backend} worker: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if os.path.exists(result_path):
            with open(result_path) as f:
                found[backend] = json.load(f)
            os.remove(result_path)
        else:
            found[backend] = {"errors": {"worker": f"exit {code}, no results"}}
        if code != 0:
            found[backend].setdefault("errors", {})["worker"] = f"exit {code}"
    table = summarize(found)
    print("\n" + table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"sizes": "small" if args.small else "full", "results": found, "table": table}, f, indent=2)
        print(f"\nfigures written to {json_path}")
    return 0 if all(not r.get("errors") for r in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
