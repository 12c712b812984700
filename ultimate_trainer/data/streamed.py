"""Which runs stream their source, and the record streams of a run's data flags.

A source is streamed (no pass over it before training, run length from
--max-steps / --total-tokens or an estimated epoch) when it is a
--dataset-id (hub id, local dataset directory, `tfds:`), a --data-mix, or
--data-files adding up to more than `STREAM_ABOVE_BYTES` on disk. Smaller
local files are counted, as before: one pass is cheap there and gives exact
epochs. The sizes are the files' sizes, nothing is read.

Example:
    streamed(cfg.data)          # (True, "--dataset-id ./c4_copy: streamed, ...")
    stream = open_train_stream(cfg.data, seed=42)
"""

import os
from pathlib import Path

from ultimate_trainer.config.parsers import TFDS_PREFIX, parse_data_mix
from ultimate_trainer.data import sources
from ultimate_trainer.data.streaming import dataset_files, open_stream
from ultimate_trainer.data.streaming.files import FileStream
from ultimate_trainer.data.streaming.mixture import Mixture
from ultimate_trainer.errors import UserError

STREAM_ABOVE_BYTES = 256 * 2**20  # --data-files above this total are streamed, not counted


def streamed(data_cfg):
    """(whether the run streams its source, one line saying why).

    Example:
        streamed(DataConfig(data_files="big/*.parquet"))   # (True, "--data-files big/*.parquet: 2.1 GB ...")
    """
    d = data_cfg
    if d.data_dir:
        return False, f"--data-dir {d.data_dir}: pre-tokenized shards, counted in their metadata"
    if d.data_mix:
        return True, "--data-mix: streamed, no pass before training"
    if d.eval_tokens:
        return True, f"--eval-tokens {d.eval_tokens}: validation is bounded in tokens, so the source is streamed"
    if d.max_train_examples and d.max_val_examples:
        return False, (f"--max-train-examples {d.max_train_examples} and --max-val-examples {d.max_val_examples} "
                       f"cap the source, so the capped records are counted")
    if d.dataset_id:
        return True, f"--dataset-id {d.dataset_id}: streamed, no pass before training"
    if d.data_files:
        size = sum(os.path.getsize(p) for p in sources.resolve_data_files(d.data_files))
        if size > STREAM_ABOVE_BYTES:
            return True, (f"--data-files {d.data_files}: {size / 1e6:,.0f} MB, above the "
                          f"{STREAM_ABOVE_BYTES / 2**20:.0f} MiB counted locally: streamed, no pass before training")
        return False, f"--data-files {d.data_files}: {size / 1e6:,.1f} MB, counted in one pass"
    return False, "the default data: counted"


def names_files(source, data_cfg):
    """Whether a source names files (--data-files, or a mix source that is a glob, a file or a plain
    directory), not a dataset.

    Example:
        names_files("web/*.parquet", cfg.data)   # True
    """
    if source == data_cfg.data_files:
        return True
    if not data_cfg.data_mix or source.startswith(TFDS_PREFIX):
        return False
    path = Path(os.path.expanduser(source))
    return any(c in source for c in "*?[") or path.is_file() or (path.is_dir() and not _dataset_layout(path))


def _dataset_layout(path):
    """Whether a directory is laid out as a dataset `datasets` splits (train-*.parquet, data/, ...)."""
    try:
        dataset_files(path, "train")
    except UserError:
        return False
    return True


def open_source(source, data_cfg, split, **options):
    """The record stream of one source: a --dataset-id form (`tfds:`, hub id, dataset dir) or files.

    Example:
        open_source("web/*.parquet", cfg.data, "train", seed=0, position=None)
    """
    d = data_cfg
    if source.startswith(TFDS_PREFIX):
        return open_stream(source, split=split, data_dir=d.tfds_data_dir, text_column=d.text_column, **options)
    if names_files(source, d):
        return FileStream(sources.resolve_data_files(source), text_column=d.text_column, **options)
    return open_stream(source, split=split, config=d.dataset_config, text_column=d.text_column, **options)


def mix_of(data_cfg):
    """((source, weight), ...) of the run: the --data-mix, else its one source with weight 1."""
    d = data_cfg
    if d.data_mix:
        return parse_data_mix(d.data_mix)
    return ((d.dataset_id or d.data_files, 1.0),)


def open_train_stream(data_cfg, seed, process_index=0, process_count=1, position=None):
    """The endless training stream of the run (a mixture for --data-mix), at `position`.

    Without --val-split the records `sources.is_validation` holds out are
    skipped here (and read by `open_val_stream`), so the two never share one.

    Example:
        stream = open_train_stream(cfg.data, seed=42, process_index=1, process_count=4)
    """
    d = data_cfg
    keep = None if d.val_split else (lambda text: not sources.is_validation(text, d.val_fraction))
    pairs = mix_of(d)
    options = dict(seed=seed, process_index=process_index, process_count=process_count, keep=keep)
    if not d.data_mix:
        return open_source(pairs[0][0], d, d.split, position=position, **options)
    positions = Mixture.stream_positions(position) if position else [None] * len(pairs)
    streams = [open_source(s, d, d.split, position=p, **options) for (s, _), p in zip(pairs, positions)]
    return Mixture(streams, [w for _, w in pairs], seed=seed, position=position, names=[s for s, _ in pairs])


def open_val_stream(data_cfg):
    """One ordered pass over the validation records: the --val-split, or the held-out records.

    The same for every process and every run (no shuffle, one reader), so a
    bounded set read from it is fixed. A mixture's validation draws from each
    source's validation records by the same weights.

    Example:
        read_validation(open_val_stream(cfg.data), max_examples=1000)
    """
    d = data_cfg
    split = d.val_split or d.split
    keep = None if d.val_split else (lambda text: sources.is_validation(text, d.val_fraction))
    pairs = mix_of(d)
    streams = [open_source(source, d, split, seed=0, epochs=1, keep=keep, shuffle=False) for source, _ in pairs]
    if not d.data_mix:
        return streams[0]
    return Mixture(streams, [w for _, w in pairs], seed=0, names=[s for s, _ in pairs])
