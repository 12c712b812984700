"""Exact resume and graceful interruption, through the CLI: in process, but for the signal."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run_main, tiny_model_flags

FLAGS = [*tiny_model_flags(), "--dropout-rate", "0.1", "--log-every", "1", "--eval-every", "1000"]


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# With TTT state passing, the checkpoint must also restore each row's carried inner state
# and the position in each row's stream.
STATE_PASSING = ["--ttt-layer-type", "linear", "--ttt-mini-batch-size", "8", "--state-passing"]


# The default run keeps the stream variant; the shards and TTT variants (about
# 60 and 95 s) run in the slow step, which keeps the default run inside its budget.
@pytest.mark.parametrize("source, ttt", [("stream", False),
                                         pytest.param("shards", False, marks=pytest.mark.slow),
                                         pytest.param("stream", True, marks=pytest.mark.slow)])
def test_resume_continues_with_identical_losses(tmp_path, source, ttt):
    extra = STATE_PASSING if ttt else []
    if source == "shards":
        data = tmp_path / "shards"
        assert run_main(["prepare-data", "--data-dir", str(data), "--max-train-examples", "30"]).returncode == 0
        extra = [*extra, "--data-dir", str(data)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    # In process: that the resumed state is whole, not inherited from the process, is
    # checked by the bucket resume in a new process (tests/checkpoint/test_cloud.py).
    a = run_main([*FLAGS, *extra, "--max-steps", "6", "--save-every", "100", "--output-dir", str(straight)])
    assert a.returncode == 0, a.stderr[-2000:]
    b = run_main([*FLAGS, *extra, "--max-steps", "6", "--save-every", "3", "--output-dir", str(split)])
    assert b.returncode == 0, b.stderr[-2000:]
    (split / "checkpoint-6").rename(split / "ignored-6")  # pretend the run died after step 3
    (split / "metrics.jsonl").write_text("")
    c = run_main([*FLAGS, *extra, "--max-steps", "6", "--save-every", "3", "--output-dir", str(split),
                  "--resume-from", "latest"])
    assert c.returncode == 0, c.stderr[-2000:]
    assert "resumed from" in c.stdout and "at step 3" in c.stdout
    want, got = _losses(straight), _losses(split)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)


def test_sigint_saves_a_resumable_checkpoint_and_exits_0(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ultimate_trainer", *FLAGS, "--max-steps", "100000", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("step ") and "/100000 |" in line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "finishing the current step" in stdout and "--resume-from" in stdout
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "model.keras").is_file()
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    resumed = run_main([*FLAGS, "--max-steps", str(step + 2), "--output-dir", str(out), "--resume-from",
                        str(checkpoints[0]), "--allow-changed-config", "max_steps"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint-{step + 2}" in resumed.stdout

