"""A run's training and validation input: streamed from text, or read from shards.

Both kinds answer the same questions (tokens and windows per epoch, the
datasets, the position to store in a checkpoint), so the plan and the
trainer do not care which one they hold.
"""

from ultimate_trainer import config as config_lib
from ultimate_trainer.data import pipeline, shards, sources, tokenizers
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



class UnreadInputs:
    """The input of a dry run whose data cannot be read here: shards not
    prepared yet, or a Hugging Face dataset without network. The windows are
    known from the flags; token, record and window counts are not (None).

    Example:
        UnreadInputs("allenai/c4 (en) split train", "the Hugging Face Hub is not reachable", 2048, None)
    """

    kind = "unread"

    def __init__(self, source, reason, seq_len, stride, rows=None):
        self.source, self.reason, self.rows = source, reason, rows
        self.window, self.step = pipeline.window_step(seq_len, stride)
        self.train_tokens = self.val_tokens = self.windows_per_epoch = self.val_windows = None
        self.windows_per_row = None

    def describe(self):
        return {"kind": self.kind, "source": self.source, "train_records": None, "val_records": None,
                "not_read": self.reason}


class PlannedTokenizer:
    """The tokenizer a run will have, for a plan made before it exists (its
    data is not read): kind and vocab size only; it encodes nothing.

    Example:
        PlannedTokenizer("sentencepiece", 32000, "trained on the data when the run starts").vocab_size  # 32000
    """

    def __init__(self, kind, vocab_size, how):
        self.kind, self.vocab_size, self.how = kind, vocab_size, how

    def describe(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "planned": self.how}


def unread_inputs(cfg, rows=None):
    """`(tokenizer, UnreadInputs)` for a dry run whose data cannot be read
    here, or None when it can. The vocab comes from the flags
    (`config.planned_vocab_size`), a --tokenizer-path is loaded as usual.

    Example:
        tokenizer, inputs = unread_inputs(cfg) or load_inputs(cfg)
    """
    d, t = cfg.data, cfg.tokenizer
    if d.data_dir:
        if shards.has_meta(d.data_dir):
            return None
        source = f"shards in {d.data_dir}"
        reason = (f"they are not prepared yet (make them with "
                  f"`ultimate-trainer prepare-data --data-dir {d.data_dir}`)")
        kind, how = "the shards'", "whichever the shards are made with (the plan takes its size from --vocab-size)"
    else:
        why = sources.hub_unavailable(d)
        if why is None:
            return None
        source, reason = sources.describe(d), f"the Hugging Face Hub is not reachable ({why})"
        kind, how = t.tokenizer, "trained on the data when the run starts"
    if t.tokenizer_path:
        tokenizer = tokenizers.make_tokenizer(t, log=lambda line: None)
    elif not d.data_dir and t.tokenizer == "byte":
        tokenizer = tokenizers.ByteTokenizer()
    elif t.auto_vocab_size:
        raise UserError(
            f"--dry-run: {source} cannot be read here, as {reason}, and --auto-vocab-size picks the vocab size "
            f"from it; pass --vocab-size N to plan the run, or dry-run where the data can be read"
        )
    else:
        tokenizer = PlannedTokenizer(kind, config_lib.planned_vocab_size(cfg), how)
    return tokenizer, UnreadInputs(source, reason, cfg.model.seq_len, cfg.loader.stride, rows)
