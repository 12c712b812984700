"""A resumable stream over an ordered list of local file shards, with no pre-pass.

Nothing is read before the first record: the stream opens the first shard
of its order and yields. Its position is O(1) in what was consumed:

    {"kind": "files", "epoch": e, "slot": k, "record": n, "seek": {...}, ...}

`slot` indexes this process's shard order of epoch e, `record` the next
record inside that shard, and `seek` says how to get there without reading
earlier records:

- `.parquet`: `{"row_group": g, "row": r}` (derived from the footer's row
  counts), so a resume reads the footer and then row group g only;
- `.jsonl` and `.txt`: `{"byte": b}`, the offset of the next record; a
  gzipped one decompresses (but does not parse) the shard up to b, as gzip
  has no random access;
- `.json` lists, `.csv` and `.tfrecord`: `seek` is None, and a resume
  re-reads the current shard up to the record (never an earlier shard).
  Prefer parquet or jsonl for large corpora.

Order: with `shuffle`, epoch e visits the shards in a permutation that is a
pure function of (seed, e) (`counter_rng.permutation`), so no order is
stored. Records inside a shard keep their file order; the tokenizing
pipeline's shuffle mixes windows downstream.

Several processes (hosts): with at least as many shards as processes,
process p reads slots p, p + P, ... of each epoch's order (whole shards);
with fewer shards than processes, every process reads every shard and keeps
the records whose index inside the shard is p modulo P. Either way the
processes read disjoint records whose union is the one-process epoch.

Example:
    stream = FileStream(sorted(Path("corpus").glob("*.parquet")), seed=0)
    for text in stream:
        ...
        saved = stream.position()          # JSON-able, O(1)
    resumed = FileStream(files, seed=0, position=saved)
"""

import gzip
import itertools
import json
from pathlib import Path

from ultimate_trainer.data import sources
from ultimate_trainer.data.streaming import counter_rng
from ultimate_trainer.data.streaming.base import RecordStream, check_position, stamp
from ultimate_trainer.errors import UserError

_BATCH_ROWS = 1024  # rows per arrow batch inside a row group: bounds memory for huge row groups


def _gz(path):
    return str(path).lower().endswith(".gz")


def _open_binary(path):
    """Opens a shard for reading bytes, gunzipped (a seam: tests wrap it to log what is read).

    A gzip file seeks forward by decompressing up to the offset: it costs
    the shard's earlier bytes, but parses none of them.
    """
    return gzip.open(path, "rb") if _gz(path) else open(path, "rb")


def parquet_seek(row_counts, record):
    """(row_group, row) of record index `record`, from the footer's row counts.

    Example:
        >>> parquet_seek([4, 4, 2], 9)
        (2, 1)
        >>> parquet_seek([4, 4, 2], 10)   # the end
        (3, 0)
    """
    for group, rows in enumerate(row_counts):
        if record < rows:
            return group, record
        record -= rows
    return len(row_counts), 0


def _read_parquet(path, column, record, seek, stats):
    parquet = sources.open_parquet(path, column)
    counts = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
    group, row = parquet_seek(counts, record)
    where = f"{path} column {column!r}"
    for g in range(group, len(counts)):
        skip = row if g == group else 0
        done = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[g], columns=[column]):
            if done + batch.num_rows <= skip:  # rows before the position: not decoded
                done += batch.num_rows
                continue
            start = max(skip - done, 0)
            for next_row, value in enumerate(batch.column(0).to_pylist()[start:], done + start + 1):
                record += 1
                after = {"row_group": g, "row": next_row} if next_row < counts[g] else {"row_group": g + 1, "row": 0}
                yield sources._text_of(value, column, where, stats), record, after
            done += batch.num_rows


def _read_jsonl(path, column, record, seek, stats):
    offset = (seek or {}).get("byte", 0)
    with _open_binary(path) as f:
        f.seek(offset)
        for raw in f:
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                item = json.loads(stats.decode(raw))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} at byte {start}: not valid JSON ({e.msg}); each line must be one JSON "
                                f"object or string") from None
            record += 1
            yield sources._text_of(item, column, f"{path} at byte {start}", stats), record, {"byte": offset}


def _read_txt(path, column, record, seek, stats):
    """Paragraphs, as `sources.read_file` cuts them, each with the offset after it."""
    offset = (seek or {}).get("byte", 0)
    lines = []
    with _open_binary(path) as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            line = stats.decode(raw).rstrip("\r\n")
            if line.strip():
                lines.append(line)
            elif lines:
                record += 1
                yield "\n".join(lines), record, {"byte": offset}
                lines = []
    if lines:
        record += 1
        yield "\n".join(lines), record, {"byte": offset}


def _read_by_skipping(path, column, record, seek, stats):
    """Formats without random access: the shard re-read from its start up to `record`."""
    for number, text in enumerate(itertools.islice(sources.read_file(path, column, stats), record, None), record + 1):
        yield text, number, None


def _reader(path):
    fmt = sources.file_format(path)
    if fmt == "parquet":
        return _read_parquet
    if fmt in ("jsonl", "txt"):
        return _read_jsonl if fmt == "jsonl" else _read_txt
    if fmt == "json":
        with _open_binary(path) as f:  # a .json that is not a list is JSON lines: read by offset
            return _read_by_skipping if f.read(4096).lstrip().startswith(b"[") else _read_jsonl
    return _read_by_skipping


def seekable(path):
    """True when a resume inside `path` reads no earlier byte of it: parquet, and plain
    (not gzipped) jsonl and txt; a gzipped one decompresses up to the offset.

    Example:
        >>> seekable("a.parquet"), seekable("b.jsonl"), seekable("b.jsonl.gz"), seekable("c.csv")
        (True, True, False, False)
    """
    fmt = sources.file_format(path)
    return fmt == "parquet" or (fmt in ("jsonl", "txt") and not _gz(path))


class FileStream(RecordStream):
    """Records of local file shards, in a per-epoch shuffled shard order, resumable in O(1).

    `files`: the shards, in their canonical order (say, sorted); each is read
    by its suffix, as `sources.read_file` reads it. `epochs=None` streams
    forever; `keep(text)`, when given, drops the records it refuses (the
    position still counts them, so a resume is unaffected). Empty records
    are dropped, as everywhere.

    Example:
        stream = FileStream(["a.parquet", "b.parquet"], process_index=0, process_count=2, seed=3)
        text = next(iter(stream)); stream.position()["seek"]   # {'row_group': 0, 'row': 1}
    """

    kind = "files"

    def __init__(self, files, text_column="text", seed=0, shuffle=True, process_index=0, process_count=1,
                 epochs=None, position=None, keep=None, stats=None):
        super().__init__(text_column, seed, process_index, process_count, epochs, keep, stats)
        self.files = [Path(f) for f in files]
        if not self.files:
            raise UserError("the input lists no file; pass at least one data file")
        for path in self.files:
            if sources.file_format(path) is None:
                raise UserError(f"{path}: unknown format; use {sources.FORMAT_LIST}")
            if not path.is_file():
                raise UserError(f"{path}: no such file; the input's shards must all exist")
        self.shuffle = bool(shuffle)
        # Fewer shards than processes: all read every shard, each keeps every P-th record.
        self.stride = process_count if len(self.files) < process_count else 1
        self._order = (None, None)
        if position is None:
            self._at = (0, 0, 0, None)
        else:
            check_position(position, self.kind, **self._identity())
            self._at = (position["epoch"], position["slot"], position["record"], position["seek"])

    def _identity(self):
        """What a saved position must agree with: the seed, the processes and the shard list."""
        return {**self._setup(), "shuffle": self.shuffle, "shards": len(self.files),
                "first_shard": self.files[0].name, "last_shard": self.files[-1].name}

    def order(self, epoch):
        """The file indices this process reads in `epoch`, in order (recomputed, never stored).

        The last epoch's order is cached: `position()` may be called after every record.
        """
        if self._order[0] != epoch:
            n = len(self.files)
            order = counter_rng.permutation(n, self.seed, "shards", epoch) if self.shuffle else list(range(n))
            self._order = (epoch, order if self.stride > 1 else order[self.process_index::self.process_count])
        return self._order[1]

    def position(self):
        epoch, slot, record, seek = self._at
        order = self.order(epoch)
        shard = self.files[order[slot]].name if slot < len(order) else None
        return stamp(self.kind, **self._identity(), epoch=epoch, slot=slot, shard=shard, record=record,
                     seek=dict(seek) if seek else None)

    def __iter__(self):
        epoch, slot, record, seek = self._at
        while self.epochs is None or epoch < self.epochs:
            order = self.order(epoch)
            whole_epoch, kept = slot == 0 and record == 0, 0
            for slot in range(slot, len(order)):
                path = self.files[order[slot]]
                for text, record_after, seek_after in _reader(path)(path, self.text_column, record, seek, self.stats):
                    self._at = (epoch, slot, record_after, seek_after)
                    if self.stride > 1 and (record_after - 1) % self.stride != self.process_index:
                        continue
                    if self._wanted(text):
                        kept += 1
                        yield text
                record, seek = 0, None
                self._at = (epoch, slot + 1, 0, None)
            if whole_epoch and not kept:
                raise self._no_text()
            epoch, slot = epoch + 1, 0
            self._at = (epoch, 0, 0, None)

    def describe(self):
        kinds = sorted({sources.file_format(p) + (".gz" if _gz(p) else "") for p in self.files})
        text = f"{len(self.files)} file{'s' if len(self.files) != 1 else ''} ({', '.join(kinds)})"
        text += f", shard order shuffled each epoch (seed {self.seed})" if self.shuffle else ", in file order"
        if self.process_count > 1:
            how = (f"every {self.stride}th record of each shard" if self.stride > 1
                   else f"shards {self.process_index}, {self.process_index + self.process_count}, ... of each epoch")
            text += f"; process {self.process_index} of {self.process_count} reads {how}"
        return text
