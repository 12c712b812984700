"""Writes a synthetic parquet corpus: N shards of pseudo-English, about M megabytes of text in all.

For the streaming acceptance (2 GB in 200 shards) and its 20 MB control, and
for tests (tiny corpora in tmp_path). Documents are slices of one seeded pool
of words, each prefixed with its id (`doc SHARD:INDEX `), so every record is
unique and a test can tell which shard and row it came from. The same
arguments write the same bytes.

Example:
    python tools/make_corpus.py /tmp/corpus --shards 200 --megabytes 2000
    python tools/make_corpus.py /tmp/control --shards 2 --megabytes 20
"""

import argparse
import sys
import time
from pathlib import Path

WORDS = ("the of and to in is was for on that with as by it from at an be this which or are not have "
         "model data token train layer value function return python class module object list string "
         "number error file system time state window batch sequence memory device").split()


def _pool(rng, chars):
    """One long string of random words; documents are slices of it (fast, and varied enough)."""
    words = rng.choice(WORDS, size=chars // 5)
    return " ".join(words)[:chars]


def write_parquet_corpus(directory, shards, megabytes, seed=0, doc_chars=(200, 4000), row_group_bytes=2_000_000,
                         text_column="text"):
    """Writes `shards` parquet files `train-NNNNN-of-MMMMM.parquet` holding about `megabytes` MB of text.

    Returns the list of paths. Row groups hold about `row_group_bytes` of text
    each, so a shard of 10 MB has 5 of them.

    Example:
        files = write_parquet_corpus(tmp_path, shards=4, megabytes=0.1)
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    lo, hi = doc_chars
    pool = _pool(rng, max(4 * hi, min(int(megabytes * 1e6), 8_000_000)))
    per_shard = megabytes * 1e6 / shards
    docs = max(1, int(per_shard / ((lo + hi) / 2)))
    rows_per_group = max(1, int(row_group_bytes / ((lo + hi) / 2)))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(shards):
        lengths = rng.integers(lo, hi, docs)
        starts = rng.integers(0, len(pool) - hi, docs)
        texts = [f"doc {shard}:{i} " + pool[s:s + n] for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist()))]
        path = directory / f"train-{shard:05d}-of-{shards:05d}.parquet"
        pq.write_table(pa.table({text_column: texts}), path, row_group_size=rows_per_group)
        paths.append(path)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--megabytes", type=float, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.shards < 1 or args.megabytes <= 0:
        print("make_corpus: --shards must be >= 1 and --megabytes > 0", file=sys.stderr)
        return 2
    start = time.perf_counter()
    paths = write_parquet_corpus(args.directory, args.shards, args.megabytes, args.seed)
    size = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} shards, {size / 1e6:,.1f} MB on disk, in {time.perf_counter() - start:.1f}s: {args.directory}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
