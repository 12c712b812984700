"""Backend selection and device discovery.

`select_backend` must run before anything imports keras; it is the only
place that sets KERAS_BACKEND. `describe_devices` is the one place that asks
each backend's own runtime what it sees.
"""

import collections
import contextlib
import ctypes
import functools
import glob
import importlib.util
import os
import sys
import tempfile

from ultimate_trainer.config.parsers import cluster_settings
from ultimate_trainer.errors import UserError

BACKENDS = ("jax", "torch", "tensorflow")


# Training throughput of our `small` model (66.7M parameters, `fit`) per backend and
# precision, measured with tools/bench_train.py; docs/benchmarks.md has the run. `auto`
# picks the fastest backend from the row of the device kind found and the precision
# asked for. Accelerators we have not measured follow the usual finding (XLA is
# strongest there): jax first.
MEASURED_TOKENS_PER_SEC = {
    # 2-core AMD EPYC (AVX512-BF16), 2026-11-22 09:20: tools/bench_train.py --precisions
    # float32,bfloat16, the CLI end to end on `small` (what a run gets). In bfloat16 torch and
    # tensorflow trade places between runs (626 vs 573 here, 555 vs 628 in the run before).
    ("cpu", "float32"): {"tensorflow": 413.0, "torch": 310.0, "jax": 302.0},
    ("cpu", "bfloat16"): {"torch": 626.0, "tensorflow": 573.0, "jax": 321.0},
}
ACCELERATOR_ORDER = {"tpu": ("jax",), "gpu": ("jax", "torch", "tensorflow")}

_choice = {}


def detect_device_kind(environ=None):
    """'tpu', 'gpu' or 'cpu', found without importing any framework (the
    backend must be chosen before one loads): TPU runtimes and device files,
    NVIDIA/AMD GPU device files, respecting an empty CUDA_VISIBLE_DEVICES.

    Example:
        >>> detect_device_kind({"TPU_ACCELERATOR_TYPE": "v5e-8"})
        'tpu'
    """
    environ = os.environ if environ is None else environ
    tpu_variables = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "COLAB_TPU_ADDR")
    if any(environ.get(k) for k in tpu_variables) or glob.glob("/dev/accel[0-9]*"):
        return "tpu"
    if environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return "cpu"
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        return "gpu"
    return "cpu"


def needs_jax(cfg):
    """The flag that asks for a jax-only feature (keras.distribution's weight
    sharding, several processes), or None. Data parallelism is not one:
    tensorflow runs it too (MirroredStrategy), torch refuses it with a message."""
    if cfg is None:
        return None
    d = cfg.distribution
    if d.distribution in ("fsdp", "model"):
        return f"--distribution {d.distribution}"
    if d.coordinator_address or (d.num_processes or 1) > 1:
        return "a multi-process run (--coordinator-address / --num-processes)"
    if cluster_settings(d):
        return "a multi-process run (KERAS_DISTRIBUTION_* variables)"
    return None


def torch_cannot(cfg):
    """The flag that torch cannot run (Keras distributes on jax and tensorflow
    only; `distribution._setup_torch` refuses it), or None."""
    # --mesh alone is refused by the config, and fsdp/model go to jax (`needs_jax`).
    if cfg is not None and cfg.distribution.distribution == "data":
        return "--distribution data"
    return None


def auto_backend(cfg=None, device_kind=None, installed=None):
    """(backend, reason) for `--backend auto`: a jax-only feature asks for jax;
    otherwise the fastest installed backend for the device kind found and the
    precision asked for, from `MEASURED_TOKENS_PER_SEC` (jax first on
    accelerators), leaving out torch for the distribution flags it cannot run.

    Example:
        >>> auto_backend(device_kind="tpu", installed=("jax", "torch", "tensorflow"))[0]
        'jax'
    """
    if installed is None:
        installed = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    feature = needs_jax(cfg)
    if feature:
        return "jax", f"auto: {feature} needs keras.distribution, which Keras implements on jax only"
    not_torch = torch_cannot(cfg)
    if not_torch:
        installed = [b for b in installed if b != "torch"]
    kind = device_kind or detect_device_kind()
    precision = "bfloat16" if cfg is not None and cfg.optimization.use_mixed_precision else "float32"
    measured = MEASURED_TOKENS_PER_SEC.get((kind, precision))
    if measured:
        ranked = sorted((b for b in measured if b in installed), key=lambda b: -measured[b])
        if ranked:
            figures = ", ".join(f"{b} {measured[b]:,.0f}" for b in ranked)
            return ranked[0], (f"auto: fastest measured on {kind} in {precision} (training tokens/s of the "
                               f"small model: {figures}; docs/benchmarks.md)"
                               + (f"; not torch, which cannot run {not_torch}" if not_torch else ""))
    for name in ACCELERATOR_ORDER.get(kind, BACKENDS):
        if name in installed:
            return name, f"auto: {name} is the usual fastest on {kind} (not measured by this project)"
    raise UserError(f"none of {', '.join(BACKENDS)} is installed; pip install the project's dependencies")


def select_backend(requested=None, cfg=None, default="auto"):
    """Sets KERAS_BACKEND: an explicit `--backend NAME` wins, then the
    KERAS_BACKEND variable, then `default` (`auto`: see `auto_backend`;
    `--backend auto` ignores the variable). Returns the name; `choice()` says why.

    Example:
        select_backend("torch")   # before `import keras`
    """
    if requested and requested != "auto":
        name, reason = requested, f"--backend {requested}"
    elif requested is None and os.environ.get("KERAS_BACKEND"):
        name, reason = os.environ["KERAS_BACKEND"], "KERAS_BACKEND"
    elif requested is None and default != "auto":
        name, reason = default, "the default"
    else:
        if "keras" in sys.modules:  # already loaded (a test, a notebook): auto keeps what is running
            name = sys.modules["keras"].backend.backend()
            reason = "auto: keras was already imported with this backend"
        else:
            name, reason = auto_backend(cfg)
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (from {reason}); use one of {', '.join(BACKENDS)}")
    if "keras" in sys.modules:
        running = sys.modules["keras"].backend.backend()
        if running != name:
            raise UserError(
                f"keras was already imported with the {running} backend; "
                f"start a new process to use {name}"
            )
    os.environ["KERAS_BACKEND"] = name
    # TensorFlow serves tf.data on every backend; keep its C++ banner quiet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _choice.update(backend=name, reason=reason)
    return name


def choice():
    """{"backend", "reason"} of the last `select_backend`, or {} before it."""
    return dict(_choice)


@contextlib.contextmanager
def quiet_start(enabled=True):
    """Holds back what the frameworks write to file descriptor 2 while they load
    and find their devices: absl's pre-init warning, oneDNN's notice and the
    CUDA probes of a machine without a GPU come from C++ logging that
    TF_CPP_MIN_LOG_LEVEL does not reach. If loading fails, what was held back
    is written out after all, so a real error is never hidden.

    Example:
        with quiet_start(not cfg.run.verbose):
            import keras
            init_devices()
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def init_devices():
    """Makes TensorFlow (which serves tf.data on every backend, and whose CUDA
    probe writes the cuInit line) find its devices now, inside `quiet_start`,
    instead of at the first op. jax is left alone: a multi-process run must
    join its cluster (`distribution.setup`) before anything asks jax for devices."""
    # heavy: tensorflow takes seconds to load; callers load it inside quiet_start
    import tensorflow as tf

    tf.config.list_physical_devices()


def compile_options(strategy=None):
    """Keras `compile` keywords that make training fastest on this backend.

    tensorflow in float32: XLA (`jit_compile=True`), which Keras leaves off on
    CPU-only machines; on the project's CPU it trains `small` 8% faster (433
    vs 401 tokens/s). Not in bfloat16: XLA's CPU matmuls do not use the
    chip's bf16 instructions, the graph's oneDNN kernels do (671 vs 461
    tokens/s). Keras' own rule stays for a `tf.distribute` strategy (no
    XLA). jax always compiles with XLA; torch runs eagerly (Keras'
    `torch.compile` path is experimental). Figures: docs/benchmarks.md.

    Example:
        model.compile(optimizer=opt, loss=loss, **compile_options())
    """
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    if keras.backend.backend() != "tensorflow" or strategy is not None:
        return {}
    if not _tensorflow_uses_xla(keras.mixed_precision.global_policy().compute_dtype):
        return {}  # Keras' default: XLA on GPU, not on CPU
    return {"jit_compile": True}


def _tensorflow_uses_xla(compute_dtype):
    return compute_dtype == "float32"


def cpu_matmul(dtype, name=None):
    """(library, threads, make_product) for measuring this CPU's matmul peak
    the way training computes on backend `name` (default: keras' backend):
    `make_product(n)` returns a function that multiplies two n x n `dtype`
    matrices and waits for the product. jax: an XLA-compiled matmul; torch:
    its eager matmul; tensorflow: XLA in float32 and a oneDNN graph in
    bfloat16, as `compile_options` trains. `library` names the path and its
    version (part of the peak's cache key); `threads` is how many threads
    the library computes with. Imports keras only when `name` is not given.

    Example:
        library, threads, make_product = cpu_matmul("bfloat16", "jax")
        make_product(1024)()  # one 1024 x 1024 x 1024 product, finished
    """
    # heavy: numpy is needed to measure a peak, not to pick a backend
    import numpy as np

    if name is None:
        # heavy: keras picks its backend on import, so it loads after select_backend
        import keras

        name = keras.backend.backend()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def operands(n):
        return np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)

    if name == "jax":
        # heavy: only the running backend's framework loads
        import jax
        import jax.numpy as jnp

        cpu = jax.devices("cpu")[0]
        matmul = jax.jit(jnp.matmul)

        def make_product(n):
            a, b = (jax.device_put(jnp.asarray(x, dtype), cpu) for x in operands(n))
            return lambda: matmul(a, b).block_until_ready()

        # XLA's CPU client runs one thread per schedulable CPU.
        return f"jax {jax.__version__} (XLA)", usable, make_product
    if name == "torch":
        # heavy: only the running backend's framework loads
        import torch

        def make_product(n):
            a, b = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in operands(n))
            return lambda: torch.matmul(a, b)

        return f"torch {torch.__version__}", torch.get_num_threads(), make_product
    # heavy: only the running backend's framework loads
    import tensorflow as tf

    xla = _tensorflow_uses_xla(dtype)
    matmul = tf.function(tf.linalg.matmul, jit_compile=xla)

    def make_product(n):
        with tf.device("/CPU:0"):
            a, b = (tf.cast(tf.constant(x), dtype) for x in operands(n))
        return lambda: matmul(a, b)  # eager CPU ops return finished

    threads = tf.config.threading.get_intra_op_parallelism_threads() or usable
    return f"tensorflow {tf.__version__} ({'XLA' if xla else 'oneDNN graph'})", threads, make_product


# glibc's mallopt parameters (malloc.h) and the values set: 32 MiB is the
# largest mmap threshold glibc accepts; a trim threshold of -1 turns trimming
# off (mallopt(3)). A finite one is too small: `small`'s activations alone free
# over 1 GiB at the heap top at the end of every step.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: -1}
_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def tune_allocator(environ=None):
    """Keeps freed host memory in the process instead of handing it back to
    the kernel after every step (glibc malloc on Linux); returns whether it did.

    A train step allocates and frees the same activation buffers every time.
    With glibc's defaults, buffers over the (adaptive) mmap threshold are
    unmapped when freed and page-faulted back in on the next step, and the
    heap top is trimmed the same way. Measured on the project's 2-core CPU,
    the whole program on the torch backend spent about a quarter of its time
    in the kernel, and the `small` model trained at 219-256 tokens/s; with
    these settings, at 282-305 (docs/benchmarks.md). The cost is that the
    process keeps up to its peak memory instead of returning it between
    steps. Left alone when the user set the allocator themselves
    (`MALLOC_*_`, `GLIBC_TUNABLES`, `LD_PRELOAD`), and off Linux/glibc.

    Example:
        tune_allocator()  # before the first train step
    """
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or any(environ.get(k) for k in _ALLOCATOR_ENV):
        return False
    mallopt = _glibc_mallopt()
    return mallopt is not None and all(mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.items())


@functools.lru_cache(maxsize=None)
def _glibc_mallopt():
    try:
        return ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return None


def restore_allocator():
    """Puts `tune_allocator`'s settings back, after something in the process
    changed them; call it only where `tune_allocator()` returned True.

    TensorFlow's `from_generator` kernel (the streaming pipeline's) sets
    glibc's mmap threshold to 128 KiB when it is built, a Python 3.11
    workaround in tf.data (`ApplyPython311MemoryPatch`, found with a gdb
    breakpoint on mallopt). After that every buffer over 128 KiB was mapped
    and unmapped each step: the whole program on torch spent a quarter of
    its time in page faults. The kernel is built when an iterator starts,
    in a tf.data thread, so `callbacks.KeepAllocatorSettings` calls this
    before every batch; it costs two `mallopt` calls, microseconds.

    Example:
        if tune_allocator():
            restore_allocator()  # after building a tf.data iterator
    """
    mallopt = _glibc_mallopt()
    for param, value in ALLOCATOR_SETTINGS.items():
        mallopt(param, value)


def describe_devices():
    """{"backend", "backend_version", "keras_version", "devices": {kind: count}}."""
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    name = keras.backend.backend()
    if name == "jax":
        # heavy: only the running backend's framework loads
        import jax

        version = jax.__version__
        kinds = collections.Counter(d.platform for d in jax.devices())
        names = [d.device_kind for d in jax.devices()]
    elif name == "torch":
        # heavy: only the running backend's framework loads
        import torch

        version = torch.__version__
        kinds = collections.Counter({"cpu": 1})
        names = ["cpu"]
        if torch.cuda.is_available():
            kinds["gpu"] = torch.cuda.device_count()
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        # heavy: only the running backend's framework loads
        import tensorflow as tf

        version = tf.__version__
        physical = tf.config.list_physical_devices()
        kinds = collections.Counter(d.device_type.lower() for d in physical)
        accelerators = [d for d in physical if d.device_type != "CPU"]
        names = [tf.config.experimental.get_device_details(d).get("device_name", d.device_type) for d in accelerators]
        names = names or ["cpu"]
    return {
        "backend": name,
        "backend_version": version,
        "keras_version": keras.__version__,
        "devices": dict(kinds),
        "device_names": names,
    }


def accelerator(devices):
    """'gpu', 'tpu' or None for a `describe_devices()["devices"]` dict."""
    for kind in ("tpu", "gpu", "cuda"):
        if devices.get(kind):
            return "gpu" if kind == "cuda" else kind
    return None


def compile_model_fn(model, fn):
    """`fn(*args)`, which reads `model`'s variables, compiled once per input shape.

    Keras compiles `fit` and `predict` itself but not a custom call such as
    the KV-cache step; run eagerly, jax dispatches op by op. On jax this is
    `jax.jit` over a stateless call with the variables as arguments (read
    afresh each call, so training in between is seen); on tensorflow a
    `tf.function`; torch runs eagerly (its eager ops are cheap). Pass changing
    integers as arrays, not Python ints, or tensorflow retraces.

    Example:
        step = compile_model_fn(model, model.call_with_state)
        logits, state = step(ids, state, np.int32(position))
    """
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    name = keras.backend.backend()
    if name == "jax":
        # heavy: only the running backend's framework loads
        import jax

        variables = list(model.variables)

        def pure(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        jitted = jax.jit(pure)
        return lambda *args: jitted([v.value for v in variables], *args)
    if name == "tensorflow":
        # heavy: only the running backend's framework loads
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    return fn


def no_grad():
    """A context in which the backend records no gradients: torch's
    `no_grad` (its eager ops otherwise keep every intermediate alive for a
    backward pass; a sampling loop that feeds a KV cache back in grows that
    graph token by token), nothing on jax and tensorflow, which record only
    inside their gradient functions.

    Example:
        with no_grad():
            logits = model(ids)
    """
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    if keras.backend.backend() == "torch":
        # heavy: only the running backend's framework loads
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def scan(f, init, xs, y_like):
    """`keras.ops.scan(f, init, xs)` -> (carry, stacked ys), on every backend.

    Keras' tensorflow `scan` allocates the stacked outputs with the carry's
    shapes, so a step whose output differs in shape from its carry fails
    there; on tensorflow this runs `tf.scan` with the output carried next to
    the state instead. `y_like` is a zero tensor shaped like one output.

    Example:
        carry, ys = scan(step, (w, b), (q_blocks, k_blocks), q_blocks[0])
    """
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    if keras.backend.backend() != "tensorflow":
        return keras.ops.scan(f, init, xs)
    # heavy: only the running backend's framework loads
    import tensorflow as tf

    def body(acc, x):
        return f(acc[0], x)

    carries, ys = tf.scan(body, xs, initializer=(init, y_like))
    return tf.nest.map_structure(lambda c: c[-1], carries), ys


def bf16_unsupported_reason():
    """None when the backend computes in bfloat16 on its devices, else why not.

    CPUs (all three backends emulate it where the chip lacks it) and TPUs do;
    NVIDIA GPUs need compute capability 8.0 (Ampere) or newer.

    Example:
        reason = bf16_unsupported_reason()   # e.g. "Tesla V100 (compute capability 7.0) has no bfloat16"
    """
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    name = keras.backend.backend()
    capabilities = []  # (device name, (major, minor)) of each GPU
    if name == "jax":
        # heavy: only the running backend's framework loads
        import jax

        for d in jax.devices():
            if d.platform == "gpu" and getattr(d, "compute_capability", None):
                capabilities.append((d.device_kind, tuple(int(p) for p in str(d.compute_capability).split(".")[:2])))
    elif name == "torch":
        # heavy: only the running backend's framework loads
        import torch

        if torch.cuda.is_available():
            capabilities = [(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
                            for i in range(torch.cuda.device_count())]
    else:
        # heavy: only the running backend's framework loads
        import tensorflow as tf

        for d in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(d)
            if details.get("compute_capability"):
                capabilities.append((details.get("device_name", "GPU"), tuple(details["compute_capability"])))
    for device, capability in capabilities:
        reason = bf16_missing(device, capability)
        if reason:
            return reason
    return None


def bf16_missing(device, capability):
    """Why an NVIDIA GPU of this compute capability has no bfloat16 (before
    Ampere, 8.0), or None when it has it.

    Example:
        >>> bf16_missing("Tesla T4", (7, 5))
        'Tesla T4 (compute capability 7.5) has no bfloat16'
    """
    if tuple(capability) < (8, 0):
        return f"{device} (compute capability {capability[0]}.{capability[1]}) has no bfloat16"
    return None


def replica_summed_gradients(grads):
    """(gradients, replicas): under a tensorflow `tf.distribute` strategy with
    several replicas each replica holds only its share of the gradient, and
    Keras sums the shares after clipping; this sums them first (an all-reduce)
    so a global norm and its clip see the whole gradient. Divide the clipped
    gradients by `replicas` before handing them back to Keras, which sums again.
    Elsewhere `(grads, 1)` unchanged (jax's keras.distribution computes the
    whole gradient in one program).

    Example:
        grads, replicas = replica_summed_gradients(grads)
        norm = global_norm(grads)
        grads = [g * scale / replicas for g in grads]
    """
    # heavy: keras picks its backend on import, so it loads after select_backend
    import keras

    if keras.backend.backend() != "tensorflow":
        return grads, 1
    # heavy: only the running backend's framework loads
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return grads, 1
    present = [i for i, g in enumerate(grads) if g is not None]
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [tf.convert_to_tensor(grads[i]) for i in present])
    out = list(grads)
    for i, g in zip(present, summed):
        out[i] = g
    return out, context.num_replicas_in_sync
