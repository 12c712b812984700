"""`--backend auto`: device detection, the measured table, features that need jax."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import run_cli, tiny_model_flags
from ultimate_trainer import backend as backend_lib
from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError

ALL = ("jax", "torch", "tensorflow")


def _fastest(kind, precision="float32"):
    table = backend_lib.MEASURED_TOKENS_PER_SEC[(kind, precision)]
    return max(table, key=table.get)


@pytest.mark.parametrize("environ,kind", [
    ({"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, "tpu"),
    ({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, "tpu"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "cpu"),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, "cpu"),
])
def test_detect_device_kind_from_environment(environ, kind):
    assert backend_lib.detect_device_kind(environ) == kind


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_auto_picks_the_fastest_measured_backend_on_cpu(precision):
    table = backend_lib.MEASURED_TOKENS_PER_SEC[("cpu", precision)]
    # The table holds real, distinct measurements of all three; the pick is its maximum.
    assert sorted(table) == sorted(ALL) and len(set(table.values())) == 3 and min(table.values()) > 0
    flags = {"optimization.use_mixed_precision": True} if precision == "bfloat16" else {}
    name, reason = backend_lib.auto_backend(resolve_config(flags), device_kind="cpu", installed=ALL)
    assert name == _fastest("cpu", precision)
    assert reason.startswith(f"auto: fastest measured on cpu in {precision}") and f"{name} {table[name]:,.0f}" in reason


@pytest.mark.parametrize("flags", [{"distribution.distribution": "data"},
                                   {"distribution.distribution": "data", "distribution.mesh": "batch=2"}])
def test_auto_never_picks_torch_for_distribution_flags_it_refuses(flags, monkeypatch):
    # Make torch the fastest measured, as it is in bfloat16: a data-parallel run must still get
    # a backend that runs it, and say why torch was passed over.
    monkeypatch.setitem(backend_lib.MEASURED_TOKENS_PER_SEC, ("cpu", "float32"),
                        {"torch": 900.0, "tensorflow": 500.0, "jax": 400.0})
    name, reason = backend_lib.auto_backend(resolve_config(flags), device_kind="cpu", installed=ALL)
    assert name == "tensorflow" and "not torch, which cannot run --distribution data" in reason
    assert backend_lib.auto_backend(resolve_config({}), device_kind="cpu", installed=ALL)[0] == "torch"


def test_auto_skips_a_backend_that_is_not_installed():
    fastest = _fastest("cpu")
    rest = tuple(b for b in ALL if b != fastest)
    name, _ = backend_lib.auto_backend(device_kind="cpu", installed=rest)
    table = backend_lib.MEASURED_TOKENS_PER_SEC[("cpu", "float32")]
    assert name == max(rest, key=table.get)


@pytest.mark.parametrize("kind", ["tpu", "gpu"])
def test_auto_picks_jax_on_accelerators(kind):
    name, reason = backend_lib.auto_backend(device_kind=kind, installed=ALL)
    assert name == "jax" and kind in reason


def test_auto_falls_back_when_jax_is_missing_on_gpu():
    assert backend_lib.auto_backend(device_kind="gpu", installed=("torch", "tensorflow"))[0] == "torch"


def test_auto_with_nothing_installed_is_a_user_error():
    with pytest.raises(UserError, match="none of jax, torch, tensorflow is installed"):
        backend_lib.auto_backend(device_kind="cpu", installed=())


@pytest.mark.parametrize("flags,feature", [
    (["--distribution", "fsdp"], "--distribution fsdp"),
    (["--distribution", "model"], "--distribution model"),
    (["--coordinator-address", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "0"], "multi-process"),
])
def test_a_feature_that_needs_jax_wins_over_speed(flags, feature):
    from ultimate_trainer.cli import build_parser

    cfg = resolve_config(vars(build_parser().parse_args(flags)))
    name, reason = backend_lib.auto_backend(cfg, device_kind="cpu", installed=ALL)
    assert name == "jax" and feature in reason and "keras.distribution" in reason


def test_data_parallelism_does_not_force_jax():
    # tensorflow runs it (MirroredStrategy), also over a --mesh of logical CPUs.
    for flags in ({"distribution.distribution": "data"},
                  {"distribution.distribution": "data", "distribution.mesh": "batch=2"}):
        assert backend_lib.needs_jax(resolve_config(flags)) is None


def test_cli_auto_prints_its_choice_and_reason():
    # KERAS_BACKEND empty: nothing chosen for the run, so the default (auto) decides.
    result = run_cli(["--dry-run", *tiny_model_flags()], env={"KERAS_BACKEND": ""}, backend="")
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = _fastest("cpu")
    assert f"backend: {chosen} " in result.stdout
    assert "backend chosen by auto: fastest measured on cpu in float32" in result.stdout


def test_cli_explicit_backend_and_environment_win_over_auto():
    result = run_cli(["--dry-run", "--json", "--backend", "torch", *tiny_model_flags()], backend="jax")
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["backend"]["backend"] == "torch" and plan["backend"]["chosen_by"] == "--backend torch"
    assert plan["backend"]["host_allocator"].startswith("kept freed memory")  # tune_allocator ran
    result = run_cli(["--dry-run", "--json", *tiny_model_flags()], backend="jax")
    assert json.loads(result.stdout)["backend"]["chosen_by"] == "KERAS_BACKEND"


def test_cli_auto_with_fsdp_picks_jax():
    result = run_cli(["--dry-run", "--json", "--backend", "auto", "--distribution", "fsdp", *tiny_model_flags()],
                     backend="tensorflow")
    assert result.returncode == 0, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert plan["backend"]["backend"] == "jax" and "--distribution fsdp" in plan["backend"]["chosen_by"]


_FAULTS_SCRIPT = """
import ctypes, resource, sys
from ultimate_trainer import backend
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] != "default":
    assert backend.tune_allocator(environ={})
if sys.argv[1] in ("generator", "generator+callback"):
    import tensorflow as tf  # a streaming pipeline's first element: tf.data builds its from_generator kernel
    next(iter(tf.data.Dataset.from_generator(lambda: iter([1]), output_signature=tf.TensorSpec((), tf.int32))))
if sys.argv[1] == "generator+callback":
    from ultimate_trainer.training.callbacks import KeepAllocatorSettings
    KeepAllocatorSettings().on_train_batch_begin(0)
def step():  # what a train step does to the heap: 512 MiB of buffers made, written, freed
    blocks = [libc.malloc(16 << 20) for _ in range(32)]
    for block in blocks:
        ctypes.memset(block, 1, 16 << 20)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


_FAULTED_PAGES = 3 * 512 * 2**20 // 4096  # every page of three steps' buffers


def _faults(mode):
    done = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_tuned_allocator_stops_refaulting_freed_memory_every_step():
    default, tuned = _faults("default"), _faults("tuned")
    assert default > _FAULTED_PAGES / 2  # glibc hands the freed blocks back and faults them in again
    assert tuned < _FAULTED_PAGES / 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_allocator_callback_undoes_tf_datas_reset():
    pytest.importorskip("tensorflow")
    # tf.data's from_generator kernel sets the mmap threshold to 128 KiB, undoing tune_allocator...
    assert _faults("generator") > _FAULTED_PAGES / 2
    # ...and the callback the trainer adds to fit and evaluate puts the settings back.
    assert _faults("generator+callback") < _FAULTED_PAGES / 20


def test_tune_allocator_leaves_a_user_setting_alone(monkeypatch):
    assert backend_lib.tune_allocator(environ={"MALLOC_TRIM_THRESHOLD_": "0"}) is False
    assert backend_lib.tune_allocator(environ={"LD_PRELOAD": "/usr/lib/libjemalloc.so"}) is False
    monkeypatch.setattr(sys, "platform", "darwin")
    assert backend_lib.tune_allocator(environ={}) is False


def test_quiet_start_holds_back_native_logs_and_replays_them_on_failure(capfd):
    import os

    from ultimate_trainer.backend import quiet_start

    with quiet_start():
        os.write(2, b"I0000 oneDNN custom operations are on\n")  # as C++ logging writes: straight to fd 2
    assert capfd.readouterr().err == ""
    with pytest.raises(ImportError):
        with quiet_start():
            os.write(2, b"E0000 failed call to cuInit\n")
            raise ImportError("no module")
    assert "failed call to cuInit" in capfd.readouterr().err  # a failed start shows what was held back
    with quiet_start(enabled=False):  # --verbose
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"
