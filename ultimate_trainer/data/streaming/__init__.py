"""Record streams at any scale: no pre-pass, O(1) resumable positions, per-host shards, mixtures.

- `files.FileStream`: local file shards (parquet by row group, jsonl/txt by
  byte offset), shard order shuffled per epoch from the seed;
- `hub.HubStream`: a Hugging Face dataset streamed by `datasets`;
- `tfds_stream.TfdsStream`: a prepared TFDS dataset;
- `mixture.Mixture`: several streams drawn by weight, counter-based;
- `estimate`: token counts from metadata, labelled as estimates;
- `validation`: a bounded validation set, read once.

`open_stream(source, ...)` picks the stream for a `--dataset-id`-style source.
"""

from pathlib import Path

from ultimate_trainer.errors import UserError
from ultimate_trainer.data.streaming.files import FileStream
from ultimate_trainer.data.streaming.hub import HubStream
from ultimate_trainer.data.streaming.tfds_stream import TfdsStream

# Formats `FileStream` reads record for record as `datasets` does, so a local
# dataset directory of them can be read by it (and seek by row group or byte).
_SAME_AS_DATASETS = (".parquet", ".jsonl", ".jsonl.gz")


def dataset_files(directory, split="train"):
    """The files of one split of a local dataset directory, by `datasets`' own layout rules.

    `data/train-00000-of-00004.parquet`, `train.jsonl`, `validation/*.parquet`
    and the other layouts `datasets` recognises; sorted as it sorts them.

    Example:
        dataset_files("my_dataset", "validation")   # [PosixPath('my_dataset/validation.jsonl')]
    """
    # heavy: `datasets` takes seconds to import; only a local dataset directory needs its layout rules
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(directory))
        files = DataFilesDict.from_patterns(patterns, base_path=str(directory))
    except Exception as e:  # EmptyDatasetError, FileNotFoundError
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--dataset-id {directory}: {detail}") from None
    if split not in files:
        raise UserError(f"--dataset-id {directory}: no split {split!r}; the splits are {', '.join(sorted(files))}")
    return [Path(f) for f in files[split]]


def open_stream(source, split="train", config=None, data_dir=None, **options):
    """The record stream of a `--dataset-id`-style source, or of a list of files.

    - a list of paths: `FileStream` over them, in that order;
    - `"tfds:NAME[/CONFIG][:VERSION]"`: `TfdsStream` (`data_dir`: --tfds-data-dir);
    - a local dataset directory: its split's files (`dataset_files`); all
      parquet or jsonl: `FileStream` (seeks by row group or byte), else
      `HubStream` over the directory (`datasets` reads other formats its way);
    - anything else: a hub id, `HubStream` (`config`: --dataset-config).

    `options` go to the stream: text_column, seed, process_index,
    process_count, epochs, position, keep, stats (and shuffle for files).

    Example:
        stream = open_stream("./c4_copy", split="train", seed=0, process_index=1, process_count=4)
        resumed = open_stream("./c4_copy", split="train", seed=0, process_index=1, process_count=4,
                              position=saved)
    """
    if isinstance(source, (list, tuple)):
        return FileStream(source, **options)
    source = str(source)
    if source.startswith("tfds:"):
        options.pop("shuffle", None)  # TFDS shuffled the examples when it prepared them
        return TfdsStream(source[len("tfds:"):], data_dir=data_dir, split=split, **options)
    local = Path(source).expanduser()
    if local.is_dir() and config is None:
        files = dataset_files(local, split)
        if all(f.name.lower().endswith(_SAME_AS_DATASETS) for f in files):
            return FileStream(files, **options)
    if local.exists() and not local.is_dir():
        raise UserError(f"--dataset-id {source}: is a file; pass files with --data-files, or a dataset directory")
    options.pop("shuffle", None)
    return HubStream(source, config, split=split, **options)


__all__ = ["dataset_files", "open_stream"]
