"""Which runs stream their source, and the record streams of a run's data flags (mixtures, hold-out)."""

import itertools

import pytest

from tools.make_corpus import write_parquet_corpus
from ultimate_trainer.config import resolve_config
from ultimate_trainer.data import sources, streamed
from ultimate_trainer.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A dataset directory of 4 parquet shards (train-*.parquet), 200 short documents in all."""
    directory = tmp_path_factory.mktemp("ds")
    write_parquet_corpus(directory, shards=4, megabytes=0.04, doc_chars=(100, 300), row_group_bytes=2000)
    return directory


def test_which_sources_stream(corpus, monkeypatch):
    data = lambda **v: resolve_config({f"data.{k}": x for k, x in v.items()}).data  # noqa: E731
    assert streamed.streamed(data(dataset_id="allenai/c4"))[0]
    assert streamed.streamed(data(dataset_id="tfds:c4/en"))[0]
    assert streamed.streamed(data(data_mix=f"{corpus}:1"))[0]
    small = streamed.streamed(data(data_files=str(corpus)))
    assert not small[0] and "counted in one pass" in small[1]
    monkeypatch.setattr(streamed, "STREAM_ABOVE_BYTES", 1000)  # the rule reads the file sizes only
    assert streamed.streamed(data(data_files=str(corpus)))[0]
    capped = streamed.streamed(data(dataset_id="x/y", max_train_examples=10, max_val_examples=5))
    assert not capped[0] and "counted" in capped[1]
    assert not streamed.streamed(data())[0]
    assert streamed.streamed(data(data_files=str(corpus), eval_tokens=100))[0]  # bounded in tokens: streamed


def test_train_and_validation_streams_hold_out_disjoint_records(corpus):
    d = resolve_config({"data.dataset_id": str(corpus), "data.val_fraction": 0.2}).data
    train = list(itertools.islice(streamed.open_train_stream(d, seed=1), 400))
    val = list(streamed.open_val_stream(d))
    assert val and len(train) == 400  # endless: the epochs go on
    assert set(train).isdisjoint(val) and all(sources.is_validation(t, 0.2) for t in val)
    assert list(streamed.open_val_stream(d)) == val  # the same ordered pass every time


def test_a_mix_draws_files_and_datasets_and_resumes(corpus, tmp_path):
    code = tmp_path / "code.jsonl"
    code.write_text("".join(f'{{"text": "code {i}"}}\n' for i in range(50)))
    d = resolve_config({"data.data_mix": f"{corpus}:0.7,{code}:0.3"}).data
    stream = streamed.open_train_stream(d, seed=3)
    first = list(itertools.islice(stream, 60))
    saved = stream.position()
    rest = list(itertools.islice(stream, 40))
    again = list(itertools.islice(streamed.open_train_stream(d, seed=3, position=saved), 40))
    assert again == rest
    assert 0 < sum(t.startswith("code") for t in first + rest) < 100


def test_an_unknown_mix_source_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = resolve_config({"data.data_mix": f"{tmp_path}/none/*.parquet:1"}).data
    with pytest.raises(UserError, match="the pattern matches no file"):
        streamed.open_train_stream(d, seed=0)
    d = resolve_config({"data.data_mix": "no/such-dataset:1"}).data
    with pytest.raises(UserError, match="--dataset-id no/such-dataset needs network access"):
        streamed.open_train_stream(d, seed=0)
