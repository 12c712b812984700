"""Input throughput: the streaming path and the shard path, in tokens/s, with peak RSS;
and (--streaming) the record stream's start, resume and memory against corpus size.

Generates a text file of --megabytes of pseudo-English (seeded, so every run
reads the same bytes), then times batches of [--batch-size, --seq-len] from
(1) the streaming tf.data pipeline (tokenize in the graph, pack, shuffle) and
(2) shards made by prepare_shards and read by memmap. Each path runs in its
own process so its peak RSS is its own. Byte-level tokenizer.

With --streaming it writes a parquet corpus per size in --sizes (MB; one
shard per 10 MB, at least 2: 2000 MB is 200 shards) with tools/make_corpus.py
and measures, each in its own process: the time from opening the directory
to the first record, a resume at the middle record of the middle shard three
ways (the stream's row-group seek, `datasets`' load_state_dict, reading
through), the records/s of a straight read, and the peak RSS.

Example:
    python tools/bench_data.py --megabytes 200
    python tools/bench_data.py --megabytes 20 --train-tokens-per-sec 450
    python tools/bench_data.py --streaming --sizes 20,2000
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the of and to in is was for on that with as by it from at an be this which or are not have "
         "model data token train layer value function return python class module object list string "
         "number error file system time state window batch sequence memory device").split()


def make_corpus(path, megabytes, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    target = megabytes * 1_000_000
    with open(path, "w") as f:
        written = 0
        while written < target:
            words = rng.choice(WORDS, size=rng.integers(40, 400))
            text = " ".join(words) + ".\n\n"
            f.write(text)
            written += len(text)


def _records(path):
    """The corpus as a run reads it: `--data-files`, re-read lazily on every pass."""
    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.data import sources

    train, val, _ = sources.open_records(resolve_config({"data.data_files": str(path)}).data)
    return train, val


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process's own address space, in MB.

    Unlike ru_maxrss, which a child keeps from the parent it was forked from
    (here, the parent that wrote the corpus), VmHWM starts afresh at exec.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _time_batches(ds, batches):
    it = iter(ds)
    next(it)  # graph building and first fill
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def _worker(args):
    from ultimate_trainer.data import pipeline, shards
    from ultimate_trainer.data.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    tokens = args.batches * args.batch_size * args.seq_len
    baseline = _rss_mb()  # tensorflow and the package, before any data
    train, val = _records(args.corpus)
    if args.path_kind == "stream":
        start = time.perf_counter()
        windows = pipeline.windows_in(pipeline.count_stream_tokens(train, tok), args.seq_len + 1, args.seq_len + 1)
        count = time.perf_counter() - start
        ds = pipeline.train_dataset(train, tok, args.seq_len, args.batch_size, shuffle_buffer_size=10000,
                                    windows_per_epoch=windows)
        seconds = _time_batches(ds, args.batches)
        result = {"path": "stream", "tokens_per_sec": tokens / seconds, "count_seconds": count}
    else:
        directory = Path(args.workdir) / "shards"
        start = time.perf_counter()
        meta = shards.prepare_shards(directory, tok, {"train": train, "val": val}, "bench", log=lambda m: None)
        prepare = time.perf_counter() - start
        store = shards.TokenStore(directory, "train")
        seconds = _time_batches(shards.shard_train_dataset(store, args.seq_len, args.batch_size), args.batches)
        result = {"path": "shards", "tokens_per_sec": tokens / seconds,
                  "prepare_seconds": prepare, "prepare_tokens_per_sec": meta["splits"]["train"]["tokens"] / prepare}
    result["baseline_rss_mb"] = baseline
    result["peak_rss_mb"] = _rss_mb()
    print(json.dumps(result))


def _middle(files):
    """The position of the middle record of the middle shard, without reading a record."""
    import pyarrow.parquet as pq

    slot = len(files) // 2
    return slot, pq.ParquetFile(files[slot]).metadata.num_rows // 2


def _stream_worker(args):
    """One corpus: first record, the three resumes and a straight read, as JSON."""
    from ultimate_trainer.data.streaming import open_stream
    from ultimate_trainer.data.streaming.files import FileStream

    baseline = _memory_mb("VmRSS")  # the package imported, no data yet
    start = time.perf_counter()
    stream = open_stream(args.corpus, shuffle=False)
    first = next(iter(stream))
    result = {"first_record_s": time.perf_counter() - start}
    files = stream.files
    slot, record = _middle(files)
    expect = f"doc {slot}:{record} "

    start = time.perf_counter()
    saved = dict(stream.position(), epoch=0, slot=slot, record=record, seek=None)
    text = next(iter(FileStream(files, shuffle=False, position=saved)))
    result["seek_stream_s"] = time.perf_counter() - start
    assert text.startswith(expect), (text[:30], expect)

    import datasets

    datasets.utils.logging.set_verbosity_error()
    start = time.perf_counter()
    ds = datasets.load_dataset(args.corpus, split="train", streaming=True)
    result["open_datasets_s"] = time.perf_counter() - start
    start = time.perf_counter()
    state = ds.state_dict()
    # As datasets saves it: the shard's start, then `record` rows to skip (it reads them to skip them).
    at = {"shard_idx": slot, "shard_example_idx": 0, "type": "ArrowExamplesIterable"}
    state["examples_iterable"].update(examples_iterable=at, previous_state=dict(at), batch_idx=1,
                                      num_chunks_since_previous_state=record)
    ds.load_state_dict(state)
    text = next(iter(ds))["text"]
    result["seek_datasets_s"] = time.perf_counter() - start
    assert text.startswith(expect), (text[:30], expect)

    start = time.perf_counter()
    reader = FileStream(files, shuffle=False, epochs=1)
    count = 0
    for text in reader:
        count += 1
        if text.startswith(expect):
            break
    result["read_through_s"] = time.perf_counter() - start
    result["read_through_records"] = count
    result["baseline_rss_mb"] = baseline
    result["peak_rss_mb"] = _memory_mb("VmHWM")
    print(json.dumps(result))


def _streaming(args):
    from tools.make_corpus import write_parquet_corpus

    sizes = [float(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        print("MB      shards  first record  resume: seek  datasets (+ open)    read-through          peak RSS (before)")
        for mb in sizes:
            corpus = Path(workdir) / f"corpus_{mb:g}"
            shards = max(2, int(mb // 10))
            write_parquet_corpus(corpus, shards, mb)
            cmd = [sys.executable, __file__, "--stream-worker", "--corpus", str(corpus)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            if out.returncode:
                print(f"{mb:g} MB: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mb:<7g} {shards:<7} {r['first_record_s']:>9.3f} s {r['seek_stream_s']:>10.3f} s "
                  f"{r['seek_datasets_s']:>7.3f} s (+{r['open_datasets_s']:.2f} s) {r['read_through_s']:>8.2f} s ({r['read_through_records']:,} rec) "
                  f"{r['peak_rss_mb']:>6,.0f} MB ({r['baseline_rss_mb']:,.0f})")
            shutil.rmtree(corpus)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--train-tokens-per-sec", type=float, default=450.0,
                        help="training speed to compare with (the small preset on this CPU)")
    parser.add_argument("--streaming", action="store_true",
                        help="measure the record stream (first record, resume, RSS) on parquet corpora of --sizes")
    parser.add_argument("--sizes", default="20,2000", help="with --streaming: corpus sizes in MB, comma-separated")
    parser.add_argument("--stream-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["stream", "shards"], dest="path_kind", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stream_worker:
        return _stream_worker(args)
    if args.streaming:
        return _streaming(args)
    if args.path_kind:
        return _worker(args)
    with tempfile.TemporaryDirectory() as workdir:
        corpus = Path(workdir) / "corpus.txt"
        make_corpus(corpus, args.megabytes)
        print(f"corpus: {corpus.stat().st_size / 1e6:,.0f} MB of generated text")
        for kind in ("stream", "shards"):
            cmd = [sys.executable, __file__, "--worker", kind, "--corpus", str(corpus), "--workdir", workdir,
                   "--batches", str(args.batches), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{kind}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            extra = (f", prepared at {r['prepare_tokens_per_sec']:,.0f} tok/s" if "prepare_seconds" in r
                     else f", counted in {r['count_seconds']:.1f}s")
            print(f"{kind:<7} {r['tokens_per_sec']:>12,.0f} tok/s = {r['tokens_per_sec'] / args.train_tokens_per_sec:,.0f}x "
                  f"training at {args.train_tokens_per_sec:,.0f} tok/s; peak RSS {r['peak_rss_mb']:,.0f} MB "
                  f"({r['baseline_rss_mb']:,.0f} MB before data){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
