import json
import statistics
import types

import pytest

from tests.conftest import run_main
from ultimate_trainer import backend
from ultimate_trainer.config import resolve_config
from ultimate_trainer.training import mfu
from ultimate_trainer.training.plan import Devices


def test_table_lookup_by_device_name():
    assert mfu.table_peak("NVIDIA H100 80GB HBM3", True) == 989e12
    assert mfu.table_peak("NVIDIA H100 PCIe", True) == 756e12
    assert mfu.table_peak("NVIDIA A100-SXM4-40GB", False) == 19.5e12
    assert mfu.table_peak("TPU v5 lite", True) == 197e12
    assert mfu.table_peak("TPU v5p", True) == 459e12
    assert mfu.table_peak("cpu", True) is None
    assert set(mfu.COMPUTE_CAPABILITY) == {k for k in mfu.PEAKS if not k.startswith("tpu")}


def test_mfu_arithmetic():
    # 6N-style FLOPs/token x tokens/s over the peak, written out.
    assert mfu.mfu(12_000_000, 4_000, 200e9) == pytest.approx(12e6 * 4e3 / 200e9)


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "ultimate_trainer" / "cpu_peak.json"


def test_ten_cpu_peak_measurements_agree_within_10_percent():
    """The peak of this backend's matmul in float32, measured ten times in a row
    (about 1 s each): FLOPs over the process's CPU time, so a machine shared
    with other processes (the 2-core CI box) reads the same as an idle one."""
    library, threads, make_product = backend.cpu_matmul("float32")
    peaks = [mfu.measure_matmul_peak(make_product, threads)[0] for _ in range(10)]
    median = statistics.median(peaks)
    assert 1e9 < median < 1e14, (library, peaks)
    assert all(abs(p / median - 1) <= 0.10 for p in peaks), [f"{p / 1e9:.0f}" for p in peaks]


def test_cpu_peak_is_measured_once_then_read_from_the_cache(cache_home, monkeypatch):
    import keras

    name = keras.backend.backend()
    first = mfu.cpu_peak("float32", name)  # the real path: a fresh process measures
    assert first["source"].startswith("float32 matmul of ") and ", measured once per machine in " in first["source"]
    assert 1e9 < first["flops"] < 1e14 and cache_home.exists()
    entry = json.loads(cache_home.read_text())[first["cache_key"]]
    assert entry["flops"] == first["flops"] and len(entry["windows"]) == mfu.PEAK_WINDOWS

    def never(*args):
        raise AssertionError("measured again")

    again = mfu.cpu_peak("float32", name, measure=never)
    assert again["flops"] == first["flops"] and ", cached once per machine in " in again["source"]
    # Another precision is another peak.
    calls = []
    other = mfu.cpu_peak("bfloat16", name, measure=lambda b, d: calls.append(d) or {"flops": 7e11})
    assert calls == ["bfloat16"] and other["flops"] == 7e11 and other["cache_key"] != first["cache_key"]
    key = mfu.peak_cache_key("float32", *backend.cpu_matmul("float32", name)[:2])
    assert key == first["cache_key"] and mfu.cpu_model() in key


def test_an_unreadable_cache_is_measured_again(cache_home):
    cache_home.parent.mkdir(parents=True)
    cache_home.write_text("{half a file")
    peak = mfu.cpu_peak("float32", "jax", measure=lambda b, d: {"flops": 5e10})
    assert peak["flops"] == 5e10 and json.loads(cache_home.read_text())[peak["cache_key"]]["flops"] == 5e10


def test_a_failed_measurement_is_one_line(monkeypatch):
    monkeypatch.setattr(mfu.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match="ultimate_trainer.training.mfu jax float32"):
        mfu.measure_in_subprocess("jax", "float32")


def _devices(devices=None, names=("cpu",), backend_name="jax"):
    return Devices(backend_name, "0", "3", devices or {"cpu": 1}, list(names))


def test_peak_flops_flag_wins_and_skips_the_cache(monkeypatch):
    from ultimate_trainer.training import trainer

    def never(*args, **kwargs):
        raise AssertionError("the CPU was measured")

    monkeypatch.setattr(mfu, "cpu_peak", never)
    cfg = resolve_config({"model.model_preset": "nano", "training.peak_flops": 3e11})
    assert trainer._peak_flops(cfg, _devices(), 1) == {"total": 3e11, "per_device": 3e11, "source": "--peak-flops"}


@pytest.mark.parametrize("mixed, dtype", [(False, "float32"), (True, "bfloat16")])
def test_the_cpu_peak_is_in_the_training_precision(monkeypatch, mixed, dtype):
    from ultimate_trainer.training import trainer

    asked = []
    monkeypatch.setattr(mfu, "cpu_peak", lambda d, b: asked.append((d, b)) or {
        "flops": 1e11, "source": "measured", "cache_key": "k"})
    cfg = resolve_config({"model.model_preset": "nano", "optimization.use_mixed_precision": mixed})
    peak = trainer._peak_flops(cfg, _devices(), 1)
    assert asked == [(dtype, "jax")] and peak == {"total": 1e11, "per_device": 1e11, "source": "measured",
                                                  "cache_key": "k"}
    monkeypatch.setattr(mfu, "cpu_peak", lambda d, b: (_ for _ in ()).throw(RuntimeError("no compiler")))
    assert "could not be measured (no compiler); pass --peak-flops" in trainer._peak_flops(cfg, _devices(), 1)["source"]


@pytest.mark.parametrize("name, missing, flags, backend_name, peak, kind", [
    ("NVIDIA A100-SXM4-80GB", None, {}, "jax", 312e12, "bfloat16"),  # bfloat16 by default on a GPU that has it
    # float32: jax and tensorflow multiply in TF32 on an A100, torch in true float32.
    ("NVIDIA A100-SXM4-80GB", None, {"optimization.use_mixed_precision": False}, "jax", 156e12, "TF32"),
    ("NVIDIA A100-SXM4-80GB", None, {"optimization.use_mixed_precision": False}, "torch", 19.5e12, "float32"),
    ("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-16GB (compute capability 7.0) has no bfloat16",
     {"optimization.use_mixed_precision": True}, "jax", 15.7e12, "float32"),  # falls back to float32; no TF32
])
def test_a_gpu_peak_is_in_the_precision_the_run_computes_in(monkeypatch, name, missing, flags, backend_name, peak,
                                                             kind):
    from ultimate_trainer.training import trainer

    monkeypatch.setattr(backend, "bf16_unsupported_reason", lambda: missing)
    cfg = resolve_config({"model.model_preset": "nano", **flags})
    devices = _devices({"gpu": 2, "cpu": 1}, [name, name], backend_name)
    got = trainer._peak_flops(cfg, devices, 2)
    assert (got["total"], got["per_device"]) == (2 * peak, peak)
    assert got["source"] == f"data sheet of {name}, {kind}"


def test_peak_flops_flag_reaches_the_plan(tmp_path):
    result = run_main(["--model-preset", "nano", "--dry-run", "--json", "--peak-flops", "1e12",
                       "--output-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-1000:]
    peak = json.loads(result.stdout)["peak_flops"]
    assert peak == {"total": 1e12, "per_device": 1e12, "source": "--peak-flops"}


def _logger(tmp_path, monkeypatch, peak, flops_per_token, lines):
    """A MetricsLogger driven by hand: each `window(seconds)` is one logged step."""
    from ultimate_trainer.training import callbacks
    from ultimate_trainer.training.reporting import MetricsSink

    now = [0.0]
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    clock = callbacks.StepClock(total_steps=10, intervals=(1,))
    logger = callbacks.MetricsLogger(clock, 1, 1024, lambda s: 1e-3, MetricsSink(tmp_path), lines.append,
                                     flops_per_token=flops_per_token, peak=peak)
    logger.set_model(types.SimpleNamespace(optimizer=object(), stop_training=False))
    logger.on_train_begin()

    def window(seconds):
        logger.on_epoch_begin(0)
        now[0] += seconds
        clock.step += 1
        logger.on_epoch_end(0, {"loss": 2.0})
        return logger.history[-1]

    return logger, window


def test_logged_mfu_against_a_hand_computation(tmp_path, monkeypatch):
    from ultimate_trainer.training.plan import model_summary

    # d 64, 2 layers, 2 heads, d_ff 128, seq 32, byte vocab: per block 2 norms, q k v o, SwiGLU; a final norm.
    cfg = resolve_config({"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 128,
                          "model.seq_len": 32})
    _, params, flops = model_summary(cfg.model, 258)
    non_embedding = 2 * (2 * 64 + 4 * 64 * 64 + 3 * 64 * 128) + 64
    assert flops == 6 * non_embedding + 6 * 258 * 64 + 12 * 2 * 64 * 32 == 641_664
    lines = []
    _, window = _logger(tmp_path, monkeypatch, {"total": 2e9, "per_device": 1e9, "source": "two devices"}, flops, lines)
    record = window(0.5)  # 1,024 tokens in 0.5 s
    assert record["tokens_per_sec"] == 2048
    assert record["mfu"] == pytest.approx(641_664 * 2048 / 2e9) and "MFU 65.7%" in lines[-1]


def test_mfu_above_100_percent_raises_the_peak_instead(tmp_path, monkeypatch, cache_home):
    key = mfu.cpu_peak("float32", "jax", measure=lambda b, d: {"flops": 1e9})["cache_key"]
    peak = {"total": 1e9, "per_device": 1e9, "source": "measured", "cache_key": key}
    lines = []
    logger, window = _logger(tmp_path, monkeypatch, peak, 1e6, lines)
    assert window(2.048)["mfu"] == pytest.approx(0.5)  # 500 tokens/s: 5e8 FLOP/s
    assert not [line for line in lines if line.startswith("warning")]
    record = window(0.512)  # 2,000 tokens/s: 2e9 FLOP/s on a peak of 1e9
    assert record["mfu"] == 1.0 and "MFU 100.0%" in lines[-1]
    warning = lines[-2]
    assert warning.startswith("warning: 2.0 GFLOP/s achieved exceeds the MFU peak of 1.0 GFLOP/s (measured)")
    assert peak["total"] == peak["per_device"] == 2e9 and peak["raised_to_achieved"]
    assert json.loads(cache_home.read_text())[key]["flops"] == 2e9  # the next run starts from the raised peak
    assert mfu.cpu_peak("float32", "jax", measure=None)["flops"] == 2e9
    window(0.256)  # faster again: raised again, but said once
    assert sum(line.startswith("warning") for line in lines) == 1 and peak["total"] == pytest.approx(4e9)
    assert max(r["mfu"] for r in logger.history) <= 1.0
    # A slower window afterwards is measured against the raised peak.
    assert window(1.024)["mfu"] == pytest.approx(1e9 / 4e9)


def test_a_peak_given_by_flag_is_raised_but_not_cached(cache_home):
    lines = []
    peak = {"total": 8e9, "per_device": 1e9, "source": "--peak-flops"}
    guard = mfu.PeakGuard(peak, lines.append)
    assert guard.mfu(16e9) == 1.0 and peak == {"total": 16e9, "per_device": 2e9, "source": "--peak-flops",
                                               "raised_to_achieved": True}
    assert "(--peak-flops); the peak was too low" in lines[0] and not cache_home.exists()
    assert mfu.PeakGuard({"total": None, "per_device": None, "source": "unknown"}).mfu(1e9) is None
