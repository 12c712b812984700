"""Record streams: no pre-pass, exact O(1) resume, per-process shards, mixtures, TFDS, estimates, validation."""

import doctest
import gzip
import json
import math
from pathlib import Path

import pytest

from tools.make_corpus import write_parquet_corpus
from ultimate_trainer.data import sources
from ultimate_trainer.data.streaming import counter_rng, dataset_files, open_stream
from ultimate_trainer.data.streaming import base as base_lib
from ultimate_trainer.data.streaming import files as files_lib
from ultimate_trainer.data.streaming import mixture as mixture_lib
from ultimate_trainer.data.streaming.estimate import estimate_files, estimate_tokens
from ultimate_trainer.data.streaming.files import FileStream
from ultimate_trainer.data.streaming.hub import HubStream
from ultimate_trainer.data.streaming.mixture import Mixture, check_weights
from ultimate_trainer.data.streaming.validation import read_validation
from ultimate_trainer.errors import UserError


def _take(stream, n=None):
    """(records, position after each) of the first n records (all when n is None)."""
    records, positions = [], []
    for text in stream:
        records.append(text)
        positions.append(json.loads(json.dumps(stream.position())))  # what a checkpoint keeps
        if n is not None and len(records) == n:
            break
    return records, positions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """5 parquet shards of 100 documents, row groups of 10 rows."""
    directory = tmp_path_factory.mktemp("corpus")
    return write_parquet_corpus(directory, shards=5, megabytes=0.1, doc_chars=(100, 300), row_group_bytes=2000)


def _doc_id(text):
    return text.split(" ", 2)[1]  # "doc S:I ..." -> "S:I"


def _write(path, lines):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt") as f:
        f.write("".join(lines))
    return path


def _line_shards(tmp_path, suffix):
    """3 shards of 7 records each in one format, text 'f{file} r{record}'."""
    paths = []
    for i in range(3):
        texts = [f"f{i} r{j} " + "word " * (j % 4) for j in range(7)]
        if suffix.startswith(".jsonl"):
            lines = [json.dumps({"text": t}) + "\n" + ("\n" if j == 3 else "") for j, t in enumerate(texts)]
        elif suffix == ".txt":
            lines = [t + "\nsecond line\n\n\n" for t in texts]
            texts = [t + "\nsecond line" for t in texts]
        else:  # csv
            lines = ["text\n"] + [f'"{t}"\n' for t in texts]
        paths.append(_write(tmp_path / f"part{i}{suffix}", lines))
    return paths


@pytest.mark.parametrize("module", [counter_rng, files_lib, mixture_lib, base_lib])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_counter_randomness_is_a_pure_function_of_its_key():
    assert counter_rng.permutation(6, 1, "shards", 0) == counter_rng.permutation(6, 1, "shards", 0)
    assert counter_rng.permutation(6, 1, "shards", 0) != counter_rng.permutation(6, 1, "shards", 1)
    draws = [counter_rng.uniform(0, "mixture", k) for k in range(20_000)]
    assert all(0 <= u < 1 for u in draws) and abs(sum(draws) / len(draws) - 0.5) < 0.01


# ---------------------------------------------------------------- file shards


def test_an_epoch_is_every_record_once_in_a_shard_order_from_the_seed(corpus):
    records, _ = _take(FileStream(corpus, seed=1, epochs=2))
    everything = [t for p in corpus for t in sources.read_file(p)]
    assert len(records) == 2 * len(everything) == 1000
    assert sorted(records[:500]) == sorted(everything) == sorted(records[500:])

    def shard_order(chunk):
        return list(dict.fromkeys(_doc_id(t).split(":")[0] for t in chunk))

    assert shard_order(records[:500]) != shard_order(records[500:])  # reshuffled each epoch
    assert records == _take(FileStream(corpus, seed=1, epochs=2))[0]  # a pure function of the seed
    assert shard_order(records[:500]) != shard_order(_take(FileStream(corpus, seed=2, epochs=1))[0])
    assert shard_order(_take(FileStream(corpus, shuffle=False, epochs=1))[0]) == list("01234")


@pytest.mark.parametrize("cut", [1, 7, 10, 99, 100, 101, 499, 500, 755])
def test_parquet_resume_continues_exactly(corpus, cut):
    records, positions = _take(FileStream(corpus, seed=3, epochs=2))
    resumed = FileStream(corpus, seed=3, epochs=2, position=positions[cut - 1])
    assert _take(resumed)[0] == records[cut:]
    if cut == 7:  # inside the first row group of a shard: row group and row
        assert positions[6]["seek"] == {"row_group": 0, "row": 7} and positions[6]["record"] == 7


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".txt", ".csv"])
def test_line_formats_resume_exactly(tmp_path, suffix):
    paths = _line_shards(tmp_path, suffix)
    records, positions = _take(FileStream(paths, seed=0, epochs=2))
    assert len(records) == 42 and sorted(records[:21]) == sorted(t for p in paths for t in sources.read_file(p))
    for cut in (1, 6, 7, 8, 20, 21, 30):
        assert _take(FileStream(paths, seed=0, epochs=2, position=positions[cut - 1]))[0] == records[cut:]
    assert (positions[3]["seek"] is None) == (suffix == ".csv")
    assert files_lib.seekable(paths[0]) == (suffix in (".jsonl", ".txt"))


class _Log:
    """What the readers touched: (file, row group) of parquet, (file, first offset) of other files."""

    def __init__(self, monkeypatch):
        import pyarrow.parquet as pq

        self.row_groups, self.offsets = [], []
        iter_batches, open_binary = pq.ParquetFile.iter_batches, files_lib._open_binary
        log = self

        def logged_batches(parquet, *args, row_groups=None, **kwargs):
            log.row_groups += [(Path(parquet._path).name, g) for g in row_groups]
            return iter_batches(parquet, *args, row_groups=row_groups, **kwargs)

        def logged_open(path):
            f = open_binary(path)
            seek = f.seek
            f.seek = lambda offset, *a: (log.offsets.append((Path(path).name, offset)), seek(offset, *a))[1]
            return f

        def logged_init(parquet, source, *args, **kwargs):
            parquet._path = source
            init(parquet, source, *args, **kwargs)

        init = pq.ParquetFile.__init__
        monkeypatch.setattr(pq.ParquetFile, "__init__", logged_init)
        monkeypatch.setattr(pq.ParquetFile, "iter_batches", logged_batches)
        monkeypatch.setattr(files_lib, "_open_binary", logged_open)


def test_a_parquet_resume_reads_no_row_group_before_the_position(corpus, monkeypatch):
    stream = FileStream(corpus, seed=4, epochs=1)
    records, positions = _take(stream)
    saved = positions[200 + 25 - 1]  # shard slot 2, row 25: inside its third row group
    order = [corpus[i].name for i in stream.order(0)]
    assert saved["slot"] == 2 and saved["seek"]["row_group"] >= 2
    log = _Log(monkeypatch)
    resumed = FileStream(corpus, seed=4, epochs=1, position=saved)
    assert next(iter(resumed)) == records[225]
    assert log.row_groups and all(name == order[2] and g >= saved["seek"]["row_group"] for name, g in log.row_groups)
    assert _take(resumed)[0] == records[226:]
    assert {name for name, _ in log.row_groups} == set(order[2:])  # the earlier shards: never opened


def test_a_jsonl_resume_starts_reading_at_the_saved_byte(tmp_path, monkeypatch):
    paths = _line_shards(tmp_path, ".jsonl")
    records, positions = _take(FileStream(paths, shuffle=False, epochs=1))
    saved = positions[9]  # the third record of the second shard
    log = _Log(monkeypatch)
    assert _take(FileStream(paths, shuffle=False, epochs=1, position=saved))[0] == records[10:]
    assert log.offsets[0] == ("part1.jsonl", saved["seek"]["byte"]) and saved["seek"]["byte"] > 0
    assert [name for name, _ in log.offsets] == ["part1.jsonl", "part2.jsonl"]


@pytest.mark.parametrize("processes", [2, 3, 5, 7])
def test_processes_read_disjoint_records_whose_union_is_the_one_process_epoch(corpus, processes):
    # 5 shards: 2, 3 and 5 processes get whole shards, 7 share each shard record by record.
    one = _take(FileStream(corpus, seed=5, epochs=1))[0]
    parts = [_take(FileStream(corpus, seed=5, epochs=1, process_index=p, process_count=processes))[0]
             for p in range(processes)]
    assert sum(map(len, parts)) == len(one) and sorted(t for part in parts for t in part) == sorted(one)
    if processes == 7:
        assert "every 7th record" in FileStream(corpus, process_index=6, process_count=7).describe()
        assert all(parts)
    # Each process resumes its own part exactly.
    stream = FileStream(corpus, seed=5, epochs=1, process_index=processes - 1, process_count=processes)
    records, positions = _take(stream)
    cut = len(records) // 2
    resumed = FileStream(corpus, seed=5, epochs=1, process_index=processes - 1, process_count=processes,
                         position=positions[cut - 1])
    assert _take(resumed)[0] == records[cut:]


def test_keep_drops_records_but_the_position_still_counts_them(corpus):
    keep = lambda text: not sources.is_validation(text, 0.2)  # noqa: E731
    kept, positions = _take(FileStream(corpus, seed=0, epochs=1, keep=keep))
    assert 0 < len(kept) < 500 and all(keep(t) for t in kept)
    assert _take(FileStream(corpus, seed=0, epochs=1, keep=keep, position=positions[40]))[0] == kept[41:]


def test_file_stream_errors_are_one_line(corpus, tmp_path):
    cases = [
        (lambda: FileStream([*corpus, tmp_path / "gone.parquet"]), "gone.parquet: no such file"),
        (lambda: FileStream([]), "lists no file"),
        (lambda: FileStream([tmp_path / "notes.docx"]), "unknown format"),
        (lambda: FileStream(corpus, process_index=2, process_count=2), "process 2 of 2"),
        (lambda: next(iter(FileStream(corpus, text_column="body"))), "no text column 'body'"),
    ]
    (tmp_path / "empty.jsonl").write_text("\n")
    cases.append((lambda: next(iter(FileStream([tmp_path / "empty.jsonl"])))  , "holds no text"))
    saved = _take(FileStream(corpus, seed=0), 3)[1][-1]
    cases += [
        (lambda: FileStream(corpus, seed=1, position=saved), "seed=0, this run seed=1"),
        (lambda: FileStream(corpus, seed=0, process_count=2, position=saved), "process_count=1, this run"),
        (lambda: FileStream(corpus[:4], seed=0, position=saved), "shards=5, this run shards=4"),
        (lambda: FileStream(corpus, position=dict(saved, kind="tfds")), "of kind 'tfds'"),
    ]
    for make, message in cases:
        with pytest.raises(UserError, match=message) as error:
            make()
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------- dataset directories and datasets


def test_a_dataset_directory_is_read_by_split_with_the_file_stream(tmp_path, corpus):
    (tmp_path / "data").mkdir()
    for path in corpus[:2]:
        (tmp_path / "data" / path.name).write_bytes(path.read_bytes())
    _write(tmp_path / "data" / "validation-00000-of-00001.jsonl", [json.dumps({"text": "held out"}) + "\n"])
    assert [p.name for p in dataset_files(tmp_path, "train")] == [p.name for p in corpus[:2]]
    train = open_stream(tmp_path, split="train", seed=0, epochs=1)
    assert isinstance(train, FileStream) and len(_take(train)[0]) == 200
    assert list(open_stream(tmp_path, split="validation", epochs=1)) == ["held out"]
    with pytest.raises(UserError, match="no split 'test'; the splits are train, validation"):
        open_stream(tmp_path, split="test")
    with pytest.raises(UserError, match="is a file"):
        open_stream(corpus[0])


def test_a_datasets_stream_resumes_through_its_state_dict_and_splits_by_node(tmp_path):
    # .txt files: datasets reads one record per line, so open_stream leaves them to it.
    for i in range(4):
        (tmp_path / f"part{i}.txt").write_text("".join(f"line {i}.{j}\n" for j in range(6)))
    stream = open_stream(str(tmp_path), split="train", epochs=2)
    assert isinstance(stream, HubStream)
    records, positions = _take(stream)
    assert len(records) == 48 and records[:24] == records[24:]
    for cut in (5, 24, 30):
        resumed = HubStream(str(tmp_path), split="train", epochs=2, position=positions[cut - 1])
        assert _take(resumed)[0] == records[cut:]
    parts = [list(HubStream(str(tmp_path), epochs=1, process_index=p, process_count=2)) for p in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(records[:24]) and not set(parts[0]) & set(parts[1])
    mine, positions = _take(HubStream(str(tmp_path), epochs=1, process_index=1, process_count=2))
    assert _take(HubStream(str(tmp_path), epochs=1, process_index=1, process_count=2, position=positions[4]))[0] \
        == mine[5:]
    with pytest.raises(UserError, match="seed=0, this run seed=9"):
        HubStream(str(tmp_path), seed=9, position=positions[0])


def test_a_hub_id_without_network_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="needs network access to the Hugging Face Hub .HF_HUB_OFFLINE is set"):
        open_stream("someone/some-dataset")


# ---------------------------------------------------------------- TFDS


def test_a_tfds_dataset_streams_resumes_and_splits_by_process(tfds_dir):
    stream = open_stream("tfds:tiny_text/en", data_dir=tfds_dir, split="train", epochs=2)
    records, positions = _take(stream)
    assert len(records) == 120 and sorted(records[:60]) == sorted(f"example {i}" for i in range(60))
    assert records[:60] == records[60:]
    for cut in (1, 14, 31, 60, 77):
        resumed = open_stream("tfds:tiny_text/en", data_dir=tfds_dir, split="train", epochs=2,
                              position=positions[cut - 1])
        assert _take(resumed)[0] == records[cut:]
    # The resume's slice opens no file before the one holding the position.
    resumed = open_stream("tfds:tiny_text/en", data_dir=tfds_dir, epochs=1, position=positions[33])
    instructions = resumed.builder.info.splits[resumed.slice()].file_instructions
    assert [i.filename.split("-")[-3] for i in instructions] == ["00002", "00003"] and instructions[0].skip == 4
    parts = [list(open_stream("tfds:tiny_text/en", data_dir=tfds_dir, epochs=1, process_index=p, process_count=3))
             for p in range(3)]
    assert [len(p) for p in parts] == [20, 20, 20] and sorted(sum(parts, [])) == sorted(records[:60])


def test_tfds_errors_are_one_line(tfds_dir, tmp_path):
    cases = [
        (lambda: open_stream("tfds:tiny_text/en", data_dir=tfds_dir, split="test"), "no split 'test'"),
        (lambda: open_stream("tfds:tiny_text/en", data_dir=tfds_dir, text_column="body"), "no text column 'body'"),
        (lambda: open_stream("tfds:no_such_set_xyz", data_dir=tmp_path), "tfds:no_such_set_xyz"),
    ]
    for make, message in cases:
        with pytest.raises(UserError, match=message) as error:
            make()
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------- mixtures


def _mixture_sources(tmp_path):
    web = _write(tmp_path / "web.jsonl", [json.dumps({"text": f"web {i}"}) + "\n" for i in range(50)])
    code = _write(tmp_path / "code.jsonl", [json.dumps({"text": f"code {i}"}) + "\n" for i in range(30)])
    return [web], [code]


def test_a_70_30_mixture_realizes_its_weights_and_resumes_exactly(tmp_path):
    web, code = _mixture_sources(tmp_path)
    mix = Mixture([FileStream(web), FileStream(code)], [0.7, 0.3], seed=0, names=["web", "code"])
    records = []
    for text in mix:
        records.append(text)
        if len(records) == 6_000:
            saved = json.loads(json.dumps(mix.position()))
        if len(records) == 10_000:
            break
    share = sum(t.startswith("web") for t in records) / len(records)
    assert abs(share - 0.7) <= 0.02 and mix.proportions() == pytest.approx([share, 1 - share])
    assert "web: 7" in mix.report() and "(weight 70.0%)" in mix.report()
    streams = [FileStream(f, position=p) for f, p in zip([web, code], Mixture.stream_positions(saved))]
    resumed = Mixture(streams, [0.7, 0.3], seed=0, position=saved)
    assert _take(resumed, 4_000)[0] == records[6_000:]
    assert resumed.proportions() == mix.proportions()  # the counts continue across the resume
    other = _take(Mixture([FileStream(web), FileStream(code)], [0.7, 0.3], seed=1), 100)[0]
    assert other != records[:100]


def test_a_mixture_ends_when_a_finite_source_it_draws_ends(tmp_path):
    web, code = _mixture_sources(tmp_path)
    records = list(Mixture([FileStream(web, epochs=1), FileStream(code, epochs=1)], [1, 1]))
    assert 30 <= len(records) < 80 and (sum(t.startswith("web") for t in records) == 50
                                        or sum(t.startswith("code") for t in records) == 30)


def test_bad_mixture_weights_are_one_line_errors(tmp_path):
    web, code = _mixture_sources(tmp_path)
    assert check_weights([7, 3]) == [0.7, 0.3]
    for weights, message in [([-1, 1], "weight -1"), ([math.nan, 1], "weight nan"), (["a", 1], "weight 'a'"),
                              ([0, 0], "sum to 0"), ([], "lists no source"), ([True, 1], "weight True")]:
        with pytest.raises(UserError, match=message):
            check_weights(weights)
    with pytest.raises(UserError, match="2 sources but 3 weights"):
        Mixture([FileStream(web), FileStream(code)], [1, 1, 1])
    saved = Mixture([FileStream(web), FileStream(code)], [0.7, 0.3]).position()
    with pytest.raises(UserError, match="weights"):
        Mixture([FileStream(web), FileStream(code)], [0.5, 0.5], position=saved)


# ---------------------------------------------------------------- estimates and validation


def _byte_tokens(text):
    return len(text.encode("utf-8"))


def test_token_estimates_come_from_metadata_and_are_labelled(corpus, tmp_path, tfds_dir):
    true = sum(_byte_tokens(t) + 1 for p in corpus for t in sources.read_file(p))
    est = estimate_files(corpus, _byte_tokens, sample_records=50)
    assert est.is_estimate and est.records == 500 and est.records_exact
    assert abs(est.tokens - true) / true < 0.05 and "an estimate, not a count" in est.describe()
    paths = _line_shards(tmp_path, ".jsonl.gz")
    true = sum(_byte_tokens(t) + 1 for p in paths for t in sources.read_file(p))
    est = estimate_files(paths, _byte_tokens, sample_records=10)
    assert not est.records_exact and abs(est.records - 21) <= 3 and 0.4 < est.tokens / true < 1.0  # JSON markup
    whole = estimate_files(paths, _byte_tokens, sample_records=100)  # a sample that reads the source to its end
    assert (whole.records, whole.tokens) == (21, true)
    est = estimate_tokens("tfds:tiny_text/en", _byte_tokens, data_dir=tfds_dir, sample_records=20)
    assert est.records == 60 and est.records_exact and "TFDS metadata" in est.basis
    assert 0.8 < est.tokens / sum(len(f"example {i}") + 1 for i in range(60)) < 1.2
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "a.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError, match="metadata gives no size"):
        estimate_tokens(str(tmp_path / "lines"), _byte_tokens)
    # A dataset card's split sizes (what hub datasets carry) give the exact record count.
    (tmp_path / "lines" / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: text\n    dtype: string\n  splits:\n  - name: train\n"
        "    num_bytes: 8\n    num_examples: 2000\n---\n")
    est = estimate_tokens(str(tmp_path / "lines"), _byte_tokens)
    assert est.records == 2000 and est.records_exact and est.tokens == 2000 * 4 and est.sample_records == 2


def test_validation_reads_a_bounded_deterministic_set(corpus):
    def stream():
        return open_stream(list(corpus), shuffle=False, epochs=1)

    val = read_validation(stream(), max_examples=25)
    assert val.records == read_validation(stream(), max_examples=25).records
    assert list(val.records) == _take(stream(), 25)[0] and "the first 25 records" in val.describe()
    by_tokens = read_validation(stream(), max_tokens=1000, count_tokens=_byte_tokens)
    assert by_tokens.tokens >= 1000 and by_tokens.tokens - _byte_tokens(by_tokens.records[-1]) - 1 < 1000
    assert len(read_validation(stream(), max_examples=10_000).records) == 500  # a short source: all of it
    for kwargs, message in [({}, "needs a bound"), ({"max_examples": 0}, "--max-val-examples 0"),
                            ({"max_tokens": -5, "count_tokens": len}, "--eval-tokens -5")]:
        with pytest.raises(UserError, match=message):
            read_validation(stream(), **kwargs)
