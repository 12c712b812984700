"""Packing and windowing against a numpy reference; determinism."""

import numpy as np
import pytest

from ultimate_trainer.data.pipeline import (
    count_stream_tokens,
    eval_dataset,
    pack,
    train_dataset,
    window_step,
    windows_in,
    _records_dataset,
    _tokenize,
)
from ultimate_trainer.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def reference_windows(records, window, step):
    stream = []
    for text in records:
        stream += list(text.encode("utf-8")) + [TOK.eos_id]
    starts = range(0, len(stream) - window + 1, step)
    return np.array([stream[s : s + window] for s in starts], dtype="int32").reshape(-1, window)


RECORDS = ["hello world", "a", "", "ünïcode ✓ text", "x" * 97, "the end"]


@pytest.mark.parametrize("seq_len,stride", [(4, None), (4, 1), (4, 2), (7, 6), (7, 7), (16, 3), (200, None)])
def test_pack_matches_numpy_reference(seq_len, stride):
    window, step = window_step(seq_len, stride)
    got = np.array([w.numpy() for w in pack(_tokenize(_records_dataset(RECORDS), TOK), window, step)])
    expected = reference_windows(RECORDS, window, step)
    assert got.reshape(-1, window).shape == expected.shape
    np.testing.assert_array_equal(got.reshape(-1, window), expected)
    assert len(expected) == windows_in(count_stream_tokens(RECORDS, TOK), window, step)


def test_window_step_arithmetic():
    # --stride is the step between window starts (default --seq-len): the last target of one
    # window is the first input of the next, so every token after the first is a target once.
    assert window_step(256, None) == (257, 256)
    assert window_step(256, 64) == (257, 64)
    assert windows_in(5, 6, 1) == 0 and windows_in(6, 6, 1) == 1 and windows_in(10, 4, 3) == 3


def test_train_batches_shift_targets_and_are_deterministic():
    records = [f"record number {i} " * (i % 7 + 1) for i in range(200)]
    first = [(x.numpy(), y.numpy()) for x, y in train_dataset(records, TOK, 8, 4, seed=3).take(5)]
    again = [(x.numpy(), y.numpy()) for x, y in train_dataset(records, TOK, 8, 4, seed=3).take(5)]
    other = [(x.numpy(), y.numpy()) for x, y in train_dataset(records, TOK, 8, 4, seed=4).take(5)]
    for (x, y), (x2, y2) in zip(first, again):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert any((a[0] != b[0]).any() for a, b in zip(first, other))
    x, y = first[0]
    assert x.shape == (4, 8) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_train_stream_repeats_past_one_epoch():
    batches = list(train_dataset(["tiny corpus"], TOK, 4, 2, shuffle_buffer_size=1).take(50))
    assert len(batches) == 50


def test_eval_dataset_is_ordered_and_keeps_the_short_last_batch():
    records = ["abcdefghij" * 3]
    batches = [(x.numpy(), y.numpy()) for x, y in eval_dataset(records, TOK, 4, 3)]
    windows = reference_windows(records, 5, 4)  # windows tile the targets: step = seq_len
    got = np.concatenate([np.concatenate([x, y[:, -1:]], axis=1) for x, y in batches])
    np.testing.assert_array_equal(got, windows)
    assert batches[-1][0].shape[0] == len(windows) % 3 or len(windows) % 3 == 0


def _batches(ds, n):
    return [np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1) for x, y in ds.take(n)]


@pytest.mark.parametrize("shuffle_buffer_size", [1, 7, 64, 10000])
def test_resume_at_any_window_gives_the_uninterrupted_batches(shuffle_buffer_size):
    records = [f"doc {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(6)]
    args = dict(records=records, tokenizer=TOK, seq_len=8, batch_size=3, stride=6,
                shuffle_buffer_size=shuffle_buffer_size, seed=11)
    straight = np.concatenate(_batches(train_dataset(**args), 60))  # several epochs
    window, step = window_step(8, 6)
    per_epoch = windows_in(count_stream_tokens(records, TOK), window, step)
    assert len(straight) > 3 * per_epoch
    for steps_done in (1, 5, 17, 33):
        resumed = np.concatenate(_batches(train_dataset(**args, start_window=steps_done * 3), 8))
        np.testing.assert_array_equal(resumed, straight[steps_done * 3 : steps_done * 3 + len(resumed)])


def test_each_epoch_holds_every_window_once():
    records = [f"record {i} " * 3 for i in range(30)]
    window, step = window_step(6, None)
    per_epoch = windows_in(count_stream_tokens(records, TOK), window, step)
    # Blocks of one epoch's size line up with the epochs.
    ds = train_dataset(records, TOK, 6, 1, shuffle_buffer_size=per_epoch, seed=1)
    rows = np.concatenate(_batches(ds, 2 * per_epoch))
    expected = sorted(tuple(w) for w in reference_windows(records, window, step))
    for epoch in range(2):
        assert sorted(map(tuple, rows[epoch * per_epoch : (epoch + 1) * per_epoch])) == expected
    assert not np.array_equal(rows[:per_epoch], rows[per_epoch:]), "each epoch has its own order"


class _Reread:
    """A re-iterable source like `sources.Records`: no list, a fresh pass each time."""

    def __init__(self, records):
        self.records, self.passes = records, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.records)


@pytest.mark.parametrize("shuffle_buffer_size", [7, 10000])
def test_a_reread_source_streams_exactly_like_a_list_and_resumes(shuffle_buffer_size):
    records = [f"doc {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(600)]  # > one generator chunk
    source = _Reread(records)
    assert count_stream_tokens(source, TOK) == sum(len(t.encode()) + 1 for t in records)
    args = dict(tokenizer=TOK, seq_len=8, batch_size=3, stride=6, shuffle_buffer_size=shuffle_buffer_size, seed=5)
    from_list = np.concatenate(_batches(train_dataset(records, **args), 40))
    np.testing.assert_array_equal(np.concatenate(_batches(train_dataset(source, **args), 40)), from_list)
    resumed = np.concatenate(_batches(train_dataset(source, **args, start_window=30), 10))
    np.testing.assert_array_equal(resumed, from_list[30:60])
    evaluated = np.concatenate([np.concatenate([x, y[:, -1:]], 1) for x, y in eval_dataset(source, TOK, 8, 4)])
    np.testing.assert_array_equal(evaluated, reference_windows(records, 9, 8))
    assert source.passes >= 4  # read again, never held


def test_sentencepiece_streams_survive_reseeding_after_counting(tmp_path):
    import keras

    from ultimate_trainer.data.tokenizers import SentencePieceTokenizer

    records = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(300)]
    tok = SentencePieceTokenizer.train(records, vocab_size=320)
    source = _Reread(records)
    expected = sum(len(tok.encode(t)) + 1 for t in records)
    assert count_stream_tokens(source, tok) == expected
    keras.utils.set_random_seed(0)  # clears TF's kernel cache, as the trainer does after counting
    x, _ = next(iter(eval_dataset(source, tok, 8, 2)))
    np.testing.assert_array_equal(x.numpy()[0], (tok.encode(records[0]) + [tok.eos_id])[:8])


# ---------------------------------------------------------------- state passing: one stream per row


def _row_reference(records, bounds, seq_len):
    """Each row's windows from numpy: its records' tokens, a window every seq_len tokens."""
    rows = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        stream = []
        for text in records[a:b]:
            stream += list(text.encode("utf-8")) + [TOK.eos_id]
        rows.append([stream[s : s + seq_len + 1] for s in range(0, len(stream) - seq_len, seq_len)])
    return rows


@pytest.mark.parametrize("as_list", [True, False])
def test_row_streams_are_contiguous_and_resume_exactly(as_list):
    from ultimate_trainer.data.pipeline import count_row_tokens, row_bounds, row_stream_dataset

    class Reread:  # like sources.Records: iterated afresh by each pass, read through a generator
        def __iter__(self):
            return iter(records)

        def __len__(self):
            return len(records)

    records = [f"document {i} " + "abc" * (i % 7) for i in range(23)]
    source = records if as_list else Reread()
    bounds = row_bounds(len(records), 3)
    tokens = count_row_tokens(source, TOK, bounds)
    reference = _row_reference(records, bounds, 8)
    assert tokens == [sum(len(t.encode()) + 1 for t in records[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    per_row = min(windows_in(n, 9, 8) for n in tokens)
    assert per_row == min(len(r) for r in reference)
    ds = row_stream_dataset(source, TOK, 8, bounds, per_row)
    batches = [(x.numpy(), y.numpy()) for x, y in ds.take(per_row + 2)]
    for step, (x, y) in enumerate(batches):
        for row in range(3):
            want = np.array(reference[row][step % per_row])  # a new epoch restarts each stream
            np.testing.assert_array_equal(x[row], want[:-1])
            np.testing.assert_array_equal(y[row], want[1:])
    again = [x.numpy() for x, _ in row_stream_dataset(source, TOK, 8, bounds, per_row, start_window=3 * 2).take(3)]
    for got, (want, _) in zip(again, batches[2:5]):
        np.testing.assert_array_equal(got, want)


def test_shard_rows_are_contiguous_and_resume_exactly(tmp_path):
    from ultimate_trainer.data.shards import TokenStore, prepare_shards, shard_row_dataset

    records = [f"doc {i} " + "xyz" * (i % 5) for i in range(40)]
    prepare_shards(tmp_path, TOK, {"train": records, "val": records[:3]}, "test", shard_tokens=97, log=lambda m: None)
    store = TokenStore(tmp_path, "train")
    flat = np.concatenate([np.asarray(a) for a in store.arrays]).astype("int32")
    rows, seq_len = 4, 8
    row_tokens = len(flat) // rows
    per_row = windows_in(row_tokens, seq_len + 1, seq_len)
    batches = [x.numpy() for x, _ in shard_row_dataset(store, seq_len, rows).take(per_row + 1)]
    for step, x in enumerate(batches):
        for row in range(rows):
            start = row * row_tokens + (step % per_row) * seq_len
            np.testing.assert_array_equal(x[row], flat[start : start + seq_len])
    resumed = next(iter(shard_row_dataset(store, seq_len, rows, start_window=2 * rows)))[0].numpy()
    np.testing.assert_array_equal(resumed, batches[2])


# ---------------------------------------------------------------- a record stream, resumable by its position


class _ListStream:
    """A record stream over a list (position: the next index), logging where it was opened."""

    opened = []

    def __init__(self, records, position=None):
        self.records, self.next = records, 0 if position is None else position["index"]
        _ListStream.opened.append(self.next)

    def __iter__(self):
        while self.next < len(self.records):
            self.next += 1
            yield self.records[self.next - 1]

    def position(self):
        return {"index": self.next}


STREAM_RECORDS = [f"record {i} " + "word " * (i % 13) for i in range(200)]


def _stream_batches(block_size, start=None, on_block=None, n=None, seq_len=8, stride=None):
    import itertools

    from ultimate_trainer.data.pipeline import stream_train_dataset

    ds = stream_train_dataset(lambda p: _ListStream(STREAM_RECORDS, p), TOK, seq_len, 4, stride, block_size, seed=5,
                              start=start, on_block=on_block)
    return [x.numpy() for x, _ in itertools.islice(ds, n)]


@pytest.mark.parametrize("stride", [None, 3])
def test_a_record_stream_packs_as_the_numpy_reference(stride):
    window, step = window_step(8, stride)
    want = reference_windows(STREAM_RECORDS, window, step)
    got = np.concatenate(_stream_batches(1, stride=stride))  # blocks of one window: nothing shuffled
    assert got.shape[0] == want.shape[0] // 4 * 4
    np.testing.assert_array_equal(got, want[: got.shape[0], :-1])


def test_a_record_stream_resumes_from_a_block_start_reading_nothing_before_it():
    starts = {}
    whole = np.concatenate(_stream_batches(16, on_block=lambda b, s: starts.__setitem__(b, s), n=25))
    assert sorted(starts)[:7] == list(range(7))
    for next_window in (16, 17, 40, 63, 64):  # after a block, inside one, at its end
        block = (next_window - 1) // 16
        _ListStream.opened.clear()
        resumed = _stream_batches(16, start={"block": block, **starts[block], "skip": next_window - block * 16},
                                  n=(100 - next_window) // 4)
        assert _ListStream.opened == [starts[block]["stream"]["index"]]  # opened at the saved record, not before
        got = np.concatenate(resumed)
        np.testing.assert_array_equal(got, whole[next_window:next_window + len(got)])
