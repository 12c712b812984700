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


# The tests that take minutes, longest first (measured with --durations on the 2-core CI machine).
# They start first, so that under pytest-xdist no worker is left with one of them at the end while
# the other idles; everything else keeps its order.
LONGEST_FIRST = (
    "tests/test_default_run.py",
    "tests/test_docs.py::test_guide_commands_run_as_written[quickstart.md]",
    "tests/test_docs.py::test_guide_commands_run_as_written",
    "tests/test_distribution.py::test_two_process",
    "tests/test_guide_commands.py::test_guide_command_runs",
    "tests/training/test_backend_parity.py",
    "tests/test_distribution.py",
    "tests/data/test_tokenizers.py::test_cli",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: the same order on every xdist worker


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


def run_main(args, env=None):
    """Runs `ultimate_trainer.cli.main(ARGS)` in this process; returns a CompletedProcess as run_cli does.

    For tests of what the CLI decides (errors, plans, the run's outputs): it saves the
    seconds of imports a `python -m` start-up costs. What only a real process shows (the
    exit status, stdout without start-up noise, signals) stays with run_cli. Keras'
    global distribution and dtype policy, which a run sets, are put back afterwards.

    Example:
        result = run_main(["--d-model", "0", "--dry-run"])
        assert result.returncode == 2 and "--d-model" in result.stderr
    """
    import contextlib
    import io
    import subprocess

    import keras

    from ultimate_trainer.cli import main

    out, err = io.StringIO(), io.StringIO()
    distribution, policy = keras.distribution.distribution(), keras.mixed_precision.global_policy()
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's --help
                code = e.code
    finally:
        keras.distribution.set_distribution(distribution)
        keras.mixed_precision.set_global_policy(policy)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


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
