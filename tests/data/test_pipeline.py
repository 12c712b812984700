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
    _tokenized,
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


@pytest.mark.parametrize("seq_len,stride", [(4, None), (4, 0), (4, 2), (7, 6), (16, 3), (200, None)])
def test_pack_matches_numpy_reference(seq_len, stride):
    window, step = window_step(seq_len, stride)
    got = np.array([w.numpy() for w in pack(_tokenized(RECORDS, TOK, repeat=False), window, step)])
    expected = reference_windows(RECORDS, window, step)
    assert got.reshape(-1, window).shape == expected.shape
    np.testing.assert_array_equal(got.reshape(-1, window), expected)
    assert len(expected) == windows_in(count_stream_tokens(RECORDS, TOK), window, step)


def test_window_step_arithmetic():
    assert window_step(256, None) == (257, 257)
    assert window_step(256, 64) == (257, 193)
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
    windows = reference_windows(records, 5, 5)
    got = np.concatenate([np.concatenate([x, y[:, -1:]], axis=1) for x, y in batches])
    np.testing.assert_array_equal(got, windows)
    assert batches[-1][0].shape[0] == len(windows) % 3 or len(windows) % 3 == 0
