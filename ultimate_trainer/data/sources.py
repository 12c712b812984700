"""Text sources: the records (strings) a run trains and validates on.

The data flags pick one source:

- no dataset flag: the embedded default corpus (`default_records`);
- `--data-files PATH`: local files, a directory (recursively, in sorted
  order) or a glob, in the formats of `FORMATS` (see `read_file`);
- `--dataset-id ID`: a Hugging Face dataset, streamed with the `datasets`
  library (`--dataset-config`, `--split`, `--val-split`); ID may also be a
  local directory (a downloaded copy), which needs no network.

Two ways to read them:

- `load_records(data_cfg)` -> `(train, val, description)`: two lists of str,
  the whole data in memory (what the pipeline takes today);
- `iter_records(data_cfg, split)`: a lazy iterator over one split's records,
  for sources too large for memory; reading holds one record (one row group
  for parquet) at a time.

Without `--val-split` the validation records are the ones `is_validation`
picks: a hash of the text, so the split does not depend on order or seed.
`--max-train-examples` / `--max-val-examples` cap each side; reading stops
once every capped side is full (an uncapped side reads to the end).

Text that is not valid UTF-8 is decoded with U+FFFD in place of the bad
bytes, never refused; `ReadStats` counts them and the description reports
the count once.

Example:
    train, val, description = load_records(DataConfig(data_files="corpus/"))
    for text in iter_records(DataConfig(data_files="big/*.jsonl"), "train"):
        ...
"""

import codecs
import csv
import glob
import gzip
import hashlib
import itertools
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

from ultimate_trainer.errors import UserError

DEFAULT_DATA_NAME = "pydoc_data.topics (Python standard library documentation)"
_RECORD_CHARS = 2000

TRAIN, VALIDATION = "train", "validation"

# File suffix -> reader. `.gz` may follow any of them except .parquet.
FORMATS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tfrecord": "tfrecord",
    ".tfrecords": "tfrecord",
}
FORMAT_LIST = ", ".join(sorted(set(FORMATS))) + " (optionally .gz, except .parquet)"

NETWORK_TIMEOUT_S = 3.0
DATASETS_PIN = "datasets==5.2.0"


def default_records():
    """The embedded default corpus: the stdlib's documentation topics.

    Every Python install carries `pydoc_data.topics` (~465 KB of English), so
    the default run needs no network. Topics are cut at paragraph breaks into
    records of about 2,000 characters, so the validation slice is not at the
    mercy of a few very long topics.

    Example:
        >>> records = default_records()
        >>> len(records) > 200
        True
    """
    # heavy: the stdlib's help topics, over 1 MB of text, load only for the default data
    from pydoc_data.topics import topics

    records = []
    for key in sorted(topics):
        chunk = []
        size = 0
        for paragraph in topics[key].split("\n\n"):
            chunk.append(paragraph)
            size += len(paragraph) + 2
            if size >= _RECORD_CHARS:
                records.append("\n\n".join(chunk))
                chunk, size = [], 0
        if chunk:
            records.append("\n\n".join(chunk))
    return records


def is_validation(text, val_fraction):
    """Deterministic hold-out: a record's hash decides, independent of order and seed."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def split_records(records, val_fraction):
    """Splits records into (train, val) by `is_validation`; val is never empty."""
    train, val = [], []
    for text in records:
        (val if is_validation(text, val_fraction) else train).append(text)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val


# ---------------------------------------------------------------- decoding

_REPLACED = [0]  # bytes replaced so far by the error handler below
_ERRORS = "ultimate_trainer.count_replace"


def _count_and_replace(error):
    if not isinstance(error, UnicodeDecodeError):
        raise error
    _REPLACED[0] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error(_ERRORS, _count_and_replace)


class ReadStats:
    """What reading found on the way: bytes that were not UTF-8 (replaced by U+FFFD)."""

    def __init__(self):
        self.replaced_bytes = 0

    def decode(self, data):
        """UTF-8 text of `data`, each undecodable byte replaced and counted."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            before = _REPLACED[0]
            text = data.decode("utf-8", _ERRORS)
            self.replaced_bytes += _REPLACED[0] - before
            return text

    def note(self):
        n = self.replaced_bytes
        return f"{n:,} byte{'s' if n != 1 else ''} that were not UTF-8 replaced with U+FFFD" if n else ""


# ---------------------------------------------------------------- local files


def file_format(path):
    """The reader for a path (`txt`, `jsonl`, ...), or None for an unknown suffix."""
    name = Path(path).name.lower()
    gz = name.endswith(".gz")
    fmt = FORMATS.get(Path(name[:-3] if gz else name).suffix)
    return None if gz and fmt == "parquet" else fmt


def _is_hidden(path, root):
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_data_files(spec):
    """The files `--data-files SPEC` names, sorted: a file, a directory or a glob.

    A directory is searched recursively and keeps the files of a known
    format (hidden ones skipped); a file named outright must be of a known
    format. Raises `UserError` when nothing matches.
    """
    expanded = os.path.expanduser(str(spec))
    if any(c in expanded for c in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(expanded, recursive=True))]
        if not matches:
            raise UserError(
                f"--data-files {spec}: the pattern matches no file; check it (quote it so the shell "
                f"leaves it to us)"
            )
    else:
        matches = [Path(expanded)]
        if not matches[0].exists():
            raise UserError(f"--data-files {spec}: no such file or directory")
    files = []
    for match in matches:
        if match.is_dir():
            files += sorted(
                p for p in match.rglob("*") if p.is_file() and file_format(p) and not _is_hidden(p, match)
            )
        elif file_format(match) is None:
            raise UserError(f"--data-files {match}: unknown format {match.suffix or '(no suffix)'}; use {FORMAT_LIST}")
        else:
            files.append(match)
    files = sorted(set(files))
    if not files:
        raise UserError(f"--data-files {spec}: holds no data file; the formats read are {FORMAT_LIST}")
    return files


def _lines(path):
    """Raw lines (bytes, with their line ends) of a possibly gzipped file."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def _missing_column(where, column, columns):
    listed = ", ".join(map(repr, sorted(columns))) or "none"
    return UserError(
        f"{where}: no text column {column!r}; the columns are {listed}; pass --text-column with one of them"
    )


def _text_of(item, column, where, stats):
    """The text of one record: a string, or a mapping's `column`."""
    if isinstance(item, dict):
        if column not in item:
            raise _missing_column(where, column, item.keys())
        item = item[column]
    if item is None:
        return ""
    if isinstance(item, bytes):
        return stats.decode(item)
    if not isinstance(item, str):
        raise UserError(
            f"{where}: column {column!r} holds {type(item).__name__}, not text; "
            f"pass --text-column naming a text column"
        )
    return item


def _read_txt(path, column, stats):
    lines = []
    for raw in _lines(path):
        line = stats.decode(raw).rstrip("\r\n")
        if line.strip():
            lines.append(line)
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _read_jsonl(path, column, stats):
    for number, raw in enumerate(_lines(path), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(stats.decode(raw))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object or string"
            ) from None
        yield _text_of(item, column, f"{path}:{number}", stats)


def _read_json(path, column, stats):
    """A JSON list of objects or strings (read whole), else JSON lines."""
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, column, stats)
        return
    with opener(path, "rb") as f:
        try:
            items = json.loads(stats.decode(f.read()))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for number, item in enumerate(items):
        yield _text_of(item, column, f"{path}[{number}]", stats)


def _read_csv(path, column, stats):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KB default
    reader = csv.DictReader(stats.decode(raw) for raw in _lines(path))
    if reader.fieldnames is not None and column not in reader.fieldnames:
        raise _missing_column(f"{path} (header)", column, reader.fieldnames)
    for number, row in enumerate(reader, 2):
        yield _text_of(row, column, f"{path}:{number}", stats)


def open_parquet(path, column):
    """A `pyarrow.parquet.ParquetFile` whose schema has `column`; one-line UserErrors otherwise.

    Example:
        open_parquet("data/train-00000.parquet", "text").metadata.num_rows
    """
    try:
        # optional: pyarrow, for .parquet files only
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow; pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except pyarrow.ArrowException as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise _missing_column(path, column, names)
    return parquet


def _read_parquet(path, column, stats):
    parquet = open_parquet(path, column)
    for batch in parquet.iter_batches(batch_size=1024, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield _text_of(value, column, f"{path} column {column!r}", stats)


def _read_tfrecord(path, column, stats):
    # heavy: tensorflow takes seconds to load; only .tfrecord files need it here
    import tensorflow as tf

    compression = "GZIP" if str(path).lower().endswith(".gz") else ""
    records = tf.data.TFRecordDataset(str(path), compression_type=compression).as_numpy_iterator()
    number = 0
    try:
        for number, raw in enumerate(records, 1):
            features = tf.train.Example.FromString(raw).features.feature
            where = f"{path} example {number}"
            if column not in features:
                raise _missing_column(where, column, features.keys())
            if features[column].WhichOneof("kind") != "bytes_list":
                raise UserError(
                    f"{where}: feature {column!r} is a {features[column].WhichOneof('kind')}, not bytes; "
                    f"pass --text-column naming a bytes feature"
                )
            yield "\n".join(stats.decode(v) for v in features[column].bytes_list.value)
    except (tf.errors.OpError, ValueError) as e:
        # DataLossError (corrupt file) or a record that is no tf.train.Example (DecodeError is a ValueError).
        detail = (getattr(e, "message", None) or str(e)).splitlines()[0]
        raise UserError(f"{path}: not a TFRecord file of tf.train.Example after record {number} ({detail})") from None


_READERS = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "tfrecord": _read_tfrecord,
}


def read_file(path, text_column="text", stats=None):
    """Lazily yields the text records of one local file, by its suffix.

    - `.txt`: one record per paragraph: lines up to one or more blank lines;
    - `.jsonl` (and `.json` that does not start with `[`): one JSON object
      per line, its `text_column` field (a line may also be a bare string);
    - `.json` starting with `[`: a list of objects or strings (read whole);
    - `.csv`: a header row, then one record per row, its `text_column`;
    - `.parquet`: the `text_column` column, one row group at a time;
    - `.tfrecord`: `tf.train.Example`s, the bytes feature `text_column`.
    """
    stats = stats if stats is not None else ReadStats()
    fmt = file_format(path)
    if fmt is None:
        raise UserError(f"{path}: unknown format; use {FORMAT_LIST}")
    if not Path(path).is_file():
        raise UserError(f"{path}: no such file")
    return _READERS[fmt](Path(path), text_column, stats)


# ---------------------------------------------------------------- hub datasets


def _offline():
    return any(
        os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def hub_endpoint():
    """The hub's base URL: $HF_ENDPOINT, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout=NETWORK_TIMEOUT_S):
    """True if the hub answers an HTTP request (any status) within `timeout` seconds.

    A whole request, not just a TCP connect: some networks accept every
    connection and fail later. It goes through $HTTPS_PROXY when set. Name
    lookup can hang longer than any socket timeout, so the probe runs in a
    daemon thread that is abandoned after `timeout`.
    """
    if _offline():
        return False
    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # it answered, if only with an error status
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _hub_down():
    """Why the hub cannot be read here, or None when it answers."""
    if hub_reachable():
        return None
    return "HF_HUB_OFFLINE is set" if _offline() else f"{hub_endpoint()} did not answer within {NETWORK_TIMEOUT_S:g}s"


def hub_unavailable(data_cfg):
    """Why the data config's --dataset-id cannot be read here (the hub is not
    reachable), or None: a local copy, other sources and a reachable hub.

    Example:
        hub_unavailable(cfg.data)  # 'HF_HUB_OFFLINE is set'
    """
    d = data_cfg
    if not d.dataset_id or d.dataset_id.startswith("tfds:") or Path(d.dataset_id).expanduser().exists():
        return None  # a TFDS dataset is read from --tfds-data-dir, prepared beforehand
    return _hub_down()


def _require_hub(dataset_id):
    why = _hub_down()
    if why is None:
        return
    raise UserError(
        f"--dataset-id {dataset_id} needs network access to the Hugging Face Hub ({why}); "
        f"pass local files with --data-files PATH ({', '.join(sorted(set(FORMATS.values())))}), "
        f"or a downloaded copy with --dataset-id /path/to/its/directory"
    )


def _hub_records(data_cfg, split, stats):
    """Streams one split of a hub dataset (or of a dataset directory on disk)."""
    d = data_cfg
    local = Path(d.dataset_id).expanduser()
    if not local.exists():
        _require_hub(d.dataset_id)
    try:
        # heavy: datasets (with pandas and pyarrow) loads only for --dataset-id; an install may lack it
        import datasets
    except ImportError:
        raise UserError(f"--dataset-id needs the datasets library; pip install '{DATASETS_PIN}'") from None
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    where = f"--dataset-id {d.dataset_id}" + (f" --dataset-config {d.dataset_config}" if d.dataset_config else "")
    try:
        stream = datasets.load_dataset(
            str(local) if local.exists() else d.dataset_id, d.dataset_config, split=split, streaming=True
        )
        rows = iter(stream)
        first = next(rows, None)
    except UserError:
        raise
    except Exception as e:  # the library's many error types (missing dataset, bad split or config, I/O)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{where} split {split!r}: {detail}") from None
    if first is None:
        return
    for number, item in enumerate(itertools.chain([first], rows), 1):
        yield _text_of(item, d.text_column, f"{where} split {split!r} record {number}", stats)


# ---------------------------------------------------------------- one source


def describe(data_cfg):
    """One line naming the source a data config reads."""
    d = data_cfg
    if d.dataset_id:
        text = d.dataset_id + (f" ({d.dataset_config})" if d.dataset_config else "") + f" split {d.split}"
        return text + (f", validation split {d.val_split}" if d.val_split else "")
    if d.data_files:
        files = resolve_data_files(d.data_files)
        return f"{d.data_files} ({len(files)} file{'s' if len(files) != 1 else ''})"
    return DEFAULT_DATA_NAME


def _split_records(data_cfg, split_name, stats):
    """All non-empty records of one named split of the source, in order."""
    d = data_cfg
    if d.dataset_id:
        records = _hub_records(d, split_name, stats)
    elif d.data_files:
        files = resolve_data_files(d.data_files)
        records = itertools.chain.from_iterable(read_file(p, d.text_column, stats) for p in files)
    else:
        records = iter(default_records())
    return (text for text in records if text.strip())


def iter_records(data_cfg, split=TRAIN, stats=None):
    """Lazily yields the records of `split` (`"train"` or `"validation"`).

    With `--val-split` the validation records are that split; otherwise both
    sides read the training split and keep the records `is_validation` gives
    them. `--max-train-examples` / `--max-val-examples` cap the side. Unlike
    `load_records`, an empty validation side stays empty. `stats`, a
    `ReadStats`, collects the undecodable byte count as reading goes.

    Example:
        stats = ReadStats()
        n = sum(1 for _ in iter_records(cfg.data, "validation", stats))
    """
    if split not in (TRAIN, VALIDATION):
        raise ValueError(f"split must be {TRAIN!r} or {VALIDATION!r}, got {split!r}")
    d = data_cfg
    stats = stats if stats is not None else ReadStats()
    limit = d.max_train_examples if split == TRAIN else d.max_val_examples
    if d.val_split:
        records = _split_records(d, d.val_split if split == VALIDATION else d.split, stats)
    else:
        held_out = split == VALIDATION
        records = (
            text
            for text in _split_records(d, d.split if d.dataset_id else TRAIN, stats)
            if is_validation(text, d.val_fraction) == held_out
        )
    return itertools.islice(records, limit)


class Records:
    """One side of a run's records, read from the source again on every pass.

    A list would hold the whole corpus in memory (and the pipeline would copy
    it once more into a tf.string tensor); re-reading keeps memory flat at any
    size. `open_records` scans each side once, so `len()` is known up front.

    Example:
        train, val, name = open_records(cfg.data)
        print(len(train), next(iter(train))[:40])
    """

    def __init__(self, data_cfg, split, count, limit=None, extra=()):
        self.data_cfg, self.split, self.count = data_cfg, split, count
        self.limit, self.extra = limit, list(extra)

    def __iter__(self):
        source = () if self.limit == 0 else iter_records(self.data_cfg, self.split)
        yield from itertools.islice(source, self.limit)
        yield from self.extra

    def __len__(self):
        return self.count


def _scan(data_cfg, stats):
    """One pass over the source: (train count, val count, last training record)."""
    d = data_cfg
    if d.val_split:
        n_train = last = None
        for n_train, last in enumerate(iter_records(d, TRAIN, stats), 1):
            pass
        n_val = sum(1 for _ in iter_records(d, VALIDATION, stats))
        return n_train or 0, n_val, last
    counts, last = [0, 0], None
    caps = (d.max_train_examples, d.max_val_examples)
    for text in _split_records(d, d.split if d.dataset_id else TRAIN, stats):
        side = int(is_validation(text, d.val_fraction))
        if caps[side] is None or counts[side] < caps[side]:
            counts[side] += 1
            if side == 0:
                last = text
        if all(cap is not None and n >= cap for n, cap in zip(counts, caps)):
            break
    return counts[0], counts[1], last


def open_records(data_cfg):
    """Returns `(train, val, description)` for a run, each side a re-readable `Records`.

    One scan counts both sides (and stops once every capped side is full). If
    the hash leaves validation empty, the last training record moves there
    (tiny data). Raises `UserError` when the source holds no text or a side
    ends up empty.
    """
    d = data_cfg
    streamed_only = [f for f, on in (("--data-mix", d.data_mix), ("--eval-tokens", d.eval_tokens),
                                     (f"--dataset-id {d.dataset_id}", (d.dataset_id or "").startswith("tfds:"))) if on]
    if streamed_only:  # `prepare-data`, and any other reader that counts one source whole
        raise UserError(f"{streamed_only[0]} is read by a training run's streamed input only, not counted here "
                        f"(prepare-data); pass one source with --data-files or --dataset-id")
    stats = ReadStats()
    description = describe(d)
    n_train, n_val, last = _scan(d, stats)
    if stats.note():
        description += f"; {stats.note()}"
    if not n_train and not n_val:
        raise UserError(f"{description}: holds no text; check the files and --text-column {d.text_column}")
    train = Records(d, TRAIN, n_train, d.max_train_examples)
    val = Records(d, VALIDATION, n_val, d.max_val_examples)
    if not n_val and n_train > 1:
        train = Records(d, TRAIN, n_train - 1, n_train - 1)
        val = Records(d, VALIDATION, 1, 0, extra=[last])
    if not len(train):
        raise UserError(f"{description}: the training data is empty; check --max-train-examples and --split")
    if not len(val):
        raise UserError(f"{description}: the validation data is empty; raise --val-fraction or --max-val-examples, or check --val-split")
    return train, val, description


def load_records(data_cfg):
    """`open_records` with both sides read into lists of str (for small data and tests)."""
    train, val, description = open_records(data_cfg)
    return list(train), list(val), description
