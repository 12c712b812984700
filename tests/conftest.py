"""Test setup: the backend comes from KERAS_BACKEND (jax when unset).

`tools/run_tests.py` runs the whole suite on jax and the tests marked
`backends` again on torch and tensorflow.
"""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parent.parent


def run_cli(args, cwd=None, backend=None, timeout=600, env=None):
    """Runs `python -m ultimate_trainer ARGS` in a subprocess; returns CompletedProcess."""
    import subprocess

    env = dict(os.environ, **(env or {}))
    env["KERAS_BACKEND"] = backend or env["KERAS_BACKEND"]
    return subprocess.run(
        [sys.executable, "-m", "ultimate_trainer", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


# What TensorFlow's and XLA's C++ start-up writes unless --verbose (backend.quiet_start).
START_UP_LOGS = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cuInit", "cuda_platform")


def assert_no_start_up_logs(text):
    """Fails naming the first framework start-up log line found in `text`."""
    for line in text.splitlines():
        assert not any(mark in line for mark in START_UP_LOGS), f"start-up log line: {line}"


def tiny_model_flags():
    """A model small enough that a few training steps take seconds."""
    return [
        "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--d-ff", "64",
        "--seq-len", "32", "--batch-size", "4", "--dropout-rate", "0",
    ]


@pytest.fixture(params=["s3", "gcs", "azure"])
def emulator(request, tmp_path):
    """A running storage emulator of each provider (see tests/emulators.py)."""
    from tests.emulators import EMULATORS

    running = EMULATORS[request.param](tmp_path).start()
    yield running
    running.stop()
