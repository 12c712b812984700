"""The CheckpointManager in process: names, the latest pointer, retention, milestones, best,
final_model and uploads, with a fake writer (a checkpoint dir with the files that make it
complete) and a tmp dir."""

import contextlib
import json

from ultimate_trainer.checkpoint.layout import MODEL_FILE, STATE_FILE, checkpoints_in
from ultimate_trainer.checkpoint.manager import CheckpointConfig, CheckpointManager


class FakeUploader:
    def __init__(self, pending=()):
        self.submitted, self.pending = [], list(pending)

    def submit(self, path):
        self.submitted.append(path.name)


def _manager(tmp_path, uploader=None, **config):
    lines, written = [], []

    def write(name, state, replace=False, latest=False):
        written.append((name, state["step"], replace, latest))
        path = tmp_path / name
        path.mkdir(exist_ok=True)
        (path / MODEL_FILE).write_bytes(b"weights")
        (path / STATE_FILE).write_text(json.dumps(state))
        return path

    config = CheckpointConfig(tmp_path, **config)
    manager = CheckpointManager(config, write, lambda step: {"step": step}, lines.append, uploader)
    return manager, lines, written


def test_regular_checkpoints_move_latest_and_are_saved_once_per_step(tmp_path):
    manager, lines, written = _manager(tmp_path)
    first = manager.save(2)
    assert first == tmp_path / "checkpoint-2" and manager.save(2) == first  # the final save after a periodic one
    assert written == [("checkpoint-2", 2, False, True)]
    assert lines == [f"saved {first}"]
    assert manager.last_good() == first


def test_retention_keeps_the_newest_the_resumed_and_the_not_yet_uploaded(tmp_path):
    resumed = tmp_path / "checkpoint-1"
    uploader = FakeUploader()
    manager, lines, _ = _manager(tmp_path, uploader, keep=2, protect=(resumed,))
    manager.save(1)
    for step in (2, 3, 4):
        manager.save(step)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]
    assert f"--save-total-limit 2: removed {tmp_path / 'checkpoint-2'}" in lines
    assert sorted(manager.saved) == [1, 3, 4], "a pruned checkpoint is no longer the last good one"
    uploader.pending = [tmp_path / "checkpoint-3"]  # still uploading: stays on disk
    manager.save(5)
    assert [p.name for p in checkpoints_in(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4",
                                                          "checkpoint-5"]
    assert uploader.submitted == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_without_a_limit_every_checkpoint_stays(tmp_path):
    manager, _, _ = _manager(tmp_path)
    for step in (1, 2, 3):
        manager.save(step)
    assert len(checkpoints_in(tmp_path)) == 3


def test_milestones_best_and_final_model(tmp_path):
    uploader = FakeUploader()
    manager, lines, written = _manager(tmp_path, uploader, keep=1, milestone_every=4)
    assert [manager.milestone_due(s) for s in (3, 4, 8)] == [False, True, True]
    manager.milestone(4)
    manager.save_best(4)
    manager.save(4)
    manager.save(8)  # prunes checkpoint-4, never the milestone or the best
    final = manager.final(tmp_path / "checkpoint-8")
    assert ("milestone-4", 4, False, False) in written and ("best_checkpoint", 4, True, False) in written
    assert (tmp_path / "milestone-4").is_dir() and (tmp_path / "best_checkpoint").is_dir()
    assert final == tmp_path / "final_model"
    assert (final / MODEL_FILE).samefile(tmp_path / "checkpoint-8" / MODEL_FILE), "linked, not copied"
    assert uploader.submitted == ["milestone-4", "best_checkpoint", "checkpoint-4", "checkpoint-8", "final_model"]
    assert f"saved milestone {tmp_path / 'milestone-4'}" in lines
    assert f"best validation loss so far: saved {tmp_path / 'best_checkpoint'}" in lines
    assert f"final model: {final}" in lines
    assert not CheckpointManager(CheckpointConfig(tmp_path), None, None).milestone_due(4), "no --milestone-every"


def test_other_processes_gather_but_do_not_write(tmp_path):
    gathered = []

    @contextlib.contextmanager
    def gather():
        gathered.append("in")
        yield

    manager, lines, written = _manager(tmp_path, chief=False)
    manager.gather = gather
    assert manager.save(3) == tmp_path / "checkpoint-3"
    manager.milestone(3)
    manager.save_best(3)
    assert gathered == ["in", "in", "in"], "every process takes part in each save"
    assert written == [] and not (tmp_path / "checkpoint-3").exists()
    assert lines == [f"best validation loss so far: saved {tmp_path / 'best_checkpoint'}"]  # `say` prints on process 0


def test_config_from_the_output_flags(tmp_path):
    from ultimate_trainer.config import resolve_config

    cfg = resolve_config({"output.save_total_limit": 3, "output.milestone_every": 100})
    config = CheckpointConfig.from_output(cfg.output, tmp_path, chief=True, resume=tmp_path / "checkpoint-5")
    assert (config.keep, config.milestone_every, config.protect) == (3, 100, (tmp_path / "checkpoint-5",))
    assert CheckpointConfig.from_output(resolve_config({}).output, tmp_path).protect == ()


def test_a_checkpoint_at_the_best_step_links_the_best_files_and_outlives_the_next_best(tmp_path):
    manager, lines, written = _manager(tmp_path)
    manager.save_best(10)
    checkpoint = manager.save(10)  # the same step: its weights are on disk already
    assert written == [("best_checkpoint", 10, True, False)]
    best = tmp_path / "best_checkpoint"
    assert (checkpoint / MODEL_FILE).stat().st_ino == (best / MODEL_FILE).stat().st_ino
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-10" and lines[-1] == f"saved {checkpoint}"
    manager.save(20)  # no new best at 20: written
    assert written[-1] == ("checkpoint-20", 20, False, True)
    # A new best replaces best_checkpoint/ (a fresh directory): checkpoint-10's files stay as they were.
    manager.write = lambda name, state, replace=False, latest=False: _replace_with(tmp_path / name, b"better")
    manager.save_best(30)
    assert (checkpoint / MODEL_FILE).read_bytes() == b"weights" and (best / MODEL_FILE).read_bytes() == b"better"


def _replace_with(path, data):
    # As store.save_checkpoint does: a new directory renamed over the old one, never written in place.
    tmp = path.with_name(".tmp")
    tmp.mkdir()
    (tmp / MODEL_FILE).write_bytes(data)
    old = path.with_name(".old")
    path.rename(old)
    tmp.rename(path)
    return path


def test_a_linked_checkpoint_keeps_an_older_one_of_the_same_name_beside_it(tmp_path):
    manager, _, _ = _manager(tmp_path)
    older = tmp_path / "checkpoint-10"
    older.mkdir()
    (older / MODEL_FILE).write_bytes(b"an earlier run's")
    manager.save_best(10)
    manager.save(10)
    assert (older / MODEL_FILE).read_bytes() == b"weights"
    kept = list(tmp_path.glob(".checkpoint-10.replaced-*"))
    assert len(kept) == 1 and (kept[0] / MODEL_FILE).read_bytes() == b"an earlier run's"
