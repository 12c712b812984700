"""Model FLOPs utilisation: achieved FLOP/s over the devices' peak.

Peaks are per device, dense (no sparsity), from the vendors' data sheets:
the bfloat16/float16 tensor-core peak for mixed-precision runs and the
plain float32 peak otherwise. CPUs have no table entry: their peak is
measured once per machine, backend and precision with the backend's own
matmul (`backend.cpu_matmul`), cached, and raised when training ever runs
faster (`PeakGuard`); or given with --peak-flops (docs/cost.md).
"""

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

from ultimate_trainer.backend import cpu_matmul

# substring of the device name (lower case) -> (bf16/fp16 peak, fp32 peak) in FLOP/s
PEAKS = {
    "h200": (989e12, 67e12),
    "h100 pcie": (756e12, 51e12),
    "h100": (989e12, 67e12),
    "a100": (312e12, 19.5e12),
    "l40s": (362e12, 91.6e12),
    "l4": (121e12, 30.3e12),
    "a10": (125e12, 31.2e12),
    "t4": (65e12, 8.1e12),
    "v100": (125e12, 15.7e12),
    "rtx 4090": (165e12, 82.6e12),
    "tpu v6": (918e12, 918e12 / 4),
    "tpu v5p": (459e12, 459e12 / 4),
    "tpu v5": (197e12, 197e12 / 4),  # v5e / v5 lite
    "tpu v4": (275e12, 275e12 / 4),
    "tpu v3": (123e12, 123e12 / 4),
}


# Dense TF32 tensor-core peaks (data sheets) of the GPUs that have TF32 (compute capability 8.0+).
# jax and tensorflow run float32 matmuls there as TF32 by default (jax's default precision,
# tensorflow's enable_tensor_float_32_execution); torch does not (allow_tf32 is off). Measured
# on an H200 (tools/gpu_check.py): jax float32 matmul 348-353 TFLOP/s against 67 for true
# float32, so the plain float32 peak read a 162M model's float32 run as 196% MFU.
TF32_PEAKS = {
    "h200": 494.7e12, "h100 pcie": 378e12, "h100": 494.7e12, "a100": 156e12, "l40s": 183e12,
    "l4": 60e12, "a10": 62.5e12, "rtx 4090": 82.6e12,
}
TF32_BACKENDS = ("jax", "tensorflow")


def table_peak(device_name, mixed_precision, backend=None):
    """The data-sheet peak of one device, or None when it is not in the table:
    bfloat16 for mixed precision; for float32, the TF32 peak where `backend`
    computes float32 matmuls in TF32 on that GPU, else plain float32.

    Example:
        >>> table_peak("NVIDIA A100-SXM4-80GB", True)
        312000000000000.0
        >>> table_peak("NVIDIA H100 80GB HBM3", False, "jax") / 1e12
        494.7
    """
    name = device_name.lower()
    for key, (half, full) in PEAKS.items():
        if key in name:
            if mixed_precision:
                return half
            return TF32_PEAKS.get(key, full) if backend in TF32_BACKENDS else full
    return None


# NVIDIA compute capability of the table's GPUs: bfloat16 needs 8.0 (backend.bf16_missing);
# T4 and V100 have float16 tensor cores only, so training there computes in float32.
COMPUTE_CAPABILITY = {
    "h200": (9, 0), "h100 pcie": (9, 0), "h100": (9, 0), "a100": (8, 0), "l40s": (8, 9), "l4": (8, 9),
    "a10": (8, 6), "t4": (7, 5), "v100": (7, 0), "rtx 4090": (8, 9),
}

# The CPU peak: for two product sizes, the median rate of PEAK_WINDOWS
# windows of square products, each about WINDOW_CPU_SECONDS of work per
# thread, after a warm-up product; the faster size counts. Rates are
# FLOPs over the process's CPU time (times the library's threads), not
# over wall time: on a machine shared with other processes wall time
# counts their turns too (on this project's 2-core CI box 40 to 229
# GFLOP/s across runs), CPU time only ours.
PEAK_WINDOWS = 5
WINDOW_CPU_SECONDS = 0.05
MAX_PRODUCT_SIZE = 4096


def product_sizes(threads):
    """The two square sizes the CPU peak is measured at: big enough for every
    thread to run the library's fastest kernel, at most MAX_PRODUCT_SIZE.

    Example:
        >>> product_sizes(2), product_sizes(16), product_sizes(96)
        ((1024, 2048), (2048, 4096), (4096,))
    """
    smallest = 1024 * 2 ** min(2, int(math.log2(max(threads, 1)) // 3))
    return tuple(sorted({smallest, min(2 * smallest, MAX_PRODUCT_SIZE)}))


def _cpu_seconds():
    # optional: resource exists on Unix only, and cost and the plan import this module everywhere
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def measure_matmul_peak(make_product, threads, windows=PEAK_WINDOWS, window_cpu_seconds=WINDOW_CPU_SECONDS,
                        sizes=None):
    """(FLOP/s, detail): the matmul peak of `threads` threads running the
    products `make_product(n)()`. Per size, the median of `windows` windows;
    a window's rate is its FLOPs over the CPU seconds it took, times
    `threads`: what the library reaches with the CPUs to itself. Run it in a
    process that does nothing else (`cpu_peak` does): its other threads'
    CPU time would count against the matmul.

    Example:
        >>> import numpy as np
        >>> def make_product(n):
        ...     a = np.ones((n, n), np.float32)
        ...     return lambda: a @ a
        >>> flops, detail = measure_matmul_peak(make_product, 1, windows=3, window_cpu_seconds=0.001, sizes=(64,))
        >>> flops > 0 and len(detail["windows"]) == 3
        True
    """
    best = None
    for size in sizes or product_sizes(threads):
        product = make_product(size)
        product()  # compiles, allocates, starts the threads
        start = _cpu_seconds()
        product()
        per_product = max((_cpu_seconds() - start) / threads, 1e-6)
        runs = max(1, round(window_cpu_seconds / per_product))
        rates = []
        for _ in range(windows):
            start = _cpu_seconds()
            for _ in range(runs):
                product()
            rates.append(2 * size**3 * runs * threads / max(_cpu_seconds() - start, 1e-9))
        rate = statistics.median(rates)
        if best is None or rate > best[0]:
            best = (rate, {"size": size, "threads": threads, "windows": rates})
    return best


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_cache_key(dtype, library, threads):
    """What a cached CPU peak holds for: the CPU model, its logical CPUs and
    those this process may use, the compute dtype, the matmul library and
    its threads.

    Example:
        key = peak_cache_key("float32", "jax 0.4.35 (XLA)", 8)
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()} | {os.cpu_count()} cpus, {usable} usable | {dtype} | {library}, {threads} threads"


def peak_cache_path():
    """$XDG_CACHE_HOME/ultimate_trainer/cpu_peak.json (default ~/.cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "ultimate_trainer" / "cpu_peak.json"


def _read_cache(path):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: measure again
        return {}
    return data if isinstance(data, dict) else {}


def _update_cache(path, key, entry):
    """Writes `entry` under `key`; the caller holds the lock."""
    data = _read_cache(path)
    data[key] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _lock(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def measure_in_subprocess(backend, dtype, timeout=300):
    """`measure_matmul_peak` of `backend.cpu_matmul(dtype, backend)`, run in a
    fresh Python process: its CPU time is the matmul's alone, whatever
    threads the calling process runs (data loading, logging)."""
    command = [sys.executable, "-m", "ultimate_trainer.training.mfu", backend, dtype]
    try:
        root = str(Path(__file__).resolve().parents[2])  # this package, however the caller found it
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3")}
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        if result.returncode:
            raise ValueError(" ".join(result.stderr.strip().splitlines()[-1:]) or f"exit {result.returncode}")
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as error:
        raise RuntimeError(f"{' '.join(command[1:])}: {error}") from error


def cpu_peak(dtype, backend, measure=measure_in_subprocess):
    """{"flops", "source", "cache_key"}: this CPU's matmul peak in `dtype`
    on `backend` (`backend.cpu_matmul`), measured once per machine and
    cached (`peak_cache_path`). Processes that start together wait for one
    measurement instead of slowing each other's.

    Example:
        cpu_peak("bfloat16", "torch")["flops"]
    """
    library, threads, _ = cpu_matmul(dtype, backend)
    path, key = peak_cache_path(), peak_cache_key(dtype, library, threads)
    with _lock(path):
        entry = _read_cache(path).get(key)
        if entry and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
            how = "cached"
        else:
            entry = {**measure(backend, dtype), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            _update_cache(path, key, entry)
            how = "measured"
    return {"flops": entry["flops"], "cache_key": key,
            "source": f"{dtype} matmul of {library} on this CPU, {how} once per machine in {path}; "
                      f"--peak-flops overrides"}


def raise_cached_peak(key, flops):
    """Raises the cached peak under `key` to `flops` (never lowers it)."""
    path = peak_cache_path()
    with _lock(path):
        entry = _read_cache(path).get(key) or {}
        if flops > entry.get("flops", 0):
            _update_cache(path, key, {**entry, "flops": flops, "raised_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                      "raised_by": "a training run that ran faster"})


class PeakGuard:
    """MFU that cannot exceed 100%: a rate above the peak means the peak was
    too low (a CPU peak measured while the machine was busy, a --peak-flops
    below the device's). The first time, it says so in one line; each time,
    the peak is raised to the achieved rate (and the cached CPU peak with
    it). `peak` is the plan's `peak_flops` dict, updated in place.

    Example:
        >>> guard = PeakGuard({"total": 100.0, "per_device": 100.0, "source": "--peak-flops"}, printer=print)
        >>> guard.mfu(achieved=50.0)
        0.5
        >>> guard.mfu(achieved=125.0)  # doctest: +NORMALIZE_WHITESPACE
        warning: 125 FLOP/s achieved exceeds the MFU peak of 100 FLOP/s (--peak-flops); the peak was too low:
        MFU is now against 125 FLOP/s
        1.0
    """

    def __init__(self, peak, printer=print):
        self.peak = peak
        self.printer = printer
        self.warned = False

    def mfu(self, achieved):
        """achieved FLOP/s over the peak, or None without a peak."""
        total = self.peak.get("total")
        if not total:
            return None
        if achieved > total:
            if not self.warned:
                self.printer(f"warning: {_rate(achieved)} achieved exceeds the MFU peak of {_rate(total)} "
                             f"({self.peak['source']}); the peak was too low: MFU is now against {_rate(achieved)}")
                self.warned = True
            self.peak["per_device"] = self.peak["per_device"] * achieved / total
            self.peak["total"] = achieved
            self.peak["raised_to_achieved"] = True
            if self.peak.get("cache_key"):
                raise_cached_peak(self.peak["cache_key"], self.peak["per_device"])
            total = achieved
        return achieved / total


def _rate(flops):
    for scale, unit in ((1e12, "TFLOP/s"), (1e9, "GFLOP/s"), (1e6, "MFLOP/s")):
        if flops >= scale:
            return f"{flops / scale:,.1f} {unit}"
    return f"{flops:,.0f} FLOP/s"


def mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Example:
        >>> round(mfu(1e6, 100.0, 200e9), 4)
        0.0005
    """
    return flops_per_token * tokens_per_sec / peak_flops


if __name__ == "__main__":  # measure_in_subprocess: BACKEND DTYPE -> one JSON line
    _library, _threads, _make_product = cpu_matmul(sys.argv[2], sys.argv[1])
    _flops, _detail = measure_matmul_peak(_make_product, _threads)
    print(json.dumps({"flops": _flops, "library": _library, **_detail}))
