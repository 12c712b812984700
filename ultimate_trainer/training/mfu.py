"""Model FLOPs utilisation: achieved FLOP/s over the devices' peak.

Peaks are per device, dense (no sparsity), from the vendors' data sheets:
the bfloat16/float16 tensor-core peak for mixed-precision runs and the
plain float32 peak otherwise. CPUs have no table entry: their peak is
measured at start (a float32 matmul through numpy's BLAS on every core) or
given with --peak-flops.
"""

import time

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


def table_peak(device_name, mixed_precision):
    """The data-sheet peak of one device, or None when it is not in the table.

    Example:
        >>> table_peak("NVIDIA A100-SXM4-80GB", True)
        312000000000000.0
    """
    name = device_name.lower()
    for key, (half, full) in PEAKS.items():
        if key in name:
            return half if mixed_precision else full
    return None


# NVIDIA compute capability of the table's GPUs: bfloat16 needs 8.0 (backend.bf16_missing);
# T4 and V100 have float16 tensor cores only, so training there computes in float32.
COMPUTE_CAPABILITY = {
    "h200": (9, 0), "h100 pcie": (9, 0), "h100": (9, 0), "a100": (8, 0), "l40s": (8, 9), "l4": (8, 9),
    "a10": (8, 6), "t4": (7, 5), "v100": (7, 0), "rtx 4090": (8, 9),
}

def measure_cpu_peak(size=1024, seconds=0.3):
    """float32 matmul FLOP/s of this CPU through numpy's BLAS (all cores)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b  # warm the BLAS threads
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start)


def mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Example:
        >>> round(mfu(1e6, 100.0, 200e9), 4)
        0.0005
    """
    return flops_per_token * tokens_per_sec / peak_flops
