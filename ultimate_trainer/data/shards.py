"""Pre-tokenized shards: flat token files written once, read by memmap.

`prepare_shards` tokenizes a source into `train-NNNNN.bin` / `val-NNNNN.bin`
files of uint16 (vocab below 65,536) or uint32 token ids, one EOS after each
document, plus `meta.json` (token counts, dtype, the tokenizer's
fingerprint) and the tokenizer itself. `meta.json` is written last, so a
directory without it was never finished.

Training reads windows straight from the memmapped files. The window order of
each epoch is a stateless pseudorandom permutation
(`tf.random.experimental.index_shuffle`, seeded by (seed, epoch)), so any
window's position is computed, not replayed: resuming at window n costs
nothing, and no permutation is ever held in memory.
"""

import json
import os
from pathlib import Path

import numpy as np

from ultimate_trainer.errors import UserError

META_FILE = "meta.json"
FORMAT = "ultimate_trainer.shards/1"
DEFAULT_SHARD_TOKENS = 100_000_000


def _dtype_for(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class _ShardWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    def __init__(self, directory, split, dtype, shard_tokens):
        self.directory, self.split, self.dtype, self.shard_tokens = Path(directory), split, dtype, shard_tokens
        self.files = []
        self._handle = None
        self._in_shard = 0

    def _open(self):
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append({"name": name, "tokens": 0})
        self._handle = open(self.directory / (name + ".tmp"), "wb")
        self._in_shard = 0

    def _close(self):
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            name = self.files[-1]["name"]
            os.replace(self.directory / (name + ".tmp"), self.directory / name)
            self._handle = None

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._handle is None or self._in_shard == self.shard_tokens:
                self._close()
                self._open()
            take = min(len(tokens), self.shard_tokens - self._in_shard)
            self._handle.write(tokens[:take].tobytes())
            self._in_shard += take
            self.files[-1]["tokens"] += take
            tokens = tokens[take:]

    def finish(self):
        self._close()
        return {"files": self.files, "tokens": sum(f["tokens"] for f in self.files)}


def prepare_shards(directory, tokenizer, splits, source, shard_tokens=DEFAULT_SHARD_TOKENS, log=print):
    """Tokenizes `splits` ({"train": records, "val": records}) into shards in `directory`.

    Example:
        prepare_shards("data/pydoc", ByteTokenizer(), {"train": train, "val": val}, "pydoc")
    """
    directory = Path(directory)
    if (directory / META_FILE).exists():
        raise UserError(f"{directory} already holds prepared shards; choose a new directory (nothing was changed)")
    directory.mkdir(parents=True, exist_ok=True)
    dtype = _dtype_for(tokenizer.vocab_size)
    meta = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "source": source,
        "tokenizer": dict(tokenizer.describe(), fingerprint=tokenizer.fingerprint()),
        "splits": {},
    }
    for split, records in splits.items():
        writer = _ShardWriter(directory, split, dtype, shard_tokens)
        documents = 0
        for text in records:
            writer.write(tokenizer.encode(text) + [tokenizer.eos_id])
            documents += 1
        meta["splits"][split] = dict(writer.finish(), documents=documents)
        log(f"{split}: {documents:,} documents -> {meta['splits'][split]['tokens']:,} tokens "
            f"in {len(meta['splits'][split]['files'])} shard(s)")
    tokenizer.save(directory)
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / META_FILE)
    return meta


def has_meta(directory):
    """True once `prepare_shards` has finished writing `directory`."""
    return (Path(directory) / META_FILE).is_file()


def read_meta(directory):
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise UserError(
            f"--data-dir {directory}: no such directory; make it with "
            f"`ultimate-trainer prepare-data --data-dir {directory}`"
        )
    if not path.is_file():
        raise UserError(
            f"--data-dir {directory}: no {META_FILE}; prepare shards with "
            f"`ultimate-trainer prepare-data --data-dir {directory}` (an interrupted preparation leaves none)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"--data-dir {directory}: {META_FILE} is corrupt; prepare the shards again") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"--data-dir {directory}: unknown shard format {meta.get('format')!r}; expected {FORMAT}")
    return meta


def check_tokenizer(meta, tokenizer, directory):
    """Refuses shards made with a different tokenizer than the run's."""
    made_with = meta["tokenizer"]["fingerprint"]
    if made_with != tokenizer.fingerprint():
        raise UserError(
            f"--data-dir {directory} was tokenized with a different tokenizer ({meta['tokenizer']['kind']}, "
            f"fingerprint {made_with[:12]}) than this run's ({tokenizer.describe()['kind']}, "
            f"{tokenizer.fingerprint()[:12]}); drop --tokenizer-path to use the shards' own tokenizer, "
            f"or prepare the shards again with this one"
        )


class TokenStore:
    """One split's shards as a single token array, read by memmap.

    Example:
        store = TokenStore("data/pydoc", "train")
        store.read(np.array([0, 1000]), 257)   # two windows, int32 [2, 257]
    """

    def __init__(self, directory, split, meta=None):
        directory = Path(directory)
        meta = meta or read_meta(directory)
        if split not in meta["splits"]:
            raise UserError(f"--data-dir {directory} has no {split!r} split")
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size = meta["tokenizer"]["vocab_size"]
        files = meta["splits"][split]["files"]
        self.arrays = []
        for f in files:
            path = directory / f["name"]
            expected = f["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                size = path.stat().st_size if path.is_file() else "missing"
                raise UserError(
                    f"--data-dir {directory}: shard {f['name']} is corrupt ({size} bytes, expected {expected}); "
                    f"prepare the shards again"
                )
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.total = int(self.starts[-1])
        self._check_sample(directory)

    def _check_sample(self, directory):
        # A full scan of 100B tokens would take minutes; a sample of each shard catches garbage.
        for array, f in zip(self.arrays, range(len(self.arrays))):
            sample = np.asarray(array[: 1 << 20])
            if len(sample) and int(sample.max()) >= self.vocab_size:
                raise UserError(
                    f"--data-dir {directory}: shard {f} holds token id {int(sample.max())} outside the "
                    f"vocab of {self.vocab_size}; prepare the shards again"
                )

    def read(self, offsets, length):
        """Windows of `length` tokens starting at each global offset, int32 `[n, length]`."""
        out = np.empty((len(offsets), length), dtype=np.int32)
        for row, offset in enumerate(np.asarray(offsets, dtype=np.int64)):
            shard = int(np.searchsorted(self.starts, offset, side="right") - 1)
            filled, position = 0, offset - self.starts[shard]
            while filled < length:  # a window may span two shards
                chunk = self.arrays[shard][position : position + length - filled]
                out[row, filled : filled + len(chunk)] = chunk
                filled += len(chunk)
                shard, position = shard + 1, 0
        return out


def shard_train_dataset(store, seq_len, batch_size, stride=None, seed=0, start_window=0):
    """Endless batches `(inputs, targets)` from shards, starting at global window `start_window`."""
    # heavy: tensorflow takes seconds to load; prepare-data and the plan use this module without it
    import tensorflow as tf

    # heavy: pipeline loads tensorflow
    from ultimate_trainer.data.pipeline import window_step, windows_in

    window, step = window_step(seq_len, stride)
    per_epoch = windows_in(store.total, window, step)
    if per_epoch < 1:
        raise UserError(f"the shards hold {store.total} tokens, fewer than one window of {window}")

    def offsets(n):
        epoch, index = n // per_epoch, n % per_epoch
        seed_pair = tf.stack([tf.constant(seed, tf.int64), epoch])
        shuffled = tf.random.experimental.index_shuffle(index, seed=seed_pair, max_index=per_epoch - 1)
        return tf.cast(shuffled, tf.int64) * step

    return _batches_at(store, offsets, start_window, batch_size, window)


def _batches_at(store, offsets, start_window, batch_size, window):
    """Endless batches of the windows that start at token `offsets(n)` for global
    windows n = start_window, start_window + 1, ..., read from the memmap."""
    # heavy: tensorflow takes seconds to load; prepare-data and the plan use this module without it
    import tensorflow as tf

    def read(batch_offsets):
        rows = tf.numpy_function(lambda o: store.read(o, window), [batch_offsets], tf.int32)
        rows.set_shape([batch_size, window])
        return rows[:, :-1], rows[:, 1:]

    ds = tf.data.Dataset.range(start_window, 2**62).map(offsets).batch(batch_size, drop_remainder=True)
    return ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def shard_row_dataset(store, seq_len, rows, start_window=0):
    """Endless batches `(inputs, targets)` `[rows, seq_len]` for TTT state passing:
    the split's tokens cut into `rows` contiguous streams, row r reading
    stream r in order, each window starting at the previous one's last target;
    each epoch restarts the streams. Global window n is row n % rows of step
    n // rows, so resuming at window n costs nothing."""
    # heavy: pipeline loads tensorflow
    from ultimate_trainer.data.pipeline import window_step, windows_in

    window, step = window_step(seq_len, None)
    row_tokens = store.total // rows
    per_row = windows_in(row_tokens, window, step)
    if per_row < 1:
        raise UserError(
            f"--state-passing: the shards' {store.total:,} tokens cut into {rows} streams (one per batch row) "
            f"leave fewer than one window of {window} tokens each; lower --batch-size or --seq-len"
        )

    def offsets(n):
        r = n % (per_row * rows)
        return (r % rows) * row_tokens + (r // rows) * step

    return _batches_at(store, offsets, start_window, rows, window)


def shard_eval_dataset(store, seq_len, batch_size):
    """One ordered pass over the split in non-overlapping windows."""
    # heavy: tensorflow takes seconds to load; prepare-data and the plan use this module without it
    import tensorflow as tf

    # heavy: pipeline loads tensorflow
    from ultimate_trainer.data.pipeline import windows_in

    window = seq_len + 1
    count = windows_in(store.total, window, window)

    def read(batch_offsets):
        rows = tf.numpy_function(lambda o: store.read(o, window), [batch_offsets], tf.int32)
        rows.set_shape([None, window])
        return rows[:, :-1], rows[:, 1:]

    ds = tf.data.Dataset.range(count).map(lambda i: i * window).batch(batch_size)
    return ds.map(read).prefetch(tf.data.AUTOTUNE)


def shard_state(next_window, windows_per_epoch, seed):
    return {
        "kind": "shards",
        "next_window": int(next_window),
        "epoch": int(next_window // windows_per_epoch),
        "windows_per_epoch": int(windows_per_epoch),
        "seed": int(seed),
        "shuffle": {"kind": "index_shuffle"},
    }
