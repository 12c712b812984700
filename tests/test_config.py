import dataclasses
import json

import pytest

from ultimate_trainer import config as config_lib
from ultimate_trainer.config import REDACTED, count, resolve_config
from ultimate_trainer.errors import UserError


def test_defaults_resolve():
    cfg = resolve_config({})
    assert cfg.model.d_model == 512 and cfg.training.epochs == 3
    assert cfg.output.output_dir == "output_ultimate"


def test_preset_fills_dims_and_explicit_flags_win():
    cfg = resolve_config({"model.model_preset": "nano"})
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads, cfg.model.d_ff) == (128, 6, 4, 512)
    cfg = resolve_config({"model.model_preset": "nano", "model.num_layers": 2})
    assert cfg.model.num_layers == 2 and cfg.model.d_model == 128


@pytest.mark.parametrize("text,value", [("100000000", 10**8), ("1e8", 10**8), ("100M", 10**8), ("1.5B", 1_500_000_000), ("2_400_000", 2_400_000)])
def test_count_parses_human_numbers(text, value):
    assert count(text) == value


@pytest.mark.parametrize("text", ["abc", "1.5", "nan", ""])
def test_count_rejects_non_counts(text):
    with pytest.raises(ValueError):
        count(text)


def test_recipe_sections_and_flag_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  d_model: 256\n  num_heads: 4\ntraining:\n  learning_rate: 0.001\nseed: 7\n")
    cfg = resolve_config({"run.config": str(recipe), "model.d_model": 128})
    assert cfg.model.d_model == 128  # the flag wins over the recipe
    assert cfg.model.num_heads == 4
    assert cfg.training.learning_rate == 0.001 and cfg.training.seed == 7


def test_recipe_unknown_key_names_nearest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  d_modle: 256\n")
    with pytest.raises(UserError, match=r"unknown key `model.d_modle`; did you mean `model.d_model`"):
        resolve_config({"run.config": str(recipe)})
    recipe.write_text("learnig_rate: 0.1\n")
    with pytest.raises(UserError, match="did you mean `learning_rate`"):
        resolve_config({"run.config": str(recipe)})


def test_recipe_bad_type_and_bad_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  d_model: big\n")
    with pytest.raises(UserError, match="`d_model` must be int"):
        resolve_config({"run.config": str(recipe)})
    recipe.write_text("model: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve_config({"run.config": str(recipe)})


def test_missing_recipe():
    with pytest.raises(UserError, match="no such file"):
        resolve_config({"run.config": "/nonexistent/recipe.yaml"})


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model.d_model": 128, "model.num_heads": 5}, "--num-heads 5 does not divide --d-model 128"),
        ({"model.d_model": -5}, "--d-model must be a positive number, got -5"),
        ({"model.num_layers": 0}, "--num-layers must be a positive number, got 0"),
        ({"training.batch_size": 0}, "--batch-size must be a positive number"),
        ({"model.model_preset": "huge"}, "unknown --model-preset 'huge'"),
        ({"model.model_preset": "nano", "model.target_params": 10**6}, "--model-preset and --target-params"),
        ({"model.num_heads": 8, "model.num_kv_heads": 3}, "--num-kv-heads 3 does not divide --num-heads 8"),
        ({"model.activation": "relu"}, "add --no-swiglu"),
        ({"model.dropout_rate": 1.5}, r"--dropout-rate must be in \[0, 1\)"),
        ({"training.max_steps": 10, "training.total_tokens": 1000}, "pass only one"),
        ({"loader.stride": 257}, "--stride 257 must lie between 1 and --seq-len 256"),
        ({"loader.stride": 0}, "--stride 0 must lie between 1 and --seq-len 256"),
        ({"output.sample_tokens": -1}, "--sample-tokens must be zero \\(no samples\\) or positive, got -1"),
        ({"training.lr_end": 1.0}, "--lr-end 1.0 must lie between 0"),
        ({"run.json": True}, "--json only applies to --dry-run"),
    ],
)
def test_invalid_values_name_the_flag_and_fix(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"cloud.cloud_provider": "s3"}, "--cloud-provider needs --cloud-bucket too"),
        ({"cloud.cloud_bucket": "b"}, "--cloud-bucket needs --cloud-provider too"),
        ({"cloud.cloud_provider": "s3", "cloud.cloud_bucket": "b", "cloud.azure_sas_token": "sv=x"},
         r"--azure-sas-token applies to --cloud-provider azure \(or an az:// --resume-from\) only"),
        ({"cloud.cloud_provider": "gcs", "cloud.cloud_bucket": "b", "cloud.azure_account_name": "acct"},
         r"--azure-account-name applies to --cloud-provider azure \(or an az:// --resume-from\) only"),
        ({"cloud.cloud_provider": "s3", "cloud.cloud_bucket": "b", "cloud.cloud_endpoint_url": "127.0.0.1:9"},
         "--cloud-endpoint-url '127.0.0.1:9': give a URL"),
    ],
)
def test_cloud_flags_are_checked(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values)


def test_every_field_has_help_and_a_unique_flag():
    flags = [config_lib.flag_name(f) for _, _, f in config_lib.iter_fields()]
    assert len(flags) == len(set(flags))
    for _, _, f in config_lib.iter_fields():
        assert f.metadata["help"]


def test_secrets_are_redacted(tmp_path):
    cfg = resolve_config({})
    cfg.cloud.azure_sas_token = "sv=2024&sig=SECRET123"
    path = tmp_path / "training_args.json"
    config_lib.write_json(cfg, path)
    text = path.read_text()
    assert "SECRET123" not in text
    assert json.loads(text)["cloud"]["azure_sas_token"] == REDACTED


def test_to_dict_covers_every_section():
    d = resolve_config({}).to_dict()
    for attr, _, cls in config_lib.SECTIONS:
        assert set(d[attr]) == {f.name for f in dataclasses.fields(cls)}


def test_target_params_sets_the_architecture():
    cfg = resolve_config({"model.target_params": 10_000_000})
    m = cfg.model
    from ultimate_trainer.models import sizing

    total = sizing.count_params(258, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.seq_len).total
    assert abs(total / 10_000_000 - 1) <= 0.02
    deeper = resolve_config({"model.target_params": 10_000_000, "model.prefer_depth": True}).model
    assert deeper.num_layers > m.num_layers


@pytest.mark.parametrize(
    "values,message",
    [
        ({"model.target_params": 10**8, "model.d_model": 256}, "--target-params chooses --d-model itself"),
        ({"model.prefer_depth": True}, "--prefer-depth only applies with --target-params"),
        ({"model.target_params": 0}, "--target-params must be a positive number"),
        ({"model.target_params": 1000}, "--target-params 1,000 has no architecture within 2%"),
    ],
)
def test_target_params_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values)


def test_lora_flag_errors(tmp_path):
    with pytest.raises(UserError, match="need --use-lora"):
        resolve_config({"model.lora_rank": 4})
    with pytest.raises(UserError, match="--lora-targets 'qkv,ffn': unknown target 'ffn'"):
        resolve_config({"model.use_lora": True, "model.lora_targets": "qkv,ffn"})
    with pytest.raises(UserError, match="--lora-rank must be a positive number"):
        resolve_config({"model.use_lora": True, "model.lora_rank": 0})
    with pytest.raises(UserError, match="--init-from /no/such: no such checkpoint directory"):
        resolve_config({"model.init_from": "/no/such"})
    cfg = resolve_config({"model.use_lora": True, "model.init_from": str(tmp_path)})
    assert cfg.model.lora_targets == "qkv,out"


def test_recipe_choice_values_are_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  optimizer: lamb\n")
    with pytest.raises(UserError, match="--optimizer 'lamb' is not one of adamw, adam, sgd"):
        resolve_config({"run.config": str(recipe)})
    recipe.write_text("tokenizer:\n  tokenizer: sentencepiece\n  tokenizer_model: wordpiece\n")
    with pytest.raises(UserError, match="--tokenizer-model 'wordpiece' is not one of bpe, unigram"):
        resolve_config({"run.config": str(recipe)})


def test_flags_that_would_be_ignored_are_refused(tmp_path):
    with pytest.raises(UserError, match="--weight-decay applies to --optimizer adamw and muon only, not sgd"):
        resolve_config({"training.optimizer": "sgd", "training.weight_decay": 0.1})
    assert resolve_config({"training.optimizer": "sgd"}).training.optimizer == "sgd"
    with pytest.raises(UserError, match="--shuffle-buffer-size applies to streaming"):
        resolve_config({"data.data_dir": str(tmp_path), "loader.shuffle_buffer_size": 100})


def test_wandb_flags_are_checked(monkeypatch):
    with pytest.raises(UserError, match="--wandb-run-name names a W&B run; add --wandb-project PROJECT"):
        resolve_config({"output.wandb_run_name": "r1"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="--wandb-project demo needs the wandb package; pip install wandb"):
        resolve_config({"output.wandb_project": "demo"})
