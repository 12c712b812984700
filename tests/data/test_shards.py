"""Pre-tokenized shards: writing, memmap reads, shuffled windows, exact resume, errors."""

import json

import numpy as np
import pytest

from tests.conftest import run_main, tiny_model_flags
from ultimate_trainer.data import shards
from ultimate_trainer.data.pipeline import window_step, windows_in
from ultimate_trainer.data.tokenizers import ByteTokenizer
from ultimate_trainer.errors import UserError

TOK = ByteTokenizer()
TRAIN = [f"training document {i}: " + "words " * (i % 9) for i in range(60)]
VAL = ["held out text one", "held out text two, a little longer"]


def _stream(records):
    return np.array([t for r in records for t in TOK.encode(r) + [TOK.eos_id]], dtype=np.int32)


@pytest.fixture
def prepared(tmp_path):
    # 97 tokens per shard: windows cross shard boundaries.
    shards.prepare_shards(tmp_path / "d", TOK, {"train": TRAIN, "val": VAL}, "test", shard_tokens=97, log=lambda m: None)
    return tmp_path / "d"


def test_prepare_writes_meta_tokenizer_and_exact_tokens(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["fingerprint"] == TOK.fingerprint()
    train = meta["splits"]["train"]
    assert train["documents"] == 60 and train["tokens"] == len(_stream(TRAIN))
    assert len(train["files"]) == -(-train["tokens"] // 97)
    joined = np.concatenate([np.fromfile(prepared / f["name"], dtype=np.uint16) for f in train["files"]])
    np.testing.assert_array_equal(joined, _stream(TRAIN))
    from ultimate_trainer.data.tokenizers import TOKENIZER_FILE

    assert (prepared / TOKENIZER_FILE).is_file()


def test_store_reads_windows_across_shard_boundaries(prepared):
    store = shards.TokenStore(prepared, "train")
    stream = _stream(TRAIN)
    offsets = np.array([0, 90, 96, 97, 194, len(stream) - 40])
    np.testing.assert_array_equal(store.read(offsets, 40), np.stack([stream[o : o + 40] for o in offsets]))


def _rows(ds, n):
    return np.concatenate([np.concatenate([x.numpy(), y.numpy()[:, -1:]], 1) for x, y in ds.take(n)])


def test_each_epoch_is_a_permutation_of_all_windows(prepared):
    store = shards.TokenStore(prepared, "train")
    window, step = window_step(15, 3)
    per_epoch = windows_in(store.total, window, step)
    stream = _stream(TRAIN)
    expected = sorted(tuple(stream[i * step : i * step + window]) for i in range(per_epoch))
    rows = _rows(shards.shard_train_dataset(store, 15, 1, stride=3, seed=5), 2 * per_epoch)
    first, second = rows[:per_epoch], rows[per_epoch:]
    assert sorted(map(tuple, first)) == expected and sorted(map(tuple, second)) == expected
    assert not np.array_equal(first, second)
    again = _rows(shards.shard_train_dataset(store, 15, 1, stride=3, seed=5), per_epoch)
    np.testing.assert_array_equal(again, first)


def test_resume_gives_the_uninterrupted_batches(prepared):
    store = shards.TokenStore(prepared, "train")
    straight = _rows(shards.shard_train_dataset(store, 12, 4, seed=9), 40)
    for steps_done in (1, 13, 29):
        resumed = _rows(shards.shard_train_dataset(store, 12, 4, seed=9, start_window=4 * steps_done), 5)
        np.testing.assert_array_equal(resumed, straight[4 * steps_done : 4 * steps_done + 20])


def test_eval_reads_the_val_split_in_order(prepared):
    store = shards.TokenStore(prepared, "val")
    rows = _rows(shards.shard_eval_dataset(store, 7, 3), 100)
    stream = _stream(VAL)
    expected = np.stack([stream[i * 8 : i * 8 + 8] for i in range(len(stream) // 8)])
    np.testing.assert_array_equal(rows, expected)


def test_refuses_an_existing_shard_dir(prepared):
    before = (prepared / "meta.json").read_text()
    with pytest.raises(UserError, match="already holds prepared shards"):
        shards.prepare_shards(prepared, TOK, {"train": ["x"], "val": ["y"]}, "again")
    assert (prepared / "meta.json").read_text() == before


def test_unfinished_or_corrupt_shards_are_refused(prepared, tmp_path):
    with pytest.raises(UserError, match="no meta.json"):
        shards.read_meta(tmp_path)
    first = prepared / "train-00001.bin"
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(UserError, match="shard train-00001.bin is corrupt"):
        shards.TokenStore(prepared, "train")
    first.write_bytes(np.full(97, 60000, dtype=np.uint16).tobytes())
    with pytest.raises(UserError, match="outside the vocab of 258"):
        shards.TokenStore(prepared, "train")
    (prepared / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is corrupt"):
        shards.read_meta(prepared)


def test_a_different_tokenizer_is_refused(prepared):
    class Other(ByteTokenizer):
        def fingerprint(self):
            return "0" * 64

    with pytest.raises(UserError, match="tokenized with a different tokenizer"):
        shards.check_tokenizer(shards.read_meta(prepared), Other(), prepared)


def test_prepare_data_command_then_train_on_the_shards(tmp_path):
    data = tmp_path / "shards"
    made = run_main(["prepare-data", "--data-dir", str(data), "--max-train-examples", "40", "--shard-tokens", "20000"])
    assert made.returncode == 0, made.stderr[-2000:]
    assert "train with --data-dir" in made.stdout and (data / "meta.json").is_file()
    assert len(list(data.glob("train-*.bin"))) > 1
    again = run_main(["prepare-data", "--data-dir", str(data)])
    assert again.returncode == 2 and "already holds prepared shards" in again.stderr
    out = tmp_path / "run"
    result = run_main([*tiny_model_flags(), "--max-steps", "3", "--data-dir", str(data), "--no-use-streaming",
                       "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shards in" in result.stdout
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["data"]
    assert state["kind"] == "shards" and state["next_window"] == 3 * 4


@pytest.mark.parametrize("args,message", [
    (["--no-use-streaming"], "--no-use-streaming reads pre-tokenized shards: add --data-dir"),
    (["--data-dir", ".", "--tokenize-on-fly"], "pass only one"),
    (["--shard-tokens", "0"], "--shard-tokens must be a positive number"),
])
def test_shard_flag_errors(args, message):
    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.cli import build_parser

    with pytest.raises(UserError, match=message):
        resolve_config(vars(build_parser().parse_args(args)))


def test_prepare_with_a_trained_tokenizer_and_refuse_another(tmp_path):
    data = tmp_path / "sp"
    made = run_main(["prepare-data", "--data-dir", str(data), "--tokenizer", "sentencepiece", "--vocab-size", "400",
                     "--max-train-examples", "40"])
    assert made.returncode == 0, made.stderr[-2000:]
    meta = json.loads((data / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["tokenizer"]["vocab_size"] == 400
    other = tmp_path / "other"
    assert run_main(["prepare-data", "--data-dir", str(other), "--max-train-examples", "5"]).returncode == 0
    refused = run_main([*tiny_model_flags(), "--data-dir", str(data), "--tokenizer-path", str(other),
                        "--max-steps", "1", "--dry-run"])
    assert refused.returncode == 2 and "tokenized with a different tokenizer" in refused.stderr


# --vocab-size may come with --data-dir: it states the shards' tokenizer size (tests/test_recipes.py).
@pytest.mark.parametrize("flag", [["--data-files", "x.txt"], ["--max-train-examples", "5"], ["--tokenizer-model", "unigram"]])
def test_source_flags_are_refused_with_data_dir(tmp_path, flag):
    from ultimate_trainer.cli import build_parser
    from ultimate_trainer.config import resolve_config

    with pytest.raises(UserError, match="does not apply with --data-dir"):
        resolve_config(vars(build_parser().parse_args(["--data-dir", str(tmp_path), *flag])))


def test_shard_tokens_is_refused_in_a_training_run():
    from ultimate_trainer.cli import main

    assert main(["--shard-tokens", "1000", "--dry-run"]) == 2
