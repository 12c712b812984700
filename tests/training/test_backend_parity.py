"""Backend parity: the same start weights and data give the same first losses on jax, torch and tensorflow."""

import json

import pytest

from tests.conftest import run_cli, tiny_model_flags

FLAGS = [*tiny_model_flags(), "--log-every", "1", "--eval-every", "1000", "--save-every", "1000"]


@pytest.mark.slow
def test_first_five_losses_agree_across_backends(tmp_path):
    base = tmp_path / "base"
    assert run_cli([*FLAGS, "--max-steps", "1", "--output-dir", str(base)]).returncode == 0
    losses = {}
    for backend in ("jax", "torch", "tensorflow"):
        out = tmp_path / backend
        result = run_cli([*FLAGS, "--max-steps", "5", "--warmup-steps", "1", "--init-from",
                          str(base / "checkpoint-1"), "--output-dir", str(out)], backend=backend)
        assert result.returncode == 0, (backend, result.stderr[-2000:])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["jax"]) == 5
    for backend in ("torch", "tensorflow"):
        assert losses[backend] == pytest.approx(losses["jax"], abs=1e-3), losses
