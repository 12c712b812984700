"""The streaming tf.data input: tokenize in the graph, pack, shuffle, batch.

The same `tf.data.Dataset` feeds `model.fit` on jax, torch and tensorflow.
"""

import tensorflow as tf


def window_step(seq_len, stride):
    """Windows hold seq_len + 1 tokens (inputs plus the shifted targets) and
    start every `window - stride` tokens, so consecutive windows share
    `stride` tokens."""
    window = seq_len + 1
    return window, window - (stride or 0)


def windows_in(num_tokens, window, step):
    """How many full windows a stream of `num_tokens` tokens yields.

    Example:
        >>> windows_in(10, 4, 3)   # starts 0, 3, 6
        3
    """
    return 0 if num_tokens < window else (num_tokens - window) // step + 1


def count_stream_tokens(records, tokenizer):
    """Tokens in one pass over `records`, one EOS after each document."""
    return sum(tokenizer.count_tokens(text) + 1 for text in records)


def _tokenized(records, tokenizer, repeat):
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(records, tf.string))
    if repeat:
        ds = ds.repeat()
    eos = tf.constant([tokenizer.eos_id], tf.int32)
    return ds.map(
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


def _split(batch):
    return batch[:, :-1], batch[:, 1:]


def train_dataset(records, tokenizer, seq_len, batch_size, stride=None, shuffle_buffer_size=10000, seed=0):
    """Endless shuffled batches `(inputs, targets)`, each `[batch, seq_len]` int32.

    Example:
        ds = train_dataset(["some text"] * 100, ByteTokenizer(), 8, 4)
        x, y = next(iter(ds))   # y is x shifted left by one token
    """
    window, step = window_step(seq_len, stride)
    ds = pack(_tokenized(records, tokenizer, repeat=True), window, step)
    ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(_split)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(records, tokenizer, seq_len, batch_size):
    """One ordered pass over `records` in non-overlapping windows; the last batch may be short."""
    window, step = window_step(seq_len, None)
    ds = pack(_tokenized(records, tokenizer, repeat=False), window, step)
    return ds.batch(batch_size).map(_split).prefetch(tf.data.AUTOTUNE)
