"""Manifests, verification, the `latest` pointer and its fallback, and kill -9 during a save."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO
from ultimate_trainer.checkpoint import store
from ultimate_trainer.checkpoint.resume import find_checkpoint
from ultimate_trainer.checkpoint.store import CorruptCheckpoint, verify_checkpoint
from ultimate_trainer.errors import UserError


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path, saver):
    path = saver(tmp_path, "checkpoint-3", 3, latest=True)
    manifest = json.loads((path / store.MANIFEST_FILE).read_text())
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [n for n in on_disk if n != store.MANIFEST_FILE]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["step"] == 3 and verify_checkpoint(path)["files"] == manifest["files"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3"


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / store.MODEL_FILE).write_bytes((p / store.MODEL_FILE).read_bytes()[:100]),
         r"model.keras has 100 bytes, the manifest says [\d,]+ \(truncated or partly copied\)"),
        (lambda p: _flip_last_byte(p / store.MODEL_FILE), "model.keras does not match its SHA-256"),
        (lambda p: (p / store.STATE_FILE).unlink(), "trainer_state.json is missing"),
        (lambda p: (p / store.MANIFEST_FILE).write_text('{"files": {"model.keras": 12'),
         "manifest.json is damaged"),
        (lambda p: (p / store.MANIFEST_FILE).write_text('{"files": ["model.keras"]}'), "manifest.json is damaged"),
        (lambda p: (p / store.MANIFEST_FILE).unlink(), "no manifest.json, so it cannot be verified"),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_name(tmp_path, saver, damage, message):
    path = saver(tmp_path, "checkpoint-5", 5)
    damage(path)
    with pytest.raises(CorruptCheckpoint, match=message):
        verify_checkpoint(path)
    if (path / store.STATE_FILE).is_file():
        with pytest.raises(UserError, match=message):  # named outright: refused, never swapped
            find_checkpoint(str(path), tmp_path)
    with pytest.raises(UserError, match=message):
        store.load_model(path)


def test_latest_falls_back_to_the_newest_valid_checkpoint_and_says_so(tmp_path, saver):
    for step in (2, 4, 6):
        saver(tmp_path, f"checkpoint-{step}", step, latest=True)
    logged = []
    assert find_checkpoint("latest", tmp_path, logged.append) == tmp_path / "checkpoint-6" and not logged
    _flip_last_byte(tmp_path / "checkpoint-6" / store.MODEL_FILE)
    (tmp_path / "checkpoint-4" / store.MANIFEST_FILE).write_text("garbage")
    assert find_checkpoint("latest", tmp_path, logged.append) == tmp_path / "checkpoint-2"
    assert "2 checkpoint(s) failed verification" in logged[0] and "checkpoint-6" in logged[0]
    assert "falling back to" in logged[0] and logged[0].endswith("the newest valid one")
    assert find_checkpoint(str(tmp_path), tmp_path, logged.append) == tmp_path / "checkpoint-2"  # a run dir, too
    _flip_last_byte(tmp_path / "checkpoint-2" / store.MODEL_FILE)
    with pytest.raises(UserError, match="holds no valid checkpoint; the newest: --resume-from latest"):
        find_checkpoint("latest", tmp_path, logged.append)


def test_a_pointer_to_a_missing_checkpoint_falls_back(tmp_path, saver):
    saver(tmp_path, "checkpoint-2", 2, latest=True)
    (tmp_path / "latest").write_text("checkpoint-9\n")
    logged = []
    assert find_checkpoint("latest", tmp_path, logged.append) == tmp_path / "checkpoint-2"
    assert "names checkpoint-9, which is not a complete checkpoint" in logged[0]


SAVE_LOOP = textwrap.dedent(
    """
    import sys
    import keras
    from ultimate_trainer.checkpoint import store
    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.data.tokenizers import ByteTokenizer
    from ultimate_trainer.models.causal_lm import build_causal_lm

    cfg = resolve_config({"model.d_model": 64, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 128})
    model = build_causal_lm(cfg.model, 258)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    step = int(sys.argv[2])
    while True:
        step += 1
        store.save_checkpoint(model, ByteTokenizer(), cfg, sys.argv[1], f"checkpoint-{step}", {"step": step},
                              latest=True)
        print(step, flush=True)
    """
)


def test_kill_9_during_saves_leaves_latest_and_every_checkpoint_valid(tmp_path):
    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP)
    out = tmp_path / "run"
    out.mkdir()
    step = 0
    for delay in (0.05, 0.13, 0.29):  # several moments inside a save (each takes ~0.1-0.3 s)
        proc = subprocess.Popen([sys.executable, str(script), str(out), str(step)], cwd=REPO,
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        for _ in range(2):  # let it finish two saves, then kill it somewhere in the next
            step = int(proc.stdout.readline())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        latest = store.read_latest(out)
        assert latest is not None and verify_checkpoint(latest)
        for checkpoint in out.glob("checkpoint-*"):
            verify_checkpoint(checkpoint)  # the rename is the commit: no visible checkpoint is partial
        assert find_checkpoint("latest", out, print) == latest
