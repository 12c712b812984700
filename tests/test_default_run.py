"""The README's first command: the nano preset on the embedded default data (slow)."""

import json

import pytest

from tests.conftest import assert_no_start_up_logs, run_cli


@pytest.mark.slow
def test_default_nano_run_learns_and_writes_its_outputs(tmp_path):
    out = tmp_path / "output_ultimate"
    # As the README runs it: no KERAS_BACKEND, so `--backend auto` picks.
    result = run_cli(["--model-preset", "nano"], cwd=tmp_path, timeout=1500, backend="", env={"KERAS_BACKEND": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend chosen by auto: " in result.stdout
    assert_no_start_up_logs(result.stdout + result.stderr)  # a plain run is quiet unless --verbose
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["final_val_loss"] <= 0.7 * summary["initial_val_loss"], summary
    step = summary["steps"]
    for name in ("training_args.json", "ut_tokenizer.json", "metrics.jsonl", "samples.txt",
                 f"checkpoint-{step}/model.keras", f"checkpoint-{step}/ut_tokenizer.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("val_loss" in r for r in records)
