import pytest

from ultimate_trainer.checkpoint.store import MODEL_FILE, STATE_FILE, link_copy, prune_checkpoints
from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError


def _checkpoint(path, complete=True):
    path.mkdir()
    (path / MODEL_FILE).write_text("w")
    if complete:
        (path / STATE_FILE).write_text("{}")
    return path


def test_prune_keeps_the_newest_and_never_touches_others(tmp_path):
    for step in (2, 4, 10, 8):
        _checkpoint(tmp_path / f"checkpoint-{step}")
    _checkpoint(tmp_path / "checkpoint-99", complete=False)  # unfinished: not ours to judge
    _checkpoint(tmp_path / "milestone-4")
    _checkpoint(tmp_path / "best_checkpoint")
    gone = prune_checkpoints(tmp_path, keep=2, protect=[tmp_path / "checkpoint-2"])
    assert sorted(p.name for p in gone) == ["checkpoint-4"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["best_checkpoint", "checkpoint-10", "checkpoint-2", "checkpoint-8", "checkpoint-99", "milestone-4"]


def test_link_copy_shares_the_files_and_replaces_atomically(tmp_path):
    source = _checkpoint(tmp_path / "checkpoint-5")
    final = link_copy(source, tmp_path / "final_model")
    assert (final / MODEL_FILE).samefile(source / MODEL_FILE)
    other = _checkpoint(tmp_path / "checkpoint-6")
    (other / MODEL_FILE).write_text("newer")
    link_copy(other, tmp_path / "final_model")
    assert (tmp_path / "final_model" / MODEL_FILE).read_text() == "newer"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("key", ["output.save_total_limit", "output.milestone_every"])
def test_retention_flags_must_be_positive(key):
    with pytest.raises(UserError, match="must be a positive number"):
        resolve_config({key: 0})
