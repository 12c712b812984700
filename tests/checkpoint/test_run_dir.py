import pytest

from ultimate_trainer.checkpoint.run_dir import prepare_output_dir, run_entries
from ultimate_trainer.errors import UserError


def test_fresh_and_unrelated_dirs_are_used(tmp_path):
    assert prepare_output_dir(tmp_path / "new", overwrite=False) is None
    assert (tmp_path / "new").is_dir()
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(tmp_path, overwrite=False) is None


def test_a_run_is_refused_without_overwrite(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(UserError, match="already holds a run .*--overwrite"):
        prepare_output_dir(tmp_path, overwrite=False)
    assert (tmp_path / "checkpoint-10").is_dir()


def test_overwrite_moves_the_old_run_and_keeps_other_files(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "model.keras").write_text("weights")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_dir(tmp_path, overwrite=True, dry_run=True) is None
    assert (tmp_path / "checkpoint-10").is_dir(), "a dry run moves nothing"
    dest = prepare_output_dir(tmp_path, overwrite=True)
    assert (dest / "checkpoint-10" / "model.keras").read_text() == "weights"
    assert (dest / "metrics.jsonl").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert run_entries(tmp_path) == []


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        prepare_output_dir(tmp_path / "f", overwrite=False)
