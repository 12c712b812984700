"""Tokenizers: encode text to ids in Python and inside tf.data graphs.

Three kinds share one interface:

- `ByteTokenizer` (`--tokenizer byte`, the default): UTF-8 bytes, no training;
- `SentencePieceTokenizer` (`--tokenizer sentencepiece`): trained on the run's
  data (BPE or unigram, `--tokenizer-model`), or loaded from a `.model` file
  with `--tokenizer-path`;
- `BPETokenizer`: a GPT-2 style `vocab.json` + `merges.txt` directory given
  with `--tokenizer-path`.

Each has `encode(text) -> list[int]`, `decode(ids) -> str`,
`tf_encode(scalar tf.string) -> int32 [n]` (usable inside `tf.data.map`),
`count_tokens(text)`, `vocab_size`, `eos_id`, `pad_id`, `save(directory)`,
`describe() -> dict` and `fingerprint() -> str` (a hash of the tokenizer's
content: two tokenizers with the same fingerprint encode alike).

Saved form, in a run's output dir, each checkpoint and each export:
`ut_tokenizer.json` (kind, ids, fingerprint; not Hugging Face's
`tokenizer.json` format, hence the name) plus `tokenizer.model`
(SentencePiece) or `vocab.json` + `merges.txt` (BPE). `load_tokenizer(dir)`
reads any of them back.

Trained SentencePiece ids: 0 PAD, 1 UNK, 2 BOS (unused by training), 3 EOS,
then 256 byte pieces (`byte_fallback`: text outside the vocabulary becomes
its UTF-8 bytes, so nothing is lost), then the learned pieces. Text is not
normalized (identity rule, no dummy prefix, spaces kept), so
`decode(encode(text)) == text`.
"""

import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from ultimate_trainer.errors import UserError

TOKENIZER_FILE = "ut_tokenizer.json"
LEGACY_TOKENIZER_FILE = "tokenizer.json"  # our name before it was renamed; still read
SP_MODEL_FILE = "tokenizer.model"
BPE_VOCAB_FILE = "vocab.json"
BPE_MERGES_FILE = "merges.txt"

SP_SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
SP_MIN_VOCAB = len(SP_SPECIAL_IDS) + 256  # special pieces + byte_fallback pieces
# Sentences longer than this many bytes are dropped by the trainer; records
# are cut into chunks of at most SP_CHUNK_CHARS characters (4 bytes each at most).
SP_MAX_SENTENCE_BYTES = 8192
SP_CHUNK_CHARS = 2000
SP_TRAINER_OPTIONS = dict(
    **SP_SPECIAL_IDS,
    byte_fallback=True,
    character_coverage=0.9995,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    self_test_sample_size=0,  # keeps the training text out of the model proto
    max_sentence_length=SP_MAX_SENTENCE_BYTES,
    minloglevel=2,
)

# --auto-vocab-size: train on a geometric grid (each size AUTO_VOCAB_STEP x
# the one before, from --min-vocab-size up to --max-vocab-size) and keep the
# smallest size whose next step cuts held-out tokens per byte by less than
# AUTO_VOCAB_MIN_GAIN per doubling of the vocab.
AUTO_VOCAB_STEP = 2
AUTO_VOCAB_MIN_GAIN = 0.03
AUTO_VOCAB_HELDOUT_BYTES = 1_000_000


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _as_list(values):
    return np.asarray(values).reshape(-1).tolist()


class _Tokenizer:
    """What every kind shares: the saved metadata file and token counting."""

    kind = None
    origin = None

    def count_tokens(self, text):
        return len(self.encode(text))

    def _write_meta(self, directory, **files):
        """Writes `ut_tokenizer.json`: `describe()` plus the names of the files beside it."""
        path = Path(directory) / TOKENIZER_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.describe(), **files}, indent=2) + "\n")
        os.replace(tmp, path)

    def describe(self):
        out = {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "fingerprint": self.fingerprint(),
        }
        if self.origin:
            out["origin"] = self.origin
        return out


class ByteTokenizer(_Tokenizer):
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
        # heavy: tensorflow takes seconds to load; the plan and prepare-data's checks use tokenizers without it
        import tensorflow as tf

        return tf.cast(tf.io.decode_raw(text, tf.uint8), tf.int32)

    def count_tokens(self, text):
        return len(text.encode("utf-8"))

    def fingerprint(self):
        return _digest(b"byte", str(self.vocab_size).encode())

    def save(self, directory):
        self._write_meta(directory)


class SentencePieceTokenizer(_Tokenizer):
    """A SentencePiece model (BPE or unigram), held as its serialized proto.

    `pad_id` is the model's PAD piece, or its EOS where the model has none
    (models from elsewhere often lack one); a model without EOS is refused.

    Example:
        tok = SentencePieceTokenizer.train(records, vocab_size=2000)
        tok.decode(tok.encode("text")) == "text"
    """

    kind = "sentencepiece"

    def __init__(self, model_proto, origin=None, where="the SentencePiece model"):
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{where}: not a SentencePiece model ({str(e).strip().splitlines()[0]})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        if self.eos_id < 0:
            raise UserError(
                f"{where} has no end-of-sequence piece (eos_id -1); training separates documents "
                f"with one: use a model trained with --eos_id, or train one with --tokenizer sentencepiece"
            )
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.origin = origin
        self._tf_tokenizer = None

    @classmethod
    def from_file(cls, path):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such SentencePiece model file")
        return cls(path.read_bytes(), origin={"path": str(path)}, where=str(path))

    @classmethod
    def train(cls, texts, vocab_size, model_type="bpe"):
        """Trains on `texts` (an iterable of str) in memory; see `train_sentencepiece`."""
        return cls(train_sentencepiece(texts, vocab_size, model_type), origin={"model_type": model_type})

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        keep = [int(i) for i in ids if 0 <= i < self.vocab_size and not self.sp.is_control(int(i))]
        return self.sp.decode(keep)

    def tf_encode(self, text):
        """Encodes one scalar tf.string inside a tf.data map (tensorflow_text); returns int32 ids."""
        # heavy: tensorflow takes seconds to load; the plan and prepare-data's checks use tokenizers without it
        import tensorflow as tf

        # heavy: tensorflow_text registers its ops with tensorflow; only the SentencePiece tf.data path needs it
        import tensorflow_text

        # A fresh op per traced map: tensorflow_text's model resource belongs to
        # an eager kernel, and `tf.random.set_seed` (keras.utils.set_random_seed)
        # clears the kernel cache, which would free a resource made earlier.
        with tf.init_scope():
            self._tf_tokenizer = tensorflow_text.SentencepieceTokenizer(model=self.model_proto, out_type=tf.int32)
        return self._tf_tokenizer.tokenize(text)

    def count_tokens(self, text):
        return len(self.sp.encode(text))

    def fingerprint(self):
        return _digest(b"sentencepiece", self.model_proto)

    def save(self, directory):
        (Path(directory) / SP_MODEL_FILE).write_bytes(self.model_proto)
        self._write_meta(directory, model_file=SP_MODEL_FILE)


class BPETokenizer(_Tokenizer):
    """GPT-2 style byte-level BPE from `vocab.json` + `merges.txt` (keras_hub's BytePairTokenizer).

    EOS is `<|endoftext|>`, added after the last id when the vocabulary lacks
    it; PAD is EOS (GPT-2 has no PAD token). Needs keras (the backend must be
    chosen before it is built).
    """

    kind = "bpe"
    EOS_TOKEN = "<|endoftext|>"

    def __init__(self, vocabulary, merges, origin=None):
        # heavy: keras_hub loads keras, whose backend must be chosen first, and tensorflow
        from keras_hub.tokenizers import BytePairTokenizer

        self.vocabulary = dict(vocabulary)
        self.merges = list(merges)
        if self.EOS_TOKEN not in self.vocabulary:
            self.vocabulary[self.EOS_TOKEN] = max(self.vocabulary.values(), default=-1) + 1
        self.vocab_size = max(self.vocabulary.values()) + 1
        self.eos_id = self.pad_id = self.vocabulary[self.EOS_TOKEN]
        self.origin = origin
        self._layer = BytePairTokenizer(
            vocabulary=self.vocabulary,
            merges=self.merges,
            sequence_length=None,
            unsplittable_tokens=[self.EOS_TOKEN],
            dtype="int32",
        )

    @classmethod
    def from_files(cls, vocab_path, merges_path, origin=None):
        vocabulary, merges = read_bpe_files(vocab_path, merges_path)
        return cls(vocabulary, merges, origin=origin or {"path": str(Path(vocab_path).parent)})

    def encode(self, text):
        # heavy: tensorflow takes seconds to load; the plan and prepare-data's checks use tokenizers without it
        import tensorflow as tf

        return _as_list(self._layer.tokenize(tf.constant(text)))

    def decode(self, ids):
        ids = [int(i) for i in ids if 0 <= i < self.vocab_size and i != self.eos_id]
        if not ids:
            return ""
        text = self._layer.detokenize([ids])
        text = _as_list(text)[0] if not isinstance(text, (str, bytes)) else text
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text

    def tf_encode(self, text):
        """Encodes one scalar tf.string inside a tf.data map; returns int32 ids."""
        return self._layer.tokenize(text)

    def fingerprint(self):
        vocab = json.dumps(self.vocabulary, sort_keys=True, ensure_ascii=False).encode()
        return _digest(b"bpe", vocab, "\n".join(self.merges).encode())

    def save(self, directory):
        directory = Path(directory)
        (directory / BPE_VOCAB_FILE).write_text(json.dumps(self.vocabulary, ensure_ascii=False) + "\n")
        (directory / BPE_MERGES_FILE).write_text("#version: 0.2\n" + "\n".join(self.merges) + "\n")
        self._write_meta(directory, vocabulary_file=BPE_VOCAB_FILE, merges_file=BPE_MERGES_FILE)


def read_bpe_files(vocab_path, merges_path):
    """`(vocabulary dict, merges list)` from GPT-2 style files; `UserError` if unreadable."""
    for path in (vocab_path, merges_path):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file; a BPE tokenizer needs {BPE_VOCAB_FILE} and {BPE_MERGES_FILE}")
    try:
        vocabulary = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{vocab_path}: not valid JSON ({e})") from None
    if not isinstance(vocabulary, dict) or not all(isinstance(v, int) for v in vocabulary.values()):
        raise UserError(f"{vocab_path}: expected a JSON object mapping tokens to integer ids")
    lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line.strip() and not line.startswith("#version")]
    bad = next((line for line in merges if len(line.split(" ")) != 2), None)
    if bad is not None:
        raise UserError(f"{merges_path}: each merge must be two tokens separated by a space, got {bad!r}")
    return vocabulary, merges


# ---------------------------------------------------------------- training


def _training_sentences(texts):
    """Records cut at line ends into chunks of at most SP_CHUNK_CHARS characters."""
    for text in texts:
        chunk = ""
        for line in text.splitlines(keepends=True):
            while len(line) > SP_CHUNK_CHARS:
                if chunk:
                    yield chunk
                    chunk = ""
                yield line[:SP_CHUNK_CHARS]
                line = line[SP_CHUNK_CHARS:]
            if len(chunk) + len(line) > SP_CHUNK_CHARS:
                yield chunk
                chunk = ""
            chunk += line
        if chunk:
            yield chunk


def train_sentencepiece(texts, vocab_size, model_type="bpe"):
    """Trains a SentencePiece model on `texts` in memory; returns its serialized proto.

    Reads `texts` (an iterable of str) once, through the trainer's
    `sentence_iterator`; writes nothing to disk and nothing to the terminal.
    Raises `VocabTooLarge` (a `UserError`) when the text cannot support
    `vocab_size` pieces, with `max_size` when the trainer says what would work.
    """
    proto = io.BytesIO()
    options = dict(SP_TRAINER_OPTIONS, vocab_size=vocab_size, model_type=model_type, num_threads=os.cpu_count() or 1)
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_sentences(texts), model_writer=proto, **options)
    except RuntimeError as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        bound = re.search(r"too high \(\d+\)\. Please set it to a value <= (\d+)", message)
        if bound:
            raise VocabTooLarge(vocab_size, int(bound.group(1))) from None
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
        if needed:
            raise UserError(
                f"--vocab-size {vocab_size} is too small for this text: it needs at least "
                f"{needed.group(1)} pieces (4 special, 256 bytes and the characters it uses)"
            ) from None
        if "Vocabulary size must be larger" in message:
            raise UserError(f"--vocab-size {vocab_size} is too small; use at least {SP_MIN_VOCAB + 1}") from None
        if "sentences_.empty()" in message:
            raise UserError("the tokenizer training text is empty; add data or raise --tokenizer-train-examples") from None
        raise UserError(f"sentencepiece training failed: {message}") from None
    return proto.getvalue()


class VocabTooLarge(UserError):
    """The text cannot support a vocab this large; `max_size` is the trainer's bound, if known."""

    def __init__(self, vocab_size, max_size=None):
        self.vocab_size, self.max_size = vocab_size, max_size
        fix = f"use --vocab-size {max_size} or less" if max_size else "lower --vocab-size"
        super().__init__(
            f"--vocab-size {vocab_size} is more than the tokenizer training text supports; {fix}, "
            f"or add text (--tokenizer-train-examples, more data)"
        )


def tokens_per_byte(tokenizer, texts):
    """Tokens per UTF-8 byte of `texts`: lower means the vocab compresses better."""
    tokens = sum(tokenizer.count_tokens(t) for t in texts)
    return tokens / max(1, sum(len(t.encode("utf-8")) for t in texts))


def vocab_grid(min_size, max_size, step=AUTO_VOCAB_STEP):
    """Sizes tried by --auto-vocab-size: min, min*step, ..., then max.

    Example:
        >>> vocab_grid(5000, 50000)
        [5000, 10000, 20000, 40000, 50000]
    """
    sizes = [min_size]
    while sizes[-1] * step < max_size:
        sizes.append(sizes[-1] * step)
    if sizes[-1] < max_size:
        sizes.append(max_size)
    return sizes


def choose_vocab_size(texts, heldout, min_size, max_size, model_type="bpe", log=None):
    """--auto-vocab-size: returns `(tokenizer, report dict)`.

    Trains at each size of `vocab_grid(min_size, max_size)` on `texts` and
    measures tokens per byte on `heldout`. The choice is the smallest size
    whose next size saves less than AUTO_VOCAB_MIN_GAIN (3%) of the tokens
    per doubling of the vocab; the largest size the text supports when every
    step saves more. Sizes above what the text supports are dropped (the
    trainer's bound replaces the first one that fails).
    """
    texts = list(texts)
    heldout = _take_bytes(heldout, AUTO_VOCAB_HELDOUT_BYTES)
    if not heldout:
        raise UserError("--auto-vocab-size needs held-out text to measure on; raise --val-fraction")
    grid = vocab_grid(min_size, max_size)
    tried = []  # (size, tokenizer, tokens per byte)
    measured = {}
    reason = None
    capped = False  # the grid was cut at the trainer's bound
    i = 0
    while i < len(grid):
        size = grid[i]
        try:
            tok = SentencePieceTokenizer.train(texts, size, model_type)
        except VocabTooLarge as e:
            bound = e.max_size
            if tried and bound and bound > tried[-1][0] * 1.1 and grid[-1] != bound:
                grid[i:] = [bound]  # retry once, at the largest size the trainer says the text supports
                capped = True
                continue
            if not tried:
                fix = f"lower --min-vocab-size to {bound} or less" if bound else "lower --min-vocab-size"
                raise UserError(
                    f"--min-vocab-size {min_size} is more than the tokenizer training text supports; {fix}, or add text"
                ) from None
            reason = f"the largest size tried that the text supports ({size:,} is more than it supports)"
            break
        tried.append((size, tok, tokens_per_byte(tok, heldout)))
        measured[str(size)] = round(tried[-1][2], 5)
        if log:
            log(f"auto vocab: {size:,} pieces -> {tried[-1][2]:.4f} tokens/byte on held-out text")
        if len(tried) >= 2:
            (small, _, a), (large, _, b) = tried[-2:]
            gain = (1 - b / a) / math.log2(large / small)
            if gain < AUTO_VOCAB_MIN_GAIN:
                reason = (
                    f"going from {small:,} to {large:,} saves {100 * gain:.1f}% of tokens per doubling, "
                    f"less than {100 * AUTO_VOCAB_MIN_GAIN:.0f}%"
                )
                tried.pop()
                break
        i += 1
    size, tok, tpb = tried[-1]
    if reason is None:
        reason = (
            f"every step saved at least {100 * AUTO_VOCAB_MIN_GAIN:.0f}% per doubling, up to "
            + ("the largest size the text supports" if capped else "--max-vocab-size")
        )
    report = {
        "chosen": size,
        "reason": reason,
        "rule": f"smallest size whose next step saves < {100 * AUTO_VOCAB_MIN_GAIN:.0f}% tokens per doubling",
        "tokens_per_byte": measured,
        "heldout_bytes": sum(len(t.encode("utf-8")) for t in heldout),
    }
    return tok, report


def _take_bytes(texts, limit):
    out, size = [], 0
    for text in texts:
        if size >= limit:
            break
        out.append(text)
        size += len(text.encode("utf-8"))
    return out


# ---------------------------------------------------------------- loading and choosing


def load_tokenizer(directory):
    """Loads the tokenizer saved in a run, checkpoint or export directory."""
    d = Path(directory)
    path = d / TOKENIZER_FILE
    if not path.is_file() and _is_legacy_file(d / LEGACY_TOKENIZER_FILE):
        path = d / LEGACY_TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{directory} holds no {TOKENIZER_FILE}; point at a run's checkpoint directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON; the tokenizer file is damaged") from None
    kind = meta.get("kind")
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "sentencepiece":
        model = d / meta.get("model_file", SP_MODEL_FILE)
        if not model.is_file():
            raise UserError(f"{directory} holds {TOKENIZER_FILE} but not its {model.name}")
        tokenizer = SentencePieceTokenizer(model.read_bytes(), origin=meta.get("origin"), where=str(model))
    elif kind == "bpe":
        tokenizer = BPETokenizer.from_files(
            d / meta.get("vocabulary_file", BPE_VOCAB_FILE), d / meta.get("merges_file", BPE_MERGES_FILE),
            origin=meta.get("origin"),
        )
    else:
        raise UserError(f"{path}: unknown tokenizer kind {kind!r}")
    if meta.get("fingerprint") not in (None, tokenizer.fingerprint()):
        raise UserError(
            f"{directory}: the tokenizer files do not match the fingerprint in {TOKENIZER_FILE} "
            f"(changed after saving?); restore them or retrain"
        )
    return tokenizer


def _is_legacy_file(path):
    """Our own metadata under its old name, not a Hugging Face tokenizer.json."""
    try:
        return path.is_file() and json.loads(path.read_text()).get("kind") in ("byte", "sentencepiece", "bpe")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False


def _path_kind(path):
    """What a --tokenizer-path holds: `saved`, `sentencepiece` or `bpe`; `UserError` otherwise."""
    p = Path(path)
    if p.is_file():
        return "sentencepiece"
    if (p / TOKENIZER_FILE).is_file():
        return "saved"
    if (p / BPE_VOCAB_FILE).is_file() and (p / BPE_MERGES_FILE).is_file():
        return "bpe"
    if (p / SP_MODEL_FILE).is_file():
        return "sentencepiece"
    if not p.exists():
        raise UserError(f"--tokenizer-path {path}: no such file or directory")
    raise UserError(
        f"--tokenizer-path {path}: holds no tokenizer; pass a SentencePiece .model file, a directory with "
        f"{BPE_VOCAB_FILE} and {BPE_MERGES_FILE}, or a run's output dir"
    )


def tokenizer_from_path(path):
    """The tokenizer --tokenizer-path names (nothing is trained)."""
    p = Path(path)
    kind = _path_kind(p)
    if kind == "saved":
        return load_tokenizer(p)
    if kind == "bpe":
        return BPETokenizer.from_files(p / BPE_VOCAB_FILE, p / BPE_MERGES_FILE)
    return SentencePieceTokenizer.from_file(p if p.is_file() else p / SP_MODEL_FILE)


def peek_vocab_size(path):
    """The vocab size at --tokenizer-path, read without keras (the backend is not chosen yet)."""
    p = Path(path)
    kind = _path_kind(p)
    if kind == "saved":
        return json.loads((p / TOKENIZER_FILE).read_text())["vocab_size"]
    if kind == "bpe":
        vocabulary, _ = read_bpe_files(p / BPE_VOCAB_FILE, p / BPE_MERGES_FILE)
        extra = 0 if BPETokenizer.EOS_TOKEN in vocabulary else 1
        return max(vocabulary.values(), default=-1) + 1 + extra
    model = p if p.is_file() else p / SP_MODEL_FILE
    return SentencePieceTokenizer(model.read_bytes(), where=str(model)).vocab_size


def training_settings(tokenizer_cfg):
    """What a trained tokenizer depends on besides the data; a saved one is reused only if these match."""
    t = tokenizer_cfg
    size = {"auto_vocab_size": [t.min_vocab_size, t.max_vocab_size]} if t.auto_vocab_size else {"vocab_size": t.vocab_size}
    return {"model_type": t.tokenizer_model, **size, "train_examples": t.tokenizer_train_examples}


def _stderr(message):
    print(message, file=sys.stderr, flush=True)


def make_tokenizer(tokenizer_cfg, train_records=(), heldout_records=(), output_dir=None, log=None, vocab_size_given=True):
    """The tokenizer a run asks for.

    - `--tokenizer-path`: loaded from there; nothing is trained.
    - `byte`: a `ByteTokenizer`.
    - `sentencepiece`: the one saved in `output_dir` when there is one with
      the same `training_settings` (unless `--retrain-tokenizer`); otherwise
      trained on the first `--tokenizer-train-examples` of `train_records`,
      at `--vocab-size` or, with `--auto-vocab-size`, at the size
      `choose_vocab_size` picks by measuring on `heldout_records`. When the
      size is the default (`vocab_size_given` False) and the text supports
      fewer pieces, the largest size it supports is trained, with a notice;
      a size the user asked for is never changed.

    The records may be lists or lazy iterables (`sources.iter_records`);
    only what is needed is read. `log(line)` reports what happened (default:
    stderr). Nothing is written: the caller saves the tokenizer.

    Example:
        tok = make_tokenizer(cfg.tokenizer, train, val, output_dir="out", log=print)
        tok.save("out")
    """
    t = tokenizer_cfg
    log = log or _stderr
    if t.tokenizer_path:
        tokenizer = tokenizer_from_path(t.tokenizer_path)
        log(f"tokenizer: {tokenizer.kind} from {t.tokenizer_path}, {tokenizer.vocab_size:,} ids, fingerprint {tokenizer.fingerprint()}")
        return tokenizer
    if t.tokenizer == "byte":
        return ByteTokenizer()
    if t.tokenizer != "sentencepiece":
        raise UserError(f"--tokenizer {t.tokenizer!r} is not supported; use byte or sentencepiece")

    settings = training_settings(t)
    saved = Path(output_dir) / TOKENIZER_FILE if output_dir is not None else None
    if saved is not None and saved.is_file() and not t.retrain_tokenizer:
        meta = json.loads(saved.read_text())
        if meta.get("kind") == "sentencepiece":
            origin = meta.get("origin") or {}
            before = origin.get("settings")
            if before != settings:
                how = f"trained with {before}" if before else f"loaded from {origin.get('path', 'elsewhere')}"
                raise UserError(
                    f"{output_dir} holds a tokenizer {how}, but this run asks for {settings}; "
                    f"pass --retrain-tokenizer to train a new one (it replaces the saved one), or use another --output-dir"
                )
            tokenizer = load_tokenizer(output_dir)
            log(
                f"tokenizer: reusing {saved.parent / SP_MODEL_FILE} ({tokenizer.vocab_size:,} pieces, fingerprint "
                f"{tokenizer.fingerprint()}); --retrain-tokenizer trains a new one"
            )
            return tokenizer

    texts = list(itertools.islice(train_records, t.tokenizer_train_examples))
    if not texts:
        raise UserError("no training records to train the tokenizer on; add data")
    size_bytes = sum(len(x.encode("utf-8")) for x in texts)
    start = time.perf_counter()
    if t.auto_vocab_size:
        tokenizer, report = choose_vocab_size(texts, heldout_records, t.min_vocab_size, t.max_vocab_size, t.tokenizer_model, log)
        log(f"auto vocab: chose {report['chosen']:,}: {report['reason']}")
    else:
        tokenizer, report = _train_at(texts, t, vocab_size_given, log), None
    seconds = time.perf_counter() - start
    tokenizer.origin = {
        "settings": settings,
        "trained_on_records": len(texts),
        "trained_on_bytes": size_bytes,
        "train_seconds": round(seconds, 2),
        **({"auto_vocab": report} if report else {}),
    }
    log(
        f"tokenizer: trained sentencepiece {t.tokenizer_model}, {tokenizer.vocab_size:,} pieces, on {len(texts):,} "
        f"records ({size_bytes:,} bytes) in {seconds:.1f}s"
    )
    return tokenizer


def _train_at(texts, tokenizer_cfg, vocab_size_given, log):
    t = tokenizer_cfg
    try:
        return SentencePieceTokenizer.train(texts, t.vocab_size, t.tokenizer_model)
    except VocabTooLarge as e:
        if vocab_size_given or not e.max_size:
            raise
        log(
            f"tokenizer: the default --vocab-size {t.vocab_size:,} is more than this text supports; training "
            f"{e.max_size:,} pieces, the most it does (pass --vocab-size to choose)"
        )
        return SentencePieceTokenizer.train(texts, e.max_size, t.tokenizer_model)
