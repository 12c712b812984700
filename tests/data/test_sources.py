"""Text sources: the default corpus, local files of every format, hub ids, splits and errors."""

import gzip
import json
import time
import tracemalloc

import pytest

from ultimate_trainer.config import DataConfig, resolve_config
from ultimate_trainer.data import sources
from ultimate_trainer.errors import UserError

# Multi-line text, commas and quotes: what each format must carry intact.
RECORDS = ["first record, with a comma", 'second "quoted"\nover two lines', "third ünïcode ✓"]


def _cfg(**kw):
    return DataConfig(**kw)


def _texts(**kw):
    """All records of a source, training and validation, in source order."""
    cfg = _cfg(val_fraction=1e-9, **kw)
    return list(sources.iter_records(cfg, "train")) + list(sources.iter_records(cfg, "validation"))


# ---------------------------------------------------------------- default corpus and the split


def test_default_corpus_is_the_stdlib_topics():
    from pydoc_data.topics import topics

    records = sources.default_records()
    joined = "".join(records)
    assert len(records) > 200
    assert sum(len(t) for t in topics.values()) - len(joined) < 200 * len(topics)  # only blank lines lost at cuts
    assert "assert" in joined


def test_split_is_deterministic_disjoint_and_about_the_fraction():
    train, val, name = sources.load_records(_cfg())
    train2, val2, _ = sources.load_records(_cfg())
    assert train == train2 and val == val2
    assert not set(train) & set(val)
    share = sum(map(len, val)) / sum(map(len, train + val))
    assert 0.01 < share < 0.15
    assert name == sources.DEFAULT_DATA_NAME


def test_split_never_leaves_validation_empty():
    train, val = sources.split_records(["a", "b"], 1e-9)
    assert val == ["b"] and train == ["a"]


def test_max_examples_limits_records():
    train, val, _ = sources.load_records(_cfg(max_train_examples=10, max_val_examples=2))
    assert len(train) == 10 and len(val) == 2


def test_lazy_form_gives_the_same_records_as_the_lists():
    cfg = _cfg(max_train_examples=30, max_val_examples=5)
    train, val, _ = sources.load_records(cfg)
    assert list(sources.iter_records(cfg, "train")) == train
    assert list(sources.iter_records(cfg, "validation")) == val
    full_train, full_val, _ = sources.load_records(_cfg())
    assert train == full_train[:30] and val == full_val[:5]
    with pytest.raises(ValueError, match="split must be"):
        sources.iter_records(cfg, "test")


def test_empty_training_data_is_an_error(monkeypatch):
    monkeypatch.setattr(sources, "default_records", lambda: ["one record", "another"])
    with pytest.raises(UserError, match="training data is empty"):
        sources.load_records(_cfg(val_fraction=0.999999))
    monkeypatch.setattr(sources, "default_records", lambda: [])
    with pytest.raises(UserError, match="holds no text"):
        sources.load_records(_cfg())


# ---------------------------------------------------------------- local file formats


def _write_tfrecord(path, records, column="text"):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for text in records:
            feature = {column: tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))}
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def _write_csv(path, records, column="text"):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", column])
        writer.writerows([i, text] for i, text in enumerate(records))


def _write_parquet(path, records, column="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(records))), column: records}), path, row_group_size=2)


WRITERS = {
    "data.jsonl": lambda p, r: p.write_text("".join(json.dumps({"text": t, "n": 1}) + "\n\n" for t in r)),
    "data.json": lambda p, r: p.write_text(json.dumps([{"text": t} for t in r], indent=1)),
    "strings.json": lambda p, r: p.write_text(json.dumps(r)),
    "lines.json": lambda p, r: p.write_text("".join(json.dumps({"text": t}) + "\n" for t in r)),
    "data.jsonl.gz": lambda p, r: p.write_bytes(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in r).encode())),
    "data.csv": _write_csv,
    "data.parquet": _write_parquet,
    "data.tfrecord": _write_tfrecord,
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_format_reads_its_records_in_order(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, RECORDS)
    assert list(sources.read_file(path)) == RECORDS
    assert _texts(data_files=str(path)) == RECORDS


def test_txt_records_are_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"one line\nstill the first\n\n\n  \nsecond paragraph\r\n\r\nthird\n")
    assert list(sources.read_file(path)) == ["one line\nstill the first", "second paragraph", "third"]


def test_a_directory_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    (tmp_path / "b" / "3.csv").write_text("text\nthree\n")
    (tmp_path / "notes.md").write_text("not data")  # unknown suffix: skipped in a directory
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    assert [p.name for p in sources.resolve_data_files(str(tmp_path))] == ["a.jsonl", "2.txt", "3.csv"]
    train, val, name = sources.load_records(_cfg(data_files=str(tmp_path), val_fraction=1e-9))
    assert train + val == ["one", "two", "three"]
    assert "(3 files)" in name


def test_a_glob_matches_files(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i}.txt").write_text(f"part {i}")
    (tmp_path / "other.txt").write_text("other")
    files = sources.resolve_data_files(str(tmp_path / "part-*.txt"))
    assert [p.name for p in files] == ["part-0.txt", "part-1.txt", "part-2.txt"]


def test_lazy_reading_holds_one_record_at_a_time(tmp_path):
    path = tmp_path / "big.jsonl"
    line = json.dumps({"text": "x" * 200}) + "\n"
    path.write_text(line * 20000 + "this line is not json\n")  # 4 MB, broken at the very end
    records = sources.iter_records(_cfg(data_files=str(path)), "train")
    assert next(records) == "x" * 200  # reading starts without touching the end of the file
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match="big.jsonl:20001: not valid JSON"):
            for _ in records:
                pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_open_records_rereads_the_source_on_every_pass(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(400)))
    cfg = _cfg(data_files=str(path), max_train_examples=300)
    train, val, _ = sources.open_records(cfg)
    assert not isinstance(train, list) and len(train) == 300
    assert list(train) == list(train) == list(sources.iter_records(cfg, "train"))
    assert list(val) == list(sources.iter_records(cfg, "validation")) and len(val) == len(list(val))
    path.write_text(json.dumps({"text": "changed"}) + "\n")
    assert list(train) == ["changed"]  # nothing was kept in memory


def test_open_records_moves_one_record_to_an_empty_validation_side(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(5)))
    train, val, _ = sources.open_records(_cfg(data_files=str(path), val_fraction=1e-9))
    assert list(train) == [f"record {i}" for i in range(4)] and len(train) == 4
    assert list(val) == ["record 4"] and len(val) == 1


def test_max_examples_with_files_stop_reading_early(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(1000)) + "{broken\n")
    train, val, _ = sources.load_records(_cfg(data_files=str(path), max_train_examples=50, max_val_examples=3))
    assert len(train) == 50 and len(val) == 3
    assert all(sources.is_validation(t, 0.05) for t in val)


def test_bytes_that_are_not_utf8_are_replaced_and_counted_once(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n\n".encode("latin-1") * 10 + b"ok \xff\xfe end\n")
    train, val, name = sources.load_records(_cfg(data_files=str(path)))
    texts = train + val
    assert "caf\ufffd" in texts and "ok \ufffd\ufffd end" in texts
    assert name.endswith("; 12 bytes that were not UTF-8 replaced with U+FFFD")
    stats = sources.ReadStats()
    list(sources.read_file(path, stats=stats))
    assert stats.replaced_bytes == 12


# ---------------------------------------------------------------- errors, each one line


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.jsonl", '{"body": "x", "id": 1}\n', r"a.jsonl:1: no text column 'text'; the columns are 'body', 'id'; pass --text-column"),
        ("a.json", '[{"body": "x"}]', r"a.json\[0\]: no text column 'text'; the columns are 'body'"),
        ("a.csv", "body,id\nx,1\n", r"a.csv \(header\): no text column 'text'; the columns are 'body', 'id'"),
        ("a.jsonl", '{"text": 3}\n', r"column 'text' holds int, not text"),
        ("a.jsonl", '{"text": "x"}\n{"text": \n', r"a.jsonl:2: not valid JSON"),
        ("a.json", '[{"text": "x"},', r"a.json: not valid JSON"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError, match=message) as e:
        sources.load_records(_cfg(data_files=str(tmp_path / name)))
    assert "\n" not in str(e.value)


def test_missing_columns_in_binary_formats(tmp_path):
    _write_parquet(tmp_path / "a.parquet", RECORDS, column="body")
    with pytest.raises(UserError, match=r"no text column 'text'; the columns are 'body', 'id'"):
        list(sources.read_file(tmp_path / "a.parquet"))
    _write_tfrecord(tmp_path / "a.tfrecord", RECORDS, column="body")
    with pytest.raises(UserError, match=r"a.tfrecord example 1: no text column 'text'; the columns are 'body'"):
        list(sources.read_file(tmp_path / "a.tfrecord"))
    assert list(sources.read_file(tmp_path / "a.tfrecord", text_column="body")) == RECORDS


def test_damaged_binary_files_are_one_line_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="bad.parquet: not a readable parquet file"):
        list(sources.read_file(tmp_path / "bad.parquet"))
    (tmp_path / "bad.tfrecord").write_bytes(b"not a tfrecord file, just bytes")
    with pytest.raises(UserError, match="bad.tfrecord: not a TFRecord file"):
        list(sources.read_file(tmp_path / "bad.tfrecord"))


def test_file_selection_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        sources.resolve_data_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="the pattern matches no file"):
        sources.resolve_data_files(str(tmp_path / "*.jsonl"))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match="holds no data file"):
        sources.resolve_data_files(str(tmp_path))
    with pytest.raises(UserError, match=r"notes.md: unknown format .md; use .csv, .json"):
        sources.resolve_data_files(str(tmp_path / "notes.md"))
    with pytest.raises(UserError, match="unknown format"):
        sources.read_file(tmp_path / "notes.md")
    with pytest.raises(UserError, match="no such file"):
        sources.read_file(tmp_path / "gone.txt")


def test_an_empty_file_is_an_empty_dataset(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl \\(1 file\\): holds no text; check the files and --text-column text"):
        sources.load_records(_cfg(data_files=str(tmp_path / "empty.jsonl")))


def test_config_checks_the_data_flags(tmp_path):
    with pytest.raises(UserError, match="--data-files .*missing: no such file or directory"):
        resolve_config({"data.data_files": str(tmp_path / "missing")})
    with pytest.raises(UserError, match="--dataset-id and --data-files both choose the data"):
        resolve_config({"data.data_files": str(tmp_path), "data.dataset_id": "x/y"})
    with pytest.raises(UserError, match="--val-split applies to --dataset-id only"):
        resolve_config({"data.val_split": "test"})
    with pytest.raises(UserError, match="--dataset-config applies to --dataset-id only"):
        resolve_config({"data.dataset_config": "en"})
    with pytest.raises(UserError, match="--val-split train is also the training --split"):
        resolve_config({"data.dataset_id": "x/y", "data.val_split": "train"})
    with pytest.raises(UserError, match="--text-column must not be empty"):
        resolve_config({"data.text_column": ""})
    resolve_config({"data.split": "train"})  # the default, typed out: fine


# ---------------------------------------------------------------- hub datasets


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://hub.invalid",  # a name that never resolves
        "https://10.255.255.1:9",  # an address that never answers (or, behind some proxies, not with HTTP)
    ],
)
def test_a_hub_id_without_network_fails_fast_with_one_line(monkeypatch, endpoint):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.perf_counter()
    with pytest.raises(UserError) as e:
        sources.load_records(_cfg(dataset_id="roneneldan/TinyStories"))
    assert time.perf_counter() - start < sources.NETWORK_TIMEOUT_S + 2
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("--dataset-id roneneldan/TinyStories needs network access to the Hugging Face Hub")
    assert "--data-files PATH" in message and "a downloaded copy" in message


def test_offline_mode_refuses_a_hub_id_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"needs network access to the Hugging Face Hub \(HF_HUB_OFFLINE is set\)"):
        list(sources.iter_records(_cfg(dataset_id="allenai/c4", dataset_config="en"), "train"))
    assert time.perf_counter() - start < 1


@pytest.fixture
def dataset_dir(tmp_path):
    """A dataset directory as `datasets` reads it: one jsonl file per split."""
    root = tmp_path / "my_dataset"
    root.mkdir()
    for split, n in (("train", 40), ("validation", 6)):
        lines = [json.dumps({"text": f"{split} story {i}", "story_id": i}) for i in range(n)]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_local_dataset_directory_streams_through_datasets(dataset_dir):
    pytest.importorskip("datasets")
    cfg = _cfg(dataset_id=str(dataset_dir), val_split="validation", max_train_examples=25)
    train, val, name = sources.load_records(cfg)
    assert train == [f"train story {i}" for i in range(25)]
    assert val == [f"validation story {i}" for i in range(6)]
    assert name == f"{dataset_dir} split train, validation split validation"
    held = sources.load_records(_cfg(dataset_id=str(dataset_dir), val_fraction=0.2))
    assert sorted(held[0] + held[1]) == sorted(f"train story {i}" for i in range(40))
    assert all(sources.is_validation(t, 0.2) for t in held[1])


def test_dataset_directory_errors(dataset_dir):
    pytest.importorskip("datasets")
    with pytest.raises(UserError, match=r"no text column 'body'; the columns are 'story_id', 'text'"):
        sources.load_records(_cfg(dataset_id=str(dataset_dir), text_column="body"))
    with pytest.raises(UserError, match=r"split 'nope': .*nope") as e:
        sources.load_records(_cfg(dataset_id=str(dataset_dir), split="nope"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("values,flag", [({"data_mix": "a.jsonl:1"}, "--data-mix"),
                                         ({"data_files": "a.jsonl", "eval_tokens": 100}, "--eval-tokens"),
                                         ({"dataset_id": "tfds:c4"}, "--dataset-id tfds:c4")])
def test_what_only_the_streamed_input_reads_is_not_counted(values, flag):
    with pytest.raises(UserError, match=f"^{flag} is read by a training run's streamed input only"):
        sources.open_records(_cfg(**values))
