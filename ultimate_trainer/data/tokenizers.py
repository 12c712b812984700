"""Tokenizers: encode text to ids in Python and inside tf.data graphs."""

import json
from pathlib import Path

from ultimate_trainer.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then EOS (256) and PAD (257). Needs no training.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hi")
        [104, 105]
        >>> tok.decode([104, 105, tok.eos_id])
        'hi'
    """

    kind = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        data = bytes(i for i in ids if 0 <= i < 256)
        # A sampled sequence may end inside a multi-byte character.
        return data.decode("utf-8", errors="replace")

    def tf_encode(self, text):
        """Encodes one scalar tf.string inside a tf.data map; returns int32 ids."""
        import tensorflow as tf

        return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32)

    def count_tokens(self, text):
        return len(text.encode("utf-8"))

    def save(self, directory):
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({"kind": self.kind, "vocab_size": self.vocab_size}) + "\n")

    def describe(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "pad_id": self.pad_id}


def load_tokenizer(directory):
    """Loads the tokenizer saved beside a run or checkpoint."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{directory} holds no {TOKENIZER_FILE}; point at a run's checkpoint directory")
    meta = json.loads(path.read_text())
    if meta.get("kind") == "byte":
        return ByteTokenizer()
    raise UserError(f"{path}: unknown tokenizer kind {meta.get('kind')!r}")


def make_tokenizer(tokenizer_cfg):
    """The tokenizer a run asks for."""
    if tokenizer_cfg.tokenizer == "byte":
        return ByteTokenizer()
    raise UserError(f"--tokenizer {tokenizer_cfg.tokenizer!r} is not supported; use byte")
