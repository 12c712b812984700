"""A run's training and validation input: streamed from text, or read from shards.

Both kinds answer the same questions (tokens and windows per epoch, the
datasets, the position to store in a checkpoint), so the plan and the
trainer do not care which one they hold.
"""

from ultimate_trainer.data import pipeline, shards
from ultimate_trainer.errors import UserError


class StreamInputs:
    """Text records tokenized on the fly by the tf.data pipeline.

    With `rows` (TTT state passing) the training records are cut into that
    many contiguous slices, one stream per batch row, read in order; an
    epoch is as many windows per row as the shortest stream holds.
    """

    kind = "stream"

    def __init__(self, train_records, val_records, tokenizer, source, seq_len, stride, shuffle_buffer_size,
                 rows=None):
        self.train_records, self.val_records = train_records, val_records
        self.tokenizer, self.source = tokenizer, source
        self.seq_len, self.stride, self.shuffle_buffer_size = seq_len, stride, shuffle_buffer_size
        self.rows = rows
        self.window, self.step = pipeline.window_step(seq_len, stride)
        self.val_tokens = pipeline.count_stream_tokens(val_records, tokenizer)
        self.val_windows = pipeline.windows_in(self.val_tokens, self.window, self.window)
        if rows:
            if len(train_records) < rows:
                raise UserError(
                    f"--state-passing gives each of the {rows} batch rows its own stream of documents, but the "
                    f"training data holds {len(train_records)}; lower --batch-size or add data"
                )
            self.bounds = pipeline.row_bounds(len(train_records), rows)
            row_tokens = pipeline.count_row_tokens(train_records, tokenizer, self.bounds)
            self.train_tokens = sum(row_tokens)
            self.windows_per_row = min(pipeline.windows_in(n, self.window, self.step) for n in row_tokens)
            self.windows_per_epoch = self.windows_per_row * rows
        else:
            self.train_tokens = pipeline.count_stream_tokens(train_records, tokenizer)
            self.windows_per_epoch = pipeline.windows_in(self.train_tokens, self.window, self.step)

    def train_dataset(self, batch_size, seed, start_window=0):
        if self.rows:
            return pipeline.row_stream_dataset(self.train_records, self.tokenizer, self.seq_len, self.bounds,
                                               self.windows_per_row, start_window)
        return pipeline.train_dataset(
            self.train_records, self.tokenizer, self.seq_len, batch_size, self.stride, self.shuffle_buffer_size,
            seed, start_window=start_window, windows_per_epoch=self.windows_per_epoch,
        )

    def eval_dataset(self, batch_size):
        return pipeline.eval_dataset(self.val_records, self.tokenizer, self.seq_len, batch_size)

    def state(self, next_window, seed):
        if self.rows:
            return pipeline.row_state(self.kind, next_window, self.windows_per_epoch, self.rows)
        return pipeline.stream_state(next_window, self.windows_per_epoch, seed, self.shuffle_buffer_size)

    def describe(self):
        return {
            "kind": self.kind,
            "source": self.source,
            "train_records": len(self.train_records),
            "val_records": len(self.val_records),
        }


class ShardInputs:
    """Pre-tokenized shards read by memmap (`ultimate-trainer prepare-data`)."""

    kind = "shards"

    def __init__(self, directory, meta, seq_len, stride, rows=None):
        self.directory, self.meta = directory, meta
        self.seq_len, self.stride, self.rows = seq_len, stride, rows
        self.train = shards.TokenStore(directory, "train", meta)
        self.val = shards.TokenStore(directory, "val", meta)
        self.window, self.step = pipeline.window_step(seq_len, stride)
        self.train_tokens, self.val_tokens = self.train.total, self.val.total
        if rows:  # TTT state passing: the tokens cut into one contiguous stream per batch row
            self.windows_per_row = pipeline.windows_in(self.train_tokens // rows, self.window, self.step)
            self.windows_per_epoch = self.windows_per_row * rows
        else:
            self.windows_per_epoch = pipeline.windows_in(self.train_tokens, self.window, self.step)
        self.val_windows = pipeline.windows_in(self.val_tokens, self.window, self.window)

    def train_dataset(self, batch_size, seed, start_window=0):
        if self.rows:
            return shards.shard_row_dataset(self.train, self.seq_len, self.rows, start_window)
        return shards.shard_train_dataset(self.train, self.seq_len, batch_size, self.stride, seed, start_window)

    def eval_dataset(self, batch_size):
        return shards.shard_eval_dataset(self.val, self.seq_len, batch_size)

    def state(self, next_window, seed):
        if self.rows:
            return pipeline.row_state(self.kind, next_window, self.windows_per_epoch, self.rows)
        return shards.shard_state(next_window, self.windows_per_epoch, seed)

    def describe(self):
        return {
            "kind": self.kind,
            "source": f"shards in {self.directory} (from {self.meta['source']})",
            "train_records": self.meta["splits"]["train"]["documents"],
            "val_records": self.meta["splits"]["val"]["documents"],
        }

