from types import SimpleNamespace

import pytest

from ultimate_trainer.data import sources
from ultimate_trainer.data.tokenizers import ByteTokenizer, load_tokenizer
from ultimate_trainer.errors import UserError


def _cfg(**kw):
    base = dict(val_fraction=0.05, max_train_examples=None, max_val_examples=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_default_corpus_is_the_stdlib_topics():
    from pydoc_data.topics import topics

    records = sources.default_records()
    joined = "".join(records)
    assert len(records) > 200
    assert sum(len(t) for t in topics.values()) - len(joined) < 200 * len(topics)  # only blank lines lost at cuts
    assert "assert" in joined


def test_split_is_deterministic_disjoint_and_about_the_fraction():
    train, val, _ = sources.load_records(_cfg())
    train2, val2, _ = sources.load_records(_cfg())
    assert train == train2 and val == val2
    assert not set(train) & set(val)
    share = sum(map(len, val)) / sum(map(len, train + val))
    assert 0.01 < share < 0.15


def test_split_never_leaves_validation_empty():
    train, val = sources.split_records(["a", "b"], 1e-9)
    assert val == ["b"] and train == ["a"]


def test_max_examples_limits_records():
    train, val, _ = sources.load_records(_cfg(max_train_examples=10, max_val_examples=2))
    assert len(train) == 10 and len(val) == 2


def test_empty_training_data_is_an_error(monkeypatch):
    monkeypatch.setattr(sources, "default_records", lambda: [])
    with pytest.raises(UserError, match="training data is empty"):
        sources.load_records(_cfg())


def test_byte_tokenizer_round_trip_and_saved_form(tmp_path):
    tok = ByteTokenizer()
    text = "naïve ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.count_tokens(text) == len(ids)
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_byte_tokenizer_in_graph_matches_python():
    import tensorflow as tf

    tok = ByteTokenizer()
    text = "graph ✓ text"
    assert tok.tf_encode(tf.constant(text)).numpy().tolist() == tok.encode(text)
