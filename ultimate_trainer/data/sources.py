"""Text sources: each returns records (strings) for training and validation."""

import hashlib

from ultimate_trainer.errors import UserError

DEFAULT_DATA_NAME = "pydoc_data.topics (Python standard library documentation)"
_RECORD_CHARS = 2000


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


def load_records(data_cfg):
    """Returns (train_records, val_records, source description) for a run."""
    records = default_records()
    train, val = split_records(records, data_cfg.val_fraction)
    if data_cfg.max_train_examples:
        train = train[: data_cfg.max_train_examples]
    if data_cfg.max_val_examples:
        val = val[: data_cfg.max_val_examples]
    if not train:
        raise UserError("the training data is empty; check --max-train-examples")
    if not val:
        raise UserError("the validation data is empty; raise --val-fraction or --max-val-examples")
    return train, val, DEFAULT_DATA_NAME
