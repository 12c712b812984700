import pytest

from tests.conftest import run_cli
from ultimate_trainer.training import mfu


def test_table_lookup_by_device_name():
    assert mfu.table_peak("NVIDIA H100 80GB HBM3", True) == 989e12
    assert mfu.table_peak("NVIDIA H100 PCIe", True) == 756e12
    assert mfu.table_peak("NVIDIA A100-SXM4-40GB", False) == 19.5e12
    assert mfu.table_peak("TPU v5 lite", True) == 197e12
    assert mfu.table_peak("TPU v5p", True) == 459e12
    assert mfu.table_peak("cpu", True) is None


def test_mfu_arithmetic():
    # 6N-style FLOPs/token x tokens/s over the peak, written out.
    assert mfu.mfu(12_000_000, 4_000, 200e9) == pytest.approx(12e6 * 4e3 / 200e9)


def test_cpu_peak_is_measured_and_plausible():
    peak = mfu.measure_cpu_peak(size=256, seconds=0.05)
    assert 1e8 < peak < 1e14


def test_peak_flops_flag_reaches_the_plan(tmp_path):
    import json

    result = run_cli(["--model-preset", "nano", "--dry-run", "--json", "--peak-flops", "1e12",
                      "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-1000:]
    peak = json.loads(result.stdout)["peak_flops"]
    assert peak == {"total": 1e12, "per_device": 1e12, "source": "--peak-flops"}
