"""The streamed input (`inputs.StreamedInputs`): estimated epochs, bounded validation, O(1) resume."""

import itertools
import json

import numpy as np
import pytest

from tests.conftest import run_main, tiny_model_flags
from tools.make_corpus import write_parquet_corpus
from ultimate_trainer.config import resolve_config
from ultimate_trainer.data import inputs as inputs_lib
from ultimate_trainer.data import sources, streamed
from ultimate_trainer.data.streaming import open_stream
from ultimate_trainer.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A dataset directory of 4 parquet shards, about 400 documents."""
    directory = tmp_path_factory.mktemp("ds")
    write_parquet_corpus(directory, shards=4, megabytes=0.1, doc_chars=(100, 400), row_group_bytes=5000)
    return directory


def _load(corpus, tmp_path, resume=None, **values):
    cfg = resolve_config({"data.dataset_id": str(corpus), "model.seq_len": 16, "loader.shuffle_buffer_size": 8,
                          "output.output_dir": str(tmp_path / "out"), **values})
    return inputs_lib.load_streamed(cfg, "streamed", resume=resume)


def _batches(ds, n):
    return [x.numpy() for x, _ in itertools.islice(ds, n)]


def test_a_streamed_input_resumes_from_its_state_exactly(corpus, tmp_path):
    _, inputs = _load(corpus, tmp_path)
    assert inputs.describe()["estimate"]["is_estimate"] and "an estimate, not a count" in inputs.describe()["source"]
    records = list(open_stream(str(corpus), shuffle=False, epochs=1))
    # The default bound: the first held-out records until they hold 256 windows (seq_len 16) of tokens.
    held = [t for t in records if sources.is_validation(t, 0.05)]
    ends = np.cumsum([len(t.encode()) + 1 for t in held])  # bytes + EOS: the byte tokenizer's count
    assert ends[-1] > 256 * 16, "the bound must cut the held-out records for this check to mean anything"
    assert inputs.val_records == held[: int(np.searchsorted(ends, 256 * 16)) + 1]
    whole = _batches(inputs.train_dataset(4, 7), 12)
    state = json.loads(json.dumps(inputs.state(20, 7)))  # as a checkpoint keeps it
    assert (state["block"], state["next_window"]) == (2, 20)  # window 19 lies in block 2: re-pack that one only
    _, again = _load(corpus, tmp_path, resume=state)
    np.testing.assert_array_equal(np.concatenate(_batches(again.train_dataset(4, 7, start_window=20), 7)),
                                  np.concatenate(whole[5:]))


def test_validation_is_bounded_by_records_or_tokens(corpus, tmp_path):
    _, by_records = _load(corpus, tmp_path, **{"data.max_val_examples": 3, "data.val_fraction": 0.5})
    assert len(by_records.val_records) == 3
    _, by_tokens = _load(corpus, tmp_path, **{"data.eval_tokens": 500, "data.val_fraction": 0.5})
    sizes = [len(t.encode()) + 1 for t in by_tokens.val_records]  # bytes + EOS: the byte tokenizer's count
    assert sum(sizes) >= 500 > sum(sizes[:-1]) and by_tokens.val_tokens == sum(sizes)


def test_a_tokenizer_trained_on_a_stream_reads_only_its_examples(corpus, tmp_path, monkeypatch):
    read = []
    opened = streamed.open_train_stream

    def counting(*args, **kwargs):
        for text in opened(*args, **kwargs):
            read.append(text)
            yield text

    monkeypatch.setattr(streamed, "open_train_stream", counting)
    tokenizer, _ = inputs_lib.load_streamed(resolve_config({
        "data.dataset_id": str(corpus), "tokenizer.tokenizer": "sentencepiece", "tokenizer.vocab_size": 300,
        "tokenizer.tokenizer_train_examples": 50, "output.output_dir": str(tmp_path / "out"),
        "loader.shuffle_buffer_size": 8}), "streamed")
    assert len(read) == 50 and tokenizer.vocab_size == 300


def test_max_train_examples_on_a_streamed_source_is_refused(corpus, tmp_path):
    with pytest.raises(UserError, match="--max-train-examples 10: this source is streamed, not counted"):
        _load(corpus, tmp_path, **{"data.max_train_examples": 10})


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_a_streamed_dataset_trains_and_resumes_with_the_same_losses(corpus, tmp_path):
    flags = [*tiny_model_flags(), "--log-every", "1", "--no-eval", "--sample-tokens", "0", "--dataset-id",
             str(corpus), "--shuffle-buffer-size", "10", "--max-val-examples", "20", "--max-steps", "6",
             "--save-every", "3", "--output-dir", str(tmp_path / "run")]
    first = run_main(flags)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "streamed, no pass before training" in first.stdout and "an estimate, not a count" in first.stdout
    want = _losses(tmp_path / "run")
    (tmp_path / "run" / "checkpoint-6").rename(tmp_path / "run" / "ignored-6")  # as if it died after step 3
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    resumed = run_main([*flags, "--resume-from", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 3 (data window 12" in resumed.stdout
    got = _losses(tmp_path / "run")
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got, want)


def test_a_tfds_dataset_feeds_a_streamed_input_that_resumes_exactly(tfds_dir, tmp_path):
    cfg = resolve_config({"data.dataset_id": "tfds:tiny_text/en", "data.tfds_data_dir": str(tfds_dir),
                          "data.val_split": "validation", "model.seq_len": 8, "loader.shuffle_buffer_size": 4,
                          "output.output_dir": str(tmp_path / "out")})
    _, inputs = inputs_lib.load_streamed(cfg, "streamed")
    assert sorted(inputs.val_records) == sorted(f"held {i}" for i in range(10)) and inputs.estimate.records == 60
    whole = _batches(inputs.train_dataset(2, 1), 10)
    _, again = inputs_lib.load_streamed(cfg, "streamed", resume=json.loads(json.dumps(inputs.state(10, 1))))
    np.testing.assert_array_equal(np.concatenate(_batches(again.train_dataset(2, 1, start_window=10), 5)),
                                  np.concatenate(whole[5:]))


def test_a_mixture_input_reports_its_realized_shares(corpus, tmp_path):
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": f"code {i} " + "x" * 200}) + "\n" for i in range(300)))
    cfg = resolve_config({"data.data_mix": f"{corpus}:0.7,{code}:0.3", "model.seq_len": 16,
                          "loader.shuffle_buffer_size": 8, "output.output_dir": str(tmp_path / "out")})
    _, inputs = inputs_lib.load_streamed(cfg, "streamed")
    _batches(inputs.train_dataset(4, 7), 30)
    line = inputs.mix_report(120)
    assert line.startswith("realized mixture over ") and f"{code} " in line and "(weight 30.0%)" in line
    assert inputs.mix_report(0) is None


def test_a_source_without_size_metadata_needs_a_run_length(tmp_path):
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "train.txt").write_text("".join(f"line {i} of the text\n\n" for i in range(200)))
    values = {"data.dataset_id": str(tmp_path / "lines"), "model.seq_len": 8, "data.val_fraction": 0.2,
              "output.output_dir": str(tmp_path / "out")}
    with pytest.raises(UserError, match="metadata gives no size"):
        inputs_lib.load_streamed(resolve_config(values), "streamed")
    _, inputs = inputs_lib.load_streamed(resolve_config({**values, "training.max_steps": 5}), "streamed")
    assert "epoch size unknown" in inputs.describe()["source"] and inputs.block == 10000
    assert len(_batches(inputs.train_dataset(2, 0), 3)) == 3


def test_a_mixture_run_logs_its_realized_shares_at_each_save(corpus, tmp_path):
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": f"code {i} " + "x" * 200}) + "\n" for i in range(300)))
    out = tmp_path / "run"
    # The shares count the records drawn before the shuffle block a resume would re-pack (what the
    # saved position holds), so the run spans a few blocks of 4 windows.
    result = run_main([*tiny_model_flags(), "--data-mix", f"{corpus}:0.7,{code}:0.3", "--max-steps", "16",
                       "--save-every", "8", "--shuffle-buffer-size", "4", "--no-eval", "--sample-tokens", "0",
                       "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("realized mixture over ") == 2  # steps 8 and 16
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shares = [r for r in records if "mixture_records" in r]
    assert [r["step"] for r in shares] == [8, 16] and 0 < shares[0]["mixture_records"] < shares[1]["mixture_records"]
    assert shares[-1][f"mixture_share/{code}"] + shares[-1][f"mixture_share/{corpus}"] == pytest.approx(1.0)
    assert (out / "loss_curve.png").is_file()  # the plot reads past the mixture records
