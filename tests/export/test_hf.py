"""Export to Hugging Face transformers: the exported model computes our logits.

Each style is built with random weights (no zero biases or unit norms left
from the init), exported, loaded back with transformers on torch CPU and
compared on random token ids. transformers is a test dependency: these tests
fail, never skip, without it.
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch
import transformers

from tests.conftest import REPO
from ultimate_trainer.checkpoint.store import save_checkpoint
from ultimate_trainer.cli import main, parse_config
from ultimate_trainer.data.tokenizers import ByteTokenizer, load_tokenizer
from ultimate_trainer.errors import UserError
from ultimate_trainer.export.hf import export_hf
from ultimate_trainer.models.lora import enable_lora
from ultimate_trainer.models.causal_lm import CausalLM

TOLERANCE = 1e-4
GPT2 = dict(use_rope=False, use_rmsnorm=False, use_swiglu=False)


def random_model(seed=0, vocab_size=61, **kwargs):
    """A small CausalLM whose every weight is random, norms and LM head included."""
    shape = dict(vocab_size=vocab_size, seq_len=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)
    model = CausalLM(**shape, **kwargs)
    model.build((None, shape["seq_len"]))
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        values = 0.2 * rng.standard_normal(variable.shape)
        if variable.name in ("scale", "gamma"):
            values += 1.0
        variable.assign(values.astype("float32"))
    return model


def max_logit_diff(model, out_dir, batch=3, seed=1):
    """Loads `out_dir` with transformers and returns the max |logit difference| on random ids."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = np.random.default_rng(seed).integers(0, model.vocab_size, (batch, model.seq_len)).astype("int32")
    ours = keras.ops.convert_to_numpy(model(ids))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids.astype("int64"))).logits.numpy()
    assert ours.shape == theirs.shape == (batch, model.seq_len, model.vocab_size)
    return float(np.max(np.abs(ours - theirs))), hf_model


STYLES = {
    "llama_untied": ({}, "LlamaForCausalLM"),
    "llama_tied": (dict(tie_embeddings=True), "LlamaForCausalLM"),
    "llama_gqa": (dict(num_kv_heads=2), "LlamaForCausalLM"),
    "gpt2_untied": (GPT2, "GPT2LMHeadModel"),
    "gpt2_tied": (dict(GPT2, tie_embeddings=True), "GPT2LMHeadModel"),
    # GPT-2 itself: biases in every projection (the gpt2-1.36b recipe), tied
    "gpt2_biased": (dict(GPT2, use_bias=True, tie_embeddings=True), "GPT2LMHeadModel"),
    "llama_biased": (dict(use_bias=True, num_kv_heads=2), "LlamaForCausalLM"),
}


@pytest.mark.parametrize("style", STYLES)
def test_exported_logits_match(style, tmp_path):
    kwargs, architecture = STYLES[style]
    model = random_model(**kwargs)
    files = export_hf(model, None, tmp_path / "hf")
    assert {"config.json", "model.safetensors"} <= set(files)

    diff, hf_model = max_logit_diff(model, tmp_path / "hf")
    print(f"{style}: max |logit diff| {diff:.2e}")
    assert type(hf_model).__name__ == architecture
    assert diff < TOLERANCE
    config = hf_model.config
    assert config.tie_word_embeddings == bool(kwargs.get("tie_embeddings"))
    head, embedding = hf_model.get_output_embeddings().weight, hf_model.get_input_embeddings().weight
    assert (head.data_ptr() == embedding.data_ptr()) == config.tie_word_embeddings
    if architecture == "LlamaForCausalLM":
        assert config.num_key_value_heads == kwargs.get("num_kv_heads", 4)
        assert config.attention_bias == config.mlp_bias == bool(kwargs.get("use_bias"))
    else:
        assert config.activation_function == "gelu_new"  # GPT-2's tanh approximation, as ours
    if kwargs.get("use_bias"):  # the biases are random, so the logit match covers their mapping
        assert all(np.abs(keras.ops.convert_to_numpy(w)).max() > 0.1 for w in model.weights
                   if w.path.endswith("/bias"))
    # The logits are non-trivial: random weights give spread, not a constant row.
    assert np.std(keras.ops.convert_to_numpy(model(np.zeros((1, 16), "int32")))) > 0.1


def test_lora_adapters_are_merged_into_the_exported_weights(tmp_path):
    model = random_model()
    enable_lora(model, rank=2, alpha=4, targets=("qkv", "out", "up", "down"))
    rng = np.random.default_rng(2)
    for variable in model.weights:
        if "lora_kernel" in variable.path:  # B starts at zero: make the adapters change the output
            variable.assign(0.2 * rng.standard_normal(variable.shape).astype("float32"))
    export_hf(model, None, tmp_path / "hf")
    diff = max_logit_diff(model, tmp_path / "hf")[0]
    print(f"llama_lora: max |logit diff| {diff:.2e}")
    assert diff < TOLERANCE


def test_byte_tokenizer_is_saved_beside_the_model_and_its_ids_in_the_config(tmp_path):
    model = random_model(vocab_size=ByteTokenizer.vocab_size)
    export_hf(model, ByteTokenizer(), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (256, 257, None)
    assert isinstance(load_tokenizer(tmp_path / "hf"), ByteTokenizer)
    assert max_logit_diff(model, tmp_path / "hf")[0] < TOLERANCE


@pytest.mark.parametrize(
    "kwargs, tokenizer, message",
    [
        (dict(use_rope=False), None, "mixes them"),
        (dict(use_swiglu=False), None, "mixes them"),
        (dict(GPT2, num_kv_heads=2), None, "grouped-query"),
        (dict(GPT2, activation="relu"), None, "uses relu"),
        (dict(GPT2, activation="silu"), None, "uses silu"),
        ({}, ByteTokenizer(), "tokenizer has 258 ids but the model 61"),
    ],
)
def test_refuses_what_transformers_cannot_hold(kwargs, tokenizer, message, tmp_path):
    with pytest.raises(UserError, match=message) as info:
        export_hf(random_model(**kwargs), tokenizer, tmp_path / "hf")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary dir left behind


@pytest.mark.filterwarnings("ignore:Layer .* does not have a `quantize` method")
def test_refuses_a_quantized_model(tmp_path):
    model = random_model()
    model.quantize("int8")
    with pytest.raises(UserError, match="is quantized"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_a_non_empty_or_file_output(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    model = random_model()
    with pytest.raises(UserError, match="already holds files"):
        export_hf(model, None, tmp_path / "taken")
    with pytest.raises(UserError, match="is a file"):
        export_hf(model, None, tmp_path / "file")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    export_hf(model, None, tmp_path / "empty")  # an empty directory is fine
    assert (tmp_path / "empty" / "model.safetensors").is_file()


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint as training writes it, GPT-2 style, with the byte tokenizer."""
    cfg = parse_config(["--output-dir", str(tmp_path / "run")])
    model = random_model(vocab_size=ByteTokenizer.vocab_size, **GPT2)
    path = save_checkpoint(model, ByteTokenizer(), cfg, tmp_path / "run", "checkpoint-2", {"step": 2})
    return model, path


def test_cli_export_end_to_end(checkpoint, tmp_path, capsys):
    model, path = checkpoint
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(path), "--format", "hf", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"as transformers GPT2LMHeadModel to {out}" in printed
    for name in ("config.json", "model.safetensors", "ut_tokenizer.json"):
        assert f"  {name} (" in printed
    assert max_logit_diff(model, out)[0] < TOLERANCE

    # Run again into the same directory: refused in one line, the export kept.
    capsys.readouterr()
    before = (out / "model.safetensors").read_bytes()
    assert main(["export", "--checkpoint", str(path), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert (out / "model.safetensors").read_bytes() == before


def test_tools_script_runs_the_export_command_on_another_backend(checkpoint, tmp_path):
    model, path = checkpoint
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(path), "--format", "hf",
         "--output", str(tmp_path / "hf"), "--backend", "torch"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "as transformers GPT2LMHeadModel" in result.stdout
    assert max_logit_diff(model, tmp_path / "hf")[0] < TOLERANCE

    missing = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(tmp_path), "--output",
         str(tmp_path / "hf2")],
        capture_output=True, text=True, timeout=600,
    )
    assert missing.returncode == 2
    last = missing.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "holds no model.keras" in last
    assert not (tmp_path / "hf2").exists()
