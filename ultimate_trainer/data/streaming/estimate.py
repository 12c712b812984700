"""Token counts without a pass: metadata for the size, the first records for the rate.

A streamed source is never read whole before training, so its size in
tokens (for `--epochs`) is estimated:

- parquet: the footers give the exact row count and the text column's
  stored (uncompressed) bytes; the first records give tokens per stored
  byte;
- jsonl / txt (gzipped too): the file sizes (a gzip trailer gives the
  uncompressed size) and the first records' tokens per file byte;
- other local formats: the file sizes and tokens per text byte (their
  markup counts as text, so the estimate runs high);
- a `datasets` dataset with size metadata (the hub's dataset cards carry
  it): its exact example count and the first records' tokens per record;
- TFDS: the exact example count from its metadata, tokens per record.

The result is a `TokenEstimate`, which says it is one and how it was made.

Example:
    est = estimate_tokens("./c4_copy", tokenizer.count_tokens)
    print(est.describe())   # '~1.2B tokens (estimate: 200 parquet footers ...; ...)'
"""

import dataclasses
import itertools
from pathlib import Path

from ultimate_trainer.data import sources
from ultimate_trainer.data.streaming import files as files_lib
from ultimate_trainer.errors import UserError
from ultimate_trainer.data.streaming import open_stream
from ultimate_trainer.data.streaming.files import FileStream
from ultimate_trainer.data.streaming.hub import HubStream

SAMPLE_RECORDS = 1000


@dataclasses.dataclass(frozen=True)
class TokenEstimate:
    """An estimated token count (plus one EOS per record): never a count, and it says so.

    `records` is exact when `records_exact` (metadata counted them), else
    estimated too; `tokens_per_byte` is per UTF-8 byte of text in the sample.

    Example:
        TokenEstimate(tokens=1_000_000, records=2_000, records_exact=True, tokens_per_byte=0.27,
                      sample_records=1000, basis="2 parquet footers").describe()
    """

    tokens: int
    records: int
    records_exact: bool
    tokens_per_byte: float
    sample_records: int
    basis: str
    is_estimate: bool = True

    def describe(self):
        records = f"{self.records:,} records" + ("" if self.records_exact else " (estimated)")
        return (f"~{self.tokens:,} tokens (an estimate, not a count: {records} from {self.basis}; "
                f"{self.tokens_per_byte:.3f} tokens per byte in the first {self.sample_records:,} records)")


def _sample(stream, count_tokens, n):
    """(records, tokens with one EOS each, UTF-8 bytes) of the first n records of `stream`."""
    records = tokens = size = 0
    for text in itertools.islice(stream, n):
        records += 1
        tokens += count_tokens(text) + 1
        size += len(text.encode("utf-8"))
    if not records:
        raise UserError(f"{stream.describe()}: holds no text to estimate its size from")
    return records, tokens, size


def _gzip_size(path):
    """The uncompressed size a gzip trailer records (modulo 4 GiB, as the format stores it)."""
    with open(path, "rb") as f:
        f.seek(-4, 2)
        return int.from_bytes(f.read(4), "little")


def _parquet_stored_bytes(path, column):
    """(rows, stored uncompressed bytes of `column`, the per-row-group pairs) from the footer."""
    meta = sources.open_parquet(path, column).metadata
    index = meta.schema.to_arrow_schema().get_field_index(column)
    groups = [(meta.row_group(g).num_rows, meta.row_group(g).column(index).total_uncompressed_size)
              for g in range(meta.num_row_groups)]
    return sum(r for r, _ in groups), sum(b for _, b in groups), groups


def _estimate_parquet(paths, text_column, count_tokens, n):
    rows = stored = 0
    all_groups = []  # (rows, stored bytes) of every row group, in file order
    for path in paths:
        r, b, groups = _parquet_stored_bytes(path, text_column)
        rows, stored = rows + r, stored + b
        all_groups += groups
    stream = files_lib.FileStream(paths, text_column, shuffle=False, epochs=1)
    records, tokens, size = _sample(stream, count_tokens, n)
    # The stored bytes of the sampled rows: whole row groups, and a share of the last one.
    left, sampled_stored = records, 0.0
    for group_rows, group_bytes in all_groups:
        if not left:
            break
        take = min(left, group_rows)
        sampled_stored += group_bytes * take / group_rows
        left -= take
    per_stored_byte = tokens / max(sampled_stored, 1.0)
    return TokenEstimate(int(stored * per_stored_byte), rows, True, tokens / max(size, 1), records,
                         f"{len(paths)} parquet footer{'s' if len(paths) != 1 else ''} ({stored:,} stored bytes)")


def _estimate_lines(paths, text_column, count_tokens, n):
    total = sum(_gzip_size(p) if files_lib._gz(p) else p.stat().st_size for p in paths)
    stream = files_lib.FileStream(paths, text_column, shuffle=False, epochs=1)
    records, tokens, size = _sample(stream, count_tokens, n)
    position = stream.position()
    # File bytes the sample spans: whole shards before the current one, and the offset inside it.
    done = sum(_gzip_size(p) if files_lib._gz(p) else p.stat().st_size for p in paths[:position["slot"]])
    # A sample that read the source to its end spans it all (the position has moved on to the next epoch).
    spanned = total if records < n else done + ((position["seek"] or {}).get("byte", 0))
    per_byte = tokens / max(spanned, 1)
    return TokenEstimate(int(total * per_byte), int(total * records / max(spanned, 1)), False,
                         tokens / max(size, 1), records, f"the sizes of {len(paths)} files ({total:,} bytes)")


def _estimate_other(paths, text_column, count_tokens, n):
    total = sum(p.stat().st_size for p in paths)
    stream = files_lib.FileStream(paths, text_column, shuffle=False, epochs=1)
    records, tokens, size = _sample(stream, count_tokens, n)
    return TokenEstimate(int(total * tokens / max(size, 1)), int(total * records / max(size, 1)), False,
                         tokens / max(size, 1), records,
                         f"the sizes of {len(paths)} files ({total:,} bytes, markup counted as text)")


def estimate_files(paths, count_tokens, text_column="text", sample_records=SAMPLE_RECORDS):
    """The estimate for local files (all of one kind decides the method; mixed kinds: file sizes).

    Example:
        estimate_files(sorted(Path("corpus").glob("*.parquet")), tok.count_tokens).tokens
    """
    paths = [Path(p) for p in paths]
    kinds = {sources.file_format(p) for p in paths}
    if kinds == {"parquet"}:
        return _estimate_parquet(paths, text_column, count_tokens, sample_records)
    if kinds <= {"jsonl", "txt"}:
        return _estimate_lines(paths, text_column, count_tokens, sample_records)
    return _estimate_other(paths, text_column, count_tokens, sample_records)


def _per_record(stream, examples, count_tokens, n, basis):
    records, tokens, size = _sample(stream, count_tokens, n)
    return TokenEstimate(int(examples * tokens / records), examples, True, tokens / max(size, 1), records, basis)


def estimate_tokens(source, count_tokens, split="train", config=None, data_dir=None, text_column="text",
                    sample_records=SAMPLE_RECORDS):
    """The token estimate of a `--dataset-id`-style source (the forms `open_stream` takes).

    Raises UserError when the source carries no size (a hub dataset whose
    card has no split sizes): the run then needs --max-steps or a token budget.

    Example:
        estimate_tokens("tfds:c4/en", tok.count_tokens, data_dir="gs://bucket/tfds").records   # exact
    """
    stream = open_stream(source, split=split, config=config, data_dir=data_dir, text_column=text_column,
                         shuffle=False, epochs=1)
    if isinstance(stream, FileStream):
        return estimate_files(stream.files, count_tokens, text_column, sample_records)
    if isinstance(stream, HubStream):
        info = stream.split_sizes()
        if not info or split not in info or not info[split].num_examples:
            raise UserError(f"--dataset-id {source}: its metadata gives no size for split {split!r}, so an epoch "
                            f"cannot be estimated; set the run length with --max-steps or --total-tokens")
        return _per_record(stream, info[split].num_examples, count_tokens, sample_records,
                           "the dataset's metadata")
    return _per_record(stream, stream.num_examples, count_tokens, sample_records,
                       "TFDS metadata")
