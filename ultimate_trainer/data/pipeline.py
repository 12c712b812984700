"""The streaming tf.data input: tokenize in the graph, pack, shuffle, batch.

The same `tf.data.Dataset` feeds `model.fit` on jax, torch and tensorflow.

Every window of the endless training stream has a global index n, and the
stream is a pure function of (records, tokenizer, seed): the packing restarts
at each epoch (the tail of an epoch that does not fill a window is dropped),
so epoch e holds exactly `windows_per_epoch` windows, and the shuffle permutes
consecutive blocks of `shuffle_buffer_size` windows with a stateless seed
(seed, block). So the pipeline's state is one number, the next window to
read, and `train_dataset(..., start_window=n)` yields exactly the batches an
uninterrupted stream yields from window n on: it skips whole epochs at the
record level and re-packs only the current block's epoch up to n.
"""

import itertools
import json

import tensorflow as tf


def window_step(seq_len, stride):
    """Windows hold seq_len + 1 tokens (inputs plus the shifted targets) and
    start every `stride` tokens (the CLI guide's "sequence stride"), by
    default `seq_len`: each window's first input is the previous window's
    last target, so every token after the first is a target exactly once.

    Example:
        >>> window_step(256, None), window_step(256, 64)
        ((257, 256), (257, 64))
    """
    return seq_len + 1, stride or seq_len


def windows_in(num_tokens, window, step):
    """How many full windows a stream of `num_tokens` tokens yields.

    Example:
        >>> windows_in(10, 4, 3)   # starts 0, 3, 6
        3
    """
    return 0 if num_tokens < window else (num_tokens - window) // step + 1


def count_stream_tokens(records, tokenizer):
    """Tokens in one pass over `records`, one EOS after each document.

    Counted by the same parallel in-graph tokenizer that feeds training, so
    the count is the stream's, and a large corpus is counted on every core.
    """
    sizes = _tokenize(_records_dataset(records), tokenizer).map(lambda t: tf.size(t, tf.int64))
    return int(sizes.reduce(tf.constant(0, tf.int64), lambda total, n: total + n))


# Records cross from Python into the graph in chunks: one generator call per
# record costs more than tokenizing it.
_CHUNK = 256


def _chunks(records):
    chunk = []
    for text in records:
        chunk.append(text)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _records_dataset(records, start=None, stop=None):
    """A dataset of the records' strings (those from index `start` to `stop`, a
    scalar tensor each, when given); a list is embedded, anything else
    (`sources.Records`) is iterated afresh by each pass, so memory stays flat."""
    if isinstance(records, (list, tuple)):
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(records), tf.string))
        return ds if start is None else ds.skip(start).take(stop - start)
    if start is None:
        chunks = tf.data.Dataset.from_generator(
            lambda: _chunks(records), output_signature=tf.TensorSpec([None], tf.string)
        )
    else:
        chunks = tf.data.Dataset.from_generator(
            lambda a, b: _chunks(itertools.islice(records, int(a), int(b))), args=(start, stop),
            output_signature=tf.TensorSpec([None], tf.string),
        )
    return chunks.unbatch()


def _tokenize(text_ds, tokenizer):
    eos = tf.constant([tokenizer.eos_id], tf.int32)
    return text_ds.map(
        lambda text: tf.concat([tokenizer.tf_encode(text), eos], axis=0),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def pack(token_ds, window, step):
    """Packs a stream of 1-D token tensors into `[window]` rows every `step` tokens.

    A `scan` carries the unfinished tail from one document to the next, so
    packing never flattens the stream into single tokens (slow in tf.data)
    and memory stays bounded by the longest document.
    """

    def scan_fn(carry, tokens):
        buffer = tf.concat([carry, tokens], axis=0)
        frames = tf.signal.frame(buffer, window, step, axis=0)
        consumed = tf.shape(frames)[0] * step
        return buffer[consumed:], frames

    return token_ds.scan(tf.zeros([0], tf.int32), scan_fn).unbatch()


def _epoch_windows(records, tokenizer, window, step, first_epoch):
    """Windows of epochs first_epoch, first_epoch + 1, ...; packing restarts each epoch."""
    epochs = tf.data.Dataset.range(first_epoch, 2**62)
    return epochs.flat_map(lambda _: pack(_tokenize(_records_dataset(records), tokenizer), window, step))


def _block_shuffle(window_ds, block_size, seed, first_block):
    """Permutes each block of `block_size` consecutive windows with seed (seed, block)."""

    def shuffle(index, block):
        return tf.random.experimental.stateless_shuffle(block, seed=tf.stack([tf.cast(seed, tf.int64), index]))

    return window_ds.batch(block_size).enumerate(start=first_block).map(shuffle).unbatch()


def _split(batch):
    return batch[:, :-1], batch[:, 1:]


def train_dataset(
    records,
    tokenizer,
    seq_len,
    batch_size,
    stride=None,
    shuffle_buffer_size=10000,
    seed=0,
    start_window=0,
    windows_per_epoch=None,
):
    """Endless shuffled batches `(inputs, targets)`, each `[batch, seq_len]` int32,
    starting at global window `start_window`.

    `windows_per_epoch` is counted from `records` when not given; it must
    be the count for these records, tokenizer and window.

    Example:
        ds = train_dataset(["some text"] * 100, ByteTokenizer(), 8, 4)
        x, y = next(iter(ds))   # y is x shifted left by one token
    """
    window, step = window_step(seq_len, stride)
    if windows_per_epoch is None:
        windows_per_epoch = windows_in(count_stream_tokens(records, tokenizer), window, step)
    if windows_per_epoch < 1:
        raise ValueError(f"the records hold no window of {window} tokens")
    block = min(shuffle_buffer_size, windows_per_epoch)
    first_block = start_window // block
    block_start = first_block * block
    first_epoch, offset = divmod(block_start, windows_per_epoch)
    ds = _epoch_windows(records, tokenizer, window, step, first_epoch).skip(offset)
    ds = _block_shuffle(ds, block, seed, first_block).skip(start_window - block_start)
    ds = ds.batch(batch_size, drop_remainder=True).map(_split)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- a record stream, resumable by its position


def _positioned_chunks(stream):
    """(texts, positions) chunks of a record stream: each record with the JSON of the
    stream's position just before it (where a reopened stream yields that record first)."""
    texts, positions, records = [], [], iter(stream)
    while True:
        position = json.dumps(stream.position())
        text = next(records, None)
        if text is None:
            break
        texts.append(text)
        positions.append(position)
        if len(texts) == _CHUNK:
            yield texts, positions
            texts, positions = [], []
    if texts:
        yield texts, positions


def pack_positioned(token_ds, window, step):
    """`pack`, with each window's start: the position of the record its first token
    comes from, and that token's offset inside the record's tokens.

    `token_ds` yields (tokens, position, first offset) per record; the carry
    keeps, next to the unfinished tail, the position of every record still in
    it, so the start of any window is known without looking back.
    """
    string, int32 = tf.string, tf.int32

    def scan_fn(carry, item):
        buf, doc, off, positions = carry
        tokens, position, base = item
        n, m = tf.shape(tokens)[0], tf.shape(positions)[0]
        buf = tf.concat([buf, tokens], 0)
        doc = tf.concat([doc, tf.fill([n], m)], 0)
        off = tf.concat([off, base + tf.range(n)], 0)
        positions = tf.concat([positions, [position]], 0)
        frames = tf.signal.frame(buf, window, step, axis=0)
        starts = tf.range(tf.shape(frames)[0]) * step
        out = (frames, tf.gather(positions, tf.gather(doc, starts)), tf.gather(off, starts))
        consumed = tf.shape(frames)[0] * step
        doc = doc[consumed:]
        first = tf.cond(tf.size(doc) > 0, lambda: doc[0], lambda: m + 1)  # the earliest record left in the tail
        return (buf[consumed:], doc - first, off[consumed:], positions[first:]), out

    empty = (tf.zeros([0], int32), tf.zeros([0], int32), tf.zeros([0], int32), tf.zeros([0], string))
    return token_ds.scan(empty, scan_fn).unbatch()


def stream_train_dataset(open_stream, tokenizer, seq_len, batch_size, stride=None, block_size=10000, seed=0,
                         start=None, on_block=None):
    """Endless shuffled batches `(inputs, targets)` from a record stream, resumable from a saved
    input position without reading what was consumed.

    `open_stream(position)` opens the record stream (a `streaming` stream or
    mixture) at a saved stream position, or at its start for None. Windows
    are packed as `train_dataset` packs them, and blocks of `block_size`
    windows are permuted with seed (seed, block). `on_block(block, start)`
    is called as each block's first window is packed, with that window's
    start {"stream": position, "offset": tokens}; `start={"block": b, **that,
    "skip": k}` resumes: it reopens the stream there, re-packs block b only,
    and skips its first k shuffled windows. So a resume reads nothing before
    the block and its cost does not grow with what was consumed.

    Example:
        starts = {}
        ds = stream_train_dataset(lambda p: FileStream(files, position=p), tok, 256, 8, block_size=64,
                                  on_block=lambda b, s: starts.__setitem__(b, s))
        again = stream_train_dataset(..., start={"block": 3, **starts[3], "skip": 10})  # window 3 * 64 + 10 on
    """

    window, step = window_step(seq_len, stride)
    start = start or {"block": 0, "stream": None, "offset": 0, "skip": 0}
    first_block, offset = int(start["block"]), int(start["offset"])
    saved = start["stream"]
    chunks = tf.data.Dataset.from_generator(
        lambda: _positioned_chunks(open_stream(None if saved is None else json.loads(json.dumps(saved)))),
        output_signature=(tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.string)),
    )
    eos = tf.constant([tokenizer.eos_id], tf.int32)

    def tokenize(index, item):
        text, position = item
        base = tf.where(index == 0, offset, 0)  # the saved window starts `offset` tokens into its record
        tokens = tf.concat([tokenizer.tf_encode(text), eos], axis=0)[base:]
        return tokens, position, base

    records = chunks.unbatch().enumerate().map(tokenize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    windows = pack_positioned(records, window, step).enumerate(start=first_block * block_size)

    def note(index, item):
        frame, position, token_offset = item
        if on_block is not None:
            def record(i, p, o):
                on_block(int(i) // block_size, {"stream": json.loads(p.numpy().decode()), "offset": int(o)})
                return i

            index = tf.cond(index % block_size == 0,
                            lambda: tf.py_function(record, [index, position, token_offset], tf.int64),
                            lambda: index)
            with tf.control_dependencies([index]):  # the note runs as the window passes
                frame = tf.identity(frame)
        return frame

    ds = _block_shuffle(windows.map(note), block_size, seed, first_block).skip(int(start["skip"]))
    ds = ds.batch(batch_size, drop_remainder=True).map(_split)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(records, tokenizer, seq_len, batch_size):
    """One ordered pass over `records` in windows that tile the targets; the last batch may be short."""
    window, step = window_step(seq_len, None)
    ds = pack(_tokenize(_records_dataset(records), tokenizer), window, step)
    return ds.batch(batch_size).map(_split).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------- state passing: one stream per batch row


def row_bounds(num_records, rows):
    """Record index bounds of `rows` contiguous, near-equal slices of the records.

    Example:
        >>> row_bounds(10, 3)
        [0, 3, 6, 10]
    """
    return [r * num_records // rows for r in range(rows + 1)]


def count_row_tokens(records, tokenizer, bounds):
    """Tokens in each row's slice of the records (`row_bounds`), in one pass."""
    edges = tf.constant(bounds[1:-1], tf.int64)
    rows = len(bounds) - 1
    sizes = _tokenize(_records_dataset(records), tokenizer).map(lambda t: tf.size(t, tf.int64)).enumerate()

    def add(totals, item):
        index, size = item
        row = tf.searchsorted(edges, tf.reshape(index, [1]), side="right")[0]
        return totals + size * tf.one_hot(row, rows, dtype=tf.int64)

    return [int(n) for n in sizes.reduce(tf.zeros([rows], tf.int64), add)]


def row_stream_dataset(records, tokenizer, seq_len, bounds, windows_per_row, start_window=0):
    """Endless batches `(inputs, targets)` `[rows, seq_len]` for TTT state passing:
    row r reads its own slice of the records (`row_bounds`) as one contiguous
    stream, each window starting at the previous one's last target, in order
    (no shuffle); every epoch restarts each stream and reads `windows_per_row`
    windows of it. Global window n is row n % rows of step n // rows.

    Example:
        bounds = row_bounds(len(records), 4)
        per_row = min(windows_in(n, 9, 8) for n in count_row_tokens(records, tok, bounds))
        x, y = next(iter(row_stream_dataset(records, tok, 8, bounds, per_row)))  # [4, 8] each
    """
    rows = len(bounds) - 1
    window, step = window_step(seq_len, None)
    per_epoch = windows_per_row * rows
    first_epoch, offset = divmod(start_window, per_epoch)
    skip_steps = offset // rows
    starts, stops = tf.constant(bounds[:-1], tf.int64), tf.constant(bounds[1:], tf.int64)

    def epoch(e):
        skip = tf.where(e == first_epoch, tf.constant(skip_steps, tf.int64), tf.constant(0, tf.int64))

        def row(r):
            text = _records_dataset(records, starts[r], stops[r])
            return pack(_tokenize(text, tokenizer), window, step).take(windows_per_row).skip(skip)

        return tf.data.Dataset.range(rows).interleave(row, cycle_length=rows, block_length=1)

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
    return ds.batch(rows, drop_remainder=True).map(_split).prefetch(tf.data.AUTOTUNE)


def stream_state(next_window, windows_per_epoch, seed, shuffle_buffer_size):
    """The pipeline's position as stored in a checkpoint."""
    return {
        "kind": "stream",
        "next_window": int(next_window),
        "epoch": int(next_window // windows_per_epoch),
        "windows_per_epoch": int(windows_per_epoch),
        "seed": int(seed),
        "shuffle": {"kind": "block", "block_size": int(min(shuffle_buffer_size, windows_per_epoch))},
    }


def row_state(kind, next_window, windows_per_epoch, rows):
    """The position of a state-passing input (`kind` stream or shards, one stream
    per row) as stored in a checkpoint."""
    return {
        "kind": kind,
        "next_window": int(next_window),
        "epoch": int(next_window // windows_per_epoch),
        "windows_per_epoch": int(windows_per_epoch),
        "rows": int(rows),
        "shuffle": {"kind": "none"},
    }
