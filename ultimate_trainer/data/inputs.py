"""A run's training and validation input: streamed from text, or read from shards.

Both kinds answer the same questions (tokens and windows per epoch, the
datasets, the position to store in a checkpoint), so the plan and the
trainer do not care which one they hold.
"""

import dataclasses
from pathlib import Path

from ultimate_trainer import config as config_lib
from ultimate_trainer.data import pipeline, shards, sources, streamed, tokenizers
from ultimate_trainer.data.streaming import estimate, validation
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



class StreamedInputs:
    """A streamed source (`data.streamed`): read from the first record, no pass before training.

    The epoch is an estimate (`streaming.estimate`), labelled so in
    `describe()`; validation is a bounded set read once
    (`streaming.validation`). The input's state names, for the last shuffle
    block a run has drawn from, where its packing starts in the record
    stream, so a resume re-packs that block only: `resume` is a checkpoint's
    saved state. Every process reads the whole stream today (the trainer
    takes its rows of each global batch); `process_index`/`process_count`
    make each read a disjoint part.

    Example:
        inputs = StreamedInputs(lambda p: open_train_stream(cfg.data, 42, position=p), val, tok,
                                "./c4_copy", estimate, 256, None, 1000)
        ds = inputs.train_dataset(8, 42); inputs.state(16, 42)["block_start"]
    """

    kind = "streamed"

    def __init__(self, open_train, validation, tokenizer, source, estimate, seq_len, stride, shuffle_buffer_size,
                 resume=None, why=None, mix_names=()):
        self.open_train, self.validation, self.tokenizer = open_train, validation, tokenizer
        self.source, self.estimate, self.why = source, estimate, why
        self.mix_names = mix_names
        self.seq_len, self.stride, self.rows = seq_len, stride, None
        self.window, self.step = pipeline.window_step(seq_len, stride)
        self.val_records = list(validation.records)
        self.val_tokens = pipeline.count_stream_tokens(self.val_records, tokenizer)
        self.val_windows = pipeline.windows_in(self.val_tokens, self.window, self.window)
        self.train_tokens = estimate.tokens
        self.windows_per_epoch = pipeline.windows_in(estimate.tokens, self.window, self.step)  # estimated
        # Blocks as StreamInputs cuts them: never longer than an epoch (an unknown one: the buffer size).
        self.block = min(shuffle_buffer_size, self.windows_per_epoch or shuffle_buffer_size)
        self._starts = {}  # block -> where its packing starts; filled as the pipeline packs
        if resume is not None and resume.get("block_start") is not None:
            if resume.get("kind") != self.kind or resume.get("shuffle", {}).get("block_size") != self.block:
                raise UserError(
                    f"the checkpoint's input is {resume.get('kind')} with shuffle blocks of "
                    f"{resume.get('shuffle', {}).get('block_size')} windows, this run's is {self.kind} with "
                    f"{self.block}; resume with the same data flags and --shuffle-buffer-size"
                )
            self._starts[resume["block"]] = resume["block_start"]

    def _noted(self, block, start):
        self._starts[block] = start

    def _block_of(self, next_window):
        """The block a resume at `next_window` re-packs: the one holding window next_window - 1."""
        block = (next_window - 1) // self.block
        if block not in self._starts:
            raise RuntimeError(f"no packing start known for shuffle block {block} (window {next_window}); "
                               f"the input has not packed it")
        for old in [b for b in self._starts if b < block]:  # earlier blocks are never needed again
            del self._starts[old]
        return block

    def train_dataset(self, batch_size, seed, start_window=0):
        start = None
        if start_window:
            block = self._block_of(start_window)
            start = {"block": block, **self._starts[block], "skip": start_window - block * self.block}
        return pipeline.stream_train_dataset(self.open_train, self.tokenizer, self.seq_len, batch_size, self.stride,
                                             self.block, seed, start=start, on_block=self._noted)

    def eval_dataset(self, batch_size):
        return pipeline.eval_dataset(self.val_records, self.tokenizer, self.seq_len, batch_size)

    def state(self, next_window, seed):
        block = self._block_of(next_window) if next_window else None
        return {
            "kind": self.kind,
            "next_window": int(next_window),
            "epoch": int(next_window // max(self.windows_per_epoch, 1)),  # of the estimated epoch
            "windows_per_epoch": int(self.windows_per_epoch),
            "seed": int(seed),
            "shuffle": {"kind": "block", "block_size": int(self.block)},
            "block": block,
            "block_start": None if block is None else self._starts[block],
        }

    def mix_shares(self, next_window):
        """A mixture's realized share of each source, `{name: share}`, over the records drawn up to
        the block a resume at `next_window` starts from (the counts ride in the stream's
        position), and how many records that is; None for one source or before any draw.

        Example:
            inputs.mix_shares(4096)   # ({'web': 0.702, 'code': 0.298}, 3000)
        """
        if not next_window:
            return None
        stream = self._starts[self._block_of(next_window)]["stream"]
        if stream.get("kind") != "mixture" or not stream["draws"]:
            return None
        return {name: count / stream["draws"] for name, count in zip(self.mix_names, stream["counts"])}, stream["draws"]

    def mix_report(self, next_window):
        """One line: `mix_shares` beside the weights, or None.

        Example:
            inputs.mix_report(4096)   # 'realized mixture over 3,000 records: web 70.2% (weight 70.0%); ...'
        """
        shares = self.mix_shares(next_window)
        if shares is None:
            return None
        stream = self._starts[self._block_of(next_window)]["stream"]
        text = "; ".join(f"{name} {share:.1%} (weight {w:.1%})"
                         for (name, share), w in zip(shares[0].items(), stream["weights"]))
        return f"realized mixture over {shares[1]:,} records: {text}"

    def describe(self):
        return {
            "kind": self.kind,
            "source": f"{self.source} ({self.why}; epoch "
                      + (f"size unknown: {UNKNOWN_SIZE})" if self.estimate.basis == UNKNOWN_SIZE
                         else f"{self.estimate.describe()})"),
            "train_records": self.estimate.records,
            "val_records": len(self.val_records),
            "estimate": dataclasses.asdict(self.estimate),
            "validation": self.validation.describe(),
        }


def load_streamed(cfg, why, log=None, resume=None, process_index=0, process_count=1):
    """`(tokenizer, StreamedInputs)` for a streamed source (`streamed.streamed(cfg.data)`).

    Reads: the bounded validation set (--max-val-examples, --eval-tokens, else
    `validation.default_tokens(seq_len)` tokens), the first
    --tokenizer-train-examples records when a tokenizer is trained here, and
    the first records (and metadata) for the token estimate. `resume`: the
    checkpoint's saved input state.

    Example:
        tokenizer, inputs = load_streamed(cfg, "--dataset-id ./c4: streamed", log=print)
    """
    d, t = cfg.data, cfg.training
    if d.max_train_examples:
        raise UserError(
            f"--max-train-examples {d.max_train_examples}: this source is streamed, not counted, so its records "
            f"are not capped; set the run length with --max-steps or --total-tokens, or add --max-val-examples N "
            f"to count both capped sides"
        )
    seed = t.seed

    def open_train(position):
        return streamed.open_train_stream(d, seed, process_index, process_count, position=position)

    def tokenizer_texts():
        # A fresh stream in its first epoch's order: the tokenizer sees records, not the whole source.
        return streamed.open_train_stream(d, seed)

    # The held-out records --auto-vocab-size measures the candidate sizes on (read only then).
    heldout = ()
    if cfg.tokenizer.auto_vocab_size and not cfg.tokenizer.tokenizer_path:
        heldout = validation.read_validation(
            streamed.open_val_stream(d), max_examples=d.max_val_examples or validation.HELDOUT_EXAMPLES
        ).records
    tokenizer = tokenizers.make_tokenizer(
        cfg.tokenizer, tokenizer_texts(), heldout, Path(cfg.output.output_dir), log,
        vocab_size_given="tokenizer.vocab_size" in cfg.explicit,
    )
    # Bounded in tokens (which needs the tokenizer) unless --max-val-examples alone bounds it in records.
    max_tokens = d.eval_tokens or (None if d.max_val_examples else validation.default_tokens(cfg.model.seq_len))
    val = validation.read_validation(streamed.open_val_stream(d), max_examples=d.max_val_examples,
                                     max_tokens=max_tokens, count_tokens=tokenizer.count_tokens)
    pairs = streamed.mix_of(d)
    try:
        mixed = _mixed_estimate(pairs, [_estimate_source(source, d, tokenizer, estimate) for source, _ in pairs])
    except UserError:
        if not (t.max_steps or t.total_tokens):
            raise
        # No size in the metadata, and none needed: the run length is given.
        mixed = estimate.TokenEstimate(0, 0, False, 0.0, 0, UNKNOWN_SIZE)
    source = sources.describe(d) if not d.data_mix else f"--data-mix {d.data_mix}"
    inputs = StreamedInputs(open_train, val, tokenizer, source, mixed, cfg.model.seq_len, cfg.loader.stride,
                            cfg.loader.shuffle_buffer_size, resume=resume, why=why,
                            mix_names=[s for s, _ in pairs] if d.data_mix else ())
    return tokenizer, inputs


UNKNOWN_SIZE = "no size in the source's metadata (the run length comes from --max-steps or --total-tokens)"


def _mixed_estimate(pairs, estimates):
    """A mixture's epoch: as many records as its sources hold, in the proportion drawn (the first
    to run out ends it); one source's estimate as it is."""
    if len(estimates) == 1:
        return estimates[0]
    total = sum(w for _, w in pairs)
    scale = min(e.records / (w / total) for e, (_, w) in zip(estimates, pairs) if w > 0)
    return dataclasses.replace(
        estimates[0],
        tokens=int(sum(e.tokens / e.records * scale * w / total for e, (_, w) in zip(estimates, pairs))),
        records=int(scale), records_exact=False,
        basis="the mixture's weights over " + "; ".join(f"{s}: {e.basis}" for (s, _), e in zip(pairs, estimates)),
    )


def _estimate_source(source, data_cfg, tokenizer, estimate):
    d = data_cfg
    if streamed.names_files(source, d):
        return estimate.estimate_files(sources.resolve_data_files(source), tokenizer.count_tokens, d.text_column)
    return estimate.estimate_tokens(source, tokenizer.count_tokens, split=d.split, config=d.dataset_config,
                                    data_dir=d.tfds_data_dir, text_column=d.text_column)


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
