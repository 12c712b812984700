import pytest

from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError


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


def test_flags_that_would_be_ignored_are_refused(tmp_path):
    with pytest.raises(UserError, match="--weight-decay applies to --optimizer adamw and muon only, not sgd"):
        resolve_config({"training.optimizer": "sgd", "training.weight_decay": 0.1})
    assert resolve_config({"training.optimizer": "sgd"}).training.optimizer == "sgd"
    with pytest.raises(UserError, match="--shuffle-buffer-size applies to streaming"):
        resolve_config({"data.data_dir": str(tmp_path), "loader.shuffle_buffer_size": 100})
