"""Tokenizers: byte, trained SentencePiece, loaded SentencePiece and GPT-2 BPE; saving, reuse, errors."""

import io
import json
import math

import pytest

from tests.conftest import run_main, tiny_model_flags
from ultimate_trainer import config as config_lib
from ultimate_trainer.config import TokenizerConfig, resolve_config
from ultimate_trainer.data import sources, tokenizers
from ultimate_trainer.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    make_tokenizer,
)
from ultimate_trainer.errors import UserError

# Text a tokenizer must give back exactly: spaces, tabs, newlines, digits,
# characters the training text never held (byte fallback), an emoji.
ROUND_TRIP = ["  two leading spaces\tand a tab\n\nnew paragraph 12345", "naïve café ✓ 漢字 🙂", "", "x"]
SMALL_VOCAB = 600


@pytest.fixture(scope="module")
def corpus():
    """About 200 KB of English prose and code from the stdlib docs, cut into records."""
    records = sources.default_records()[:100]
    return records[:90], records[90:]


@pytest.fixture(scope="module")
def sp_tok(corpus):
    return SentencePieceTokenizer.train(corpus[0], SMALL_VOCAB)


def _gpt2_bytes_to_unicode():
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]


def write_bpe_dir(directory, with_eos=False):
    """A tiny GPT-2 style vocab.json + merges.txt: every byte, plus the pieces of `hello world`."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(_gpt2_bytes_to_unicode()[b] for b in range(256))}
    for merge in MERGES:
        vocab["".join(merge.split())] = len(vocab)
    if with_eos:
        vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return directory


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    return BPETokenizer.from_files(*_bpe_files(write_bpe_dir(tmp_path_factory.mktemp("bpe"))))


def _bpe_files(directory):
    return directory / "vocab.json", directory / "merges.txt"


def _foreign_sp_model(path, corpus_records, **options):
    """A .model file trained the way other projects train one (default ids, normalization on)."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_records), model_writer=proto, vocab_size=300, minloglevel=2, **options
    )
    path.write_bytes(proto.getvalue())
    return path


def _in_graph(tok, texts):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(tf.constant(texts, tf.string))
    ds = ds.map(tok.tf_encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return [t.numpy().tolist() for t in ds]


def _sp_cfg(**kw):
    return TokenizerConfig(tokenizer="sentencepiece", **kw)


# ---------------------------------------------------------------- byte


def test_byte_tokenizer_round_trip_and_saved_form(tmp_path):
    tok = ByteTokenizer()
    text = "naïve ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.count_tokens(text) == len(ids)
    tok.save(tmp_path)
    assert json.loads((tmp_path / "ut_tokenizer.json").read_text())["kind"] == "byte"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint() == tok.fingerprint()
    with pytest.raises(UserError, match="holds no ut_tokenizer.json; point at a run's checkpoint directory"):
        load_tokenizer(tmp_path / "missing")


def test_a_checkpoint_saved_under_the_old_file_name_still_loads(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"kind": "byte", "vocab_size": 258}\n')
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    # A Hugging Face tokenizer.json is not ours and is not mistaken for it.
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(UserError, match="holds no ut_tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- trained SentencePiece


def test_trained_sentencepiece_ids_and_exact_round_trip(sp_tok, corpus):
    assert sp_tok.vocab_size == SMALL_VOCAB
    assert (sp_tok.pad_id, sp_tok.eos_id) == (0, 3)
    assert (sp_tok.sp.unk_id(), sp_tok.sp.bos_id()) == (1, 2)
    assert sp_tok.sp.id_to_piece(4) == "<0x00>" and sp_tok.sp.id_to_piece(259) == "<0xFF>"
    for text in ROUND_TRIP + corpus[1]:
        ids = sp_tok.encode(text)
        assert sp_tok.decode(ids) == text
        assert sp_tok.count_tokens(text) == len(ids)
    assert sp_tok.decode(sp_tok.encode("end") + [sp_tok.eos_id, sp_tok.pad_id]) == "end"
    # It compresses: fewer tokens than bytes on held-out text.
    assert tokenizers.tokens_per_byte(sp_tok, corpus[1]) < 0.6


def test_the_model_proto_does_not_store_the_training_text(corpus):
    sentence = "this unusual sentence is here once to check the model proto keeps no corpus text"
    tok = SentencePieceTokenizer.train(corpus[0][:20] + [sentence], 400)
    assert sentence.encode() not in tok.model_proto
    assert b"unusual sentence" not in tok.model_proto


def test_unigram_training(corpus):
    tok = SentencePieceTokenizer.train(corpus[0][:40], 500, model_type="unigram")
    assert tok.vocab_size == 500 and tok.eos_id == 3
    assert all(tok.decode(tok.encode(t)) == t for t in ROUND_TRIP)


def test_vocab_sizes_the_text_cannot_support_are_one_line_errors(corpus):
    with pytest.raises(UserError, match=r"--vocab-size 270 is too small for this text: it needs at least \d+ pieces") as e:
        SentencePieceTokenizer.train(corpus[0][:5], 270)
    SentencePieceTokenizer.train(corpus[0][:5], int(str(e.value).split("at least ")[1].split()[0]))  # that size works
    with pytest.raises(tokenizers.VocabTooLarge, match=r"--vocab-size 50000 is more than the tokenizer training text supports; use --vocab-size \d+ or less") as e:
        SentencePieceTokenizer.train(corpus[0][:5], 50000, model_type="unigram")
    SentencePieceTokenizer.train(corpus[0][:5], e.value.max_size, model_type="unigram")  # the bound it names works
    with pytest.raises(UserError, match="tokenizer training text is empty"):
        SentencePieceTokenizer.train([], 500)


def test_auto_vocab_size_follows_its_rule(corpus):
    logged = []
    tok, report = tokenizers.choose_vocab_size(corpus[0], corpus[1], 400, 1600, log=logged.append)
    grid = tokenizers.vocab_grid(400, 1600)
    assert grid == [400, 800, 1600]
    chosen = report["chosen"]
    assert chosen in grid and tok.vocab_size == chosen
    sizes = [int(s) for s in report["tokens_per_byte"]]
    tpb = list(report["tokens_per_byte"].values())
    gains = [(1 - b / a) / math.log2(y / x) for (x, a), (y, b) in zip(zip(sizes, tpb), zip(sizes[1:], tpb[1:]))]
    i = sizes.index(chosen)
    assert all(g >= tokenizers.AUTO_VOCAB_MIN_GAIN for g in gains[:i])
    if i + 1 < len(sizes):
        assert gains[i] < tokenizers.AUTO_VOCAB_MIN_GAIN
    else:
        assert chosen == sizes[-1]
    assert all(b < a for a, b in zip(tpb, tpb[1:]))  # a larger vocab always compresses held-out text more
    assert len(logged) == len(sizes) and report["heldout_bytes"] > 10_000


def test_a_default_vocab_size_the_text_cannot_support_shrinks_but_a_chosen_one_does_not(corpus):
    cfg = TokenizerConfig(tokenizer="sentencepiece", vocab_size=50000, tokenizer_model="unigram")
    with pytest.raises(tokenizers.VocabTooLarge):
        tokenizers.make_tokenizer(cfg, corpus[0][:5], log=lambda line: None)
    logged = []
    tok = tokenizers.make_tokenizer(cfg, corpus[0][:5], log=logged.append, vocab_size_given=False)
    assert 300 < tok.vocab_size < 50000
    assert f"the default --vocab-size 50,000 is more than this text supports; training {tok.vocab_size:,} pieces" in logged[0]


def test_auto_vocab_size_stops_at_what_the_text_supports(corpus):
    tok, report = tokenizers.choose_vocab_size(corpus[0][:3], corpus[1][:3], 400, 100_000, model_type="unigram")
    assert report["chosen"] < 100_000 and tok.vocab_size == report["chosen"]
    assert list(report["tokens_per_byte"])[:1] == ["400"]
    with pytest.raises(UserError, match="--min-vocab-size 90000 is more than the tokenizer training text supports"):
        tokenizers.choose_vocab_size(corpus[0][:3], corpus[1][:3], 90000, 100_000, model_type="unigram")


# ---------------------------------------------------------------- loaded tokenizers


def test_a_sentencepiece_model_file_loads(tmp_path, corpus):
    path = _foreign_sp_model(tmp_path / "m.model", corpus[0][:30])
    tok = tokenizers.tokenizer_from_path(path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300
    assert tok.eos_id == 2 and tok.pad_id == tok.eos_id  # no PAD piece in that model: EOS pads
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tokenizers.peek_vocab_size(path) == 300
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "tokenizer.model").write_bytes(path.read_bytes())
    assert tokenizers.tokenizer_from_path(tmp_path / "dir").fingerprint() == tok.fingerprint()


def test_a_gpt2_bpe_directory_loads(bpe_tok, tmp_path):
    assert bpe_tok.encode("hello world") == [256 + MERGES.index("hell o"), 256 + MERGES.index("Ġworl d")]
    assert bpe_tok.decode(bpe_tok.encode("hello world, hi!")) == "hello world, hi!"
    assert bpe_tok.vocab_size == 256 + len(MERGES) + 1 and bpe_tok.eos_id == bpe_tok.pad_id == 265
    assert bpe_tok.decode(bpe_tok.encode("hi") + [bpe_tok.eos_id]) == "hi"
    directory = write_bpe_dir(tmp_path / "with_eos", with_eos=True)
    assert tokenizers.peek_vocab_size(directory) == tokenizers.tokenizer_from_path(directory).vocab_size == 266
    assert tokenizers.peek_vocab_size(write_bpe_dir(tmp_path / "no_eos")) == 266


def test_tf_encode_matches_encode_inside_tf_data(sp_tok, bpe_tok, tmp_path, corpus):
    foreign = tokenizers.tokenizer_from_path(_foreign_sp_model(tmp_path / "m.model", corpus[0][:30]))
    texts = ROUND_TRIP + ["hello world hello", corpus[1][0]]
    for tok in (ByteTokenizer(), sp_tok, foreign, bpe_tok):
        assert _in_graph(tok, texts) == [tok.encode(t) for t in texts], tok.kind


def test_save_and_load_round_trips_every_kind(sp_tok, bpe_tok, tmp_path):
    for tok in (ByteTokenizer(), sp_tok, bpe_tok):
        directory = tmp_path / tok.kind
        directory.mkdir()
        tok.save(directory)
        loaded = load_tokenizer(directory)
        assert type(loaded) is type(tok) and loaded.fingerprint() == tok.fingerprint()
        assert loaded.describe() == tok.describe()
        assert loaded.encode("hello world ✓") == tok.encode("hello world ✓")
        assert tokenizers.peek_vocab_size(directory) == tok.vocab_size
    assert sorted(p.name for p in (tmp_path / "sentencepiece").iterdir()) == ["tokenizer.model", "ut_tokenizer.json"]
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["merges.txt", "ut_tokenizer.json", "vocab.json"]


def test_fingerprints_are_stable_and_differ_between_tokenizers(sp_tok, bpe_tok, corpus):
    other = SentencePieceTokenizer.train(corpus[0], SMALL_VOCAB + 100)
    again = SentencePieceTokenizer(sp_tok.model_proto)
    prints = [t.fingerprint() for t in (ByteTokenizer(), sp_tok, other, bpe_tok)]
    assert len(set(prints)) == 4
    assert again.fingerprint() == sp_tok.fingerprint() and ByteTokenizer().fingerprint() == prints[0]
    assert all(len(p) == 16 for p in prints)


# ---------------------------------------------------------------- make_tokenizer: train, reuse, retrain


def _refuse_to_read():
    raise AssertionError("the records were read, but the saved tokenizer should have been reused")
    yield


def test_make_tokenizer_reuses_the_saved_one_unless_retrain(tmp_path, corpus):
    log = []
    cfg = _sp_cfg(vocab_size=500, tokenizer_train_examples=40)
    first = make_tokenizer(cfg, iter(corpus[0]), corpus[1], output_dir=tmp_path, log=log.append)
    assert first.vocab_size == 500 and first.origin["trained_on_records"] == 40
    assert "tokenizer: trained sentencepiece bpe, 500 pieces, on 40 records" in log[-1]
    first.save(tmp_path)

    reused = make_tokenizer(cfg, _refuse_to_read(), (), output_dir=tmp_path, log=log.append)
    assert reused.fingerprint() == first.fingerprint()
    assert log[-1].startswith(f"tokenizer: reusing {tmp_path / 'tokenizer.model'} (500 pieces, fingerprint")

    retrained = make_tokenizer(
        _sp_cfg(vocab_size=500, tokenizer_train_examples=40, retrain_tokenizer=True),
        corpus[0][40:], corpus[1], output_dir=tmp_path, log=log.append,
    )
    assert retrained.fingerprint() != first.fingerprint()

    with pytest.raises(UserError, match=r"holds a tokenizer trained with .*'vocab_size': 500.* but this run asks for .*'vocab_size': 700.*; pass --retrain-tokenizer"):
        make_tokenizer(_sp_cfg(vocab_size=700, tokenizer_train_examples=40), corpus[0], corpus[1], output_dir=tmp_path)


def test_make_tokenizer_other_kinds(tmp_path, corpus):
    assert isinstance(make_tokenizer(TokenizerConfig()), ByteTokenizer)
    path = _foreign_sp_model(tmp_path / "m.model", corpus[0][:30])
    log = []
    tok = make_tokenizer(TokenizerConfig(tokenizer_path=str(path)), _refuse_to_read(), log=log.append)
    assert tok.vocab_size == 300 and log[0].startswith(f"tokenizer: sentencepiece from {path}, 300 ids")
    with pytest.raises(UserError, match="no training records to train the tokenizer on"):
        make_tokenizer(_sp_cfg(vocab_size=500), [], [])
    auto = make_tokenizer(_sp_cfg(auto_vocab_size=True, min_vocab_size=400, max_vocab_size=800), corpus[0][:30], corpus[1], log=log.append)
    assert auto.origin["auto_vocab"]["chosen"] == auto.vocab_size
    assert any(line.startswith("auto vocab: chose") for line in log)


# ---------------------------------------------------------------- errors


def test_loading_errors_are_one_line(tmp_path, sp_tok, corpus):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.model: not a SentencePiece model"):
        tokenizers.tokenizer_from_path(tmp_path / "junk.model")
    no_eos = _foreign_sp_model(tmp_path / "no_eos.model", corpus[0][:30], eos_id=-1)
    with pytest.raises(UserError, match=r"no_eos.model has no end-of-sequence piece \(eos_id -1\)"):
        tokenizers.tokenizer_from_path(no_eos)
    with pytest.raises(UserError, match="--tokenizer-path .*nothing: no such file or directory"):
        tokenizers.tokenizer_from_path(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--tokenizer-path .*empty: holds no tokenizer; pass a SentencePiece .model file"):
        tokenizers.tokenizer_from_path(tmp_path / "empty")

    bad = write_bpe_dir(tmp_path / "bad_vocab")
    (bad / "vocab.json").write_text('["a list"]')
    with pytest.raises(UserError, match="vocab.json: expected a JSON object mapping tokens to integer ids"):
        tokenizers.peek_vocab_size(bad)
    (bad / "vocab.json").write_text("{not json")
    with pytest.raises(UserError, match="vocab.json: not valid JSON"):
        tokenizers.peek_vocab_size(bad)
    bad = write_bpe_dir(tmp_path / "bad_merges")
    (bad / "merges.txt").write_text("a b c\n")
    with pytest.raises(UserError, match="merges.txt: each merge must be two tokens separated by a space, got 'a b c'"):
        tokenizers.peek_vocab_size(bad)

    saved = tmp_path / "saved"
    saved.mkdir()
    sp_tok.save(saved)
    (saved / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        load_tokenizer(saved)
    (saved / "tokenizer.model").write_bytes(SentencePieceTokenizer.train(corpus[0][:20], 400).model_proto)
    with pytest.raises(UserError, match="do not match the fingerprint in ut_tokenizer.json"):
        load_tokenizer(saved)
    (saved / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="holds ut_tokenizer.json but not its tokenizer.model"):
        load_tokenizer(saved)
    (saved / "ut_tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(saved)
    (saved / "ut_tokenizer.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON; the tokenizer file is damaged"):
        load_tokenizer(saved)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tokenizer.tokenizer": "byte", "tokenizer.vocab_size": 8000},
         "--vocab-size applies to a trained tokenizer; add --tokenizer sentencepiece"),
        ({"tokenizer.retrain_tokenizer": True}, "--retrain-tokenizer applies to a trained tokenizer"),
        ({"tokenizer.tokenizer": "sentencepiece", "tokenizer.auto_vocab_size": True,
          "tokenizer.min_vocab_size": 9000, "tokenizer.max_vocab_size": 8000},
         "--min-vocab-size 9000 is above --max-vocab-size 8000"),
        ({"tokenizer.tokenizer": "sentencepiece", "tokenizer.auto_vocab_size": True, "tokenizer.vocab_size": 900},
         "--vocab-size and --auto-vocab-size both set the vocab size"),
        ({"tokenizer.tokenizer": "sentencepiece", "tokenizer.max_vocab_size": 9000},
         "--min-vocab-size and --max-vocab-size bound --auto-vocab-size"),
        ({"tokenizer.tokenizer": "sentencepiece", "tokenizer.vocab_size": 200},
         "--vocab-size 200 leaves no room for learned pieces: a trained tokenizer holds 260 fixed ids"),
        ({"tokenizer.tokenizer": "sentencepiece", "tokenizer.vocab_size": 0}, "--vocab-size must be a positive number"),
        ({"tokenizer.tokenizer_path": "/no/such.model"}, "--tokenizer-path /no/such.model: no such file or directory"),
    ],
)
def test_tokenizer_flag_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values)


@pytest.mark.parametrize("values", [{"tokenizer.vocab_size": 16000}, {"tokenizer.auto_vocab_size": True},
                                    {"tokenizer.tokenizer_train_examples": 500}, {"tokenizer.tokenizer_model": "unigram"}])
def test_tokenizer_training_flags_imply_a_trained_tokenizer(values):
    # The CLI guide passes --vocab-size / --auto-vocab-size without naming a tokenizer.
    assert resolve_config(values).tokenizer.tokenizer == "sentencepiece"
    assert resolve_config({}).tokenizer.tokenizer == "byte"


def test_target_params_with_auto_vocab_size_waits_for_the_vocab():
    cfg = resolve_config({"tokenizer.auto_vocab_size": True, "model.target_params": 10**7, "model.prefer_depth": True})
    assert config_lib.target_params_pending(cfg)
    sized = config_lib.sized_for_vocab(cfg, 10000)
    # The same shape as sizing with that vocab known up front.
    known = resolve_config({"tokenizer.vocab_size": 10000, "model.target_params": 10**7, "model.prefer_depth": True})
    shape = ("d_model", "num_layers", "num_heads", "d_ff")
    assert [getattr(sized.model, n) for n in shape] == [getattr(known.model, n) for n in shape]
    assert cfg.model.d_model == 512  # the resolved config is left as it was
    assert config_lib.sized_for_vocab(known, 123) is known  # nothing pending: unchanged


def test_tokenizer_path_flags(tmp_path, corpus):
    path = _foreign_sp_model(tmp_path / "m.model", corpus[0][:30])
    with pytest.raises(UserError, match="--vocab-size trains a tokenizer, but --tokenizer-path loads one"):
        resolve_config({"tokenizer.tokenizer_path": str(path), "tokenizer.vocab_size": 900})
    with pytest.raises(UserError, match="--tokenizer byte needs no file"):
        resolve_config({"tokenizer.tokenizer_path": str(path), "tokenizer.tokenizer": "byte"})
    cfg = resolve_config({"tokenizer.tokenizer_path": str(path), "model.target_params": 2 * 10**6})
    assert config_lib.vocab_size_of(cfg.tokenizer) == 300  # --target-params sizes with the file's vocab
    cfg = resolve_config({"tokenizer.tokenizer": "sentencepiece", "tokenizer.vocab_size": 4000, "model.target_params": 2 * 10**6})
    assert config_lib.vocab_size_of(cfg.tokenizer) == 4000


# ---------------------------------------------------------------- end to end


def test_cli_trains_on_local_files_with_a_sentencepiece_tokenizer_and_reuses_it(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sources.default_records()[:60]))
    out = tmp_path / "run"
    args = [*tiny_model_flags(), "--data-files", str(data), "--tokenizer", "sentencepiece", "--vocab-size", "512",
            "--max-steps", "2", "--eval-every", "2", "--log-every", "2", "--output-dir", str(out)]
    result = run_main(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizer: trained sentencepiece bpe, 512 pieces" in result.stdout
    assert f"data: {data} (1 file)" in result.stdout and "vocab 512" in result.stdout
    meta = json.loads((out / "ut_tokenizer.json").read_text())
    assert meta["kind"] == "sentencepiece" and meta["vocab_size"] == 512
    for name in ("ut_tokenizer.json", "tokenizer.model"):
        assert (out / "checkpoint-2" / name).is_file()
    assert load_tokenizer(out / "checkpoint-2").fingerprint() == meta["fingerprint"]

    again = run_main(args + ["--overwrite"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"tokenizer: reusing {out / 'tokenizer.model'} (512 pieces, fingerprint {meta['fingerprint']})" in again.stdout
