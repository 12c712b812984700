import pytest

from ultimate_trainer import config as config_lib
from ultimate_trainer.config import count, parsers
from ultimate_trainer.errors import UserError


@pytest.mark.parametrize("text,value", [("100000000", 10**8), ("1e8", 10**8), ("100M", 10**8), ("1.5B", 1_500_000_000), ("2_400_000", 2_400_000)])
def test_count_parses_human_numbers(text, value):
    assert count(text) == value


@pytest.mark.parametrize("text", ["abc", "1.5", "nan", ""])
def test_count_rejects_non_counts(text):
    with pytest.raises(ValueError):
        count(text)


def test_mesh_parsing():
    assert parsers.parse_mesh("batch=2,model=4") == {"batch": 2, "model": 4}
    assert parsers.parse_mesh(" model=8") == {"model": 8}
    for text in ("batch=0", "data=2", "batch=two", "batch=2,batch=2", ""):
        with pytest.raises(UserError, match="AXIS=SIZE"):
            parsers.parse_mesh(text)


def test_cluster_settings_from_flags_and_environment():
    d = config_lib.DistributionConfig
    assert parsers.cluster_settings(d(), environ={}) is None
    assert parsers.cluster_settings(d(), environ={parsers.ENV_ADDRESS: "h:1", parsers.ENV_PROCESSES: "2",
                                                  parsers.ENV_PROCESS_ID: "1"}) == ("h:1", 2, 1)
    assert parsers.cluster_settings(d(process_id=0), environ={parsers.ENV_ADDRESS: "h:1",
                                                              parsers.ENV_PROCESSES: "2"}) == ("h:1", 2, 0)
    with pytest.raises(UserError, match="--num-processes"):
        parsers.cluster_settings(d(coordinator_address="h:1", process_id=0), environ={})
    with pytest.raises(UserError, match="between 0 and"):
        parsers.cluster_settings(d(coordinator_address="h:1", num_processes=2, process_id=2), environ={})
    with pytest.raises(UserError, match="must be whole numbers"):
        parsers.cluster_settings(d(), environ={parsers.ENV_PROCESSES: "two"})


def test_lora_targets_ttt_kind_and_block_indices():
    assert parsers.parse_lora_targets("qkv, out,down") == ("qkv", "out", "down")
    for text, bad in (("qkv,attn", "'attn'"), ("", r"'\(none\)'")):
        with pytest.raises(UserError, match=f"unknown target {bad}; use a comma-separated subset of qkv, out, up, down"):
            parsers.parse_lora_targets(text)
    assert [parsers.ttt_kind(config_lib.ModelConfig(ttt_layer_type=k)) for k in (None, "linear", "ttt_mlp")] == \
        [None, "linear", "mlp"]
    assert parsers.ttt_block_indices(3, None, "0") == () and parsers.ttt_block_indices(3, "mlp") == (0, 1, 2)
    assert parsers.ttt_block_indices(4, "linear", [2, 0, 2]) == (0, 2)
    assert parsers.moe_block_indices(6, 8, 3) == (2, 5) and parsers.moe_block_indices(6, 0) == ()


def test_device_batch_sizes_and_sas_tokens():
    assert parsers.parse_device_batch_sizes("1:16, 8:32") == {1: 16, 8: 32}
    for text in ("1:16,4", "0:8", "a:b", "2:0"):
        with pytest.raises(UserError, match="give DEVICES:BATCH pairs"):
            parsers.parse_device_batch_sizes(text)
    assert parsers.sas_token_problem("?sv=2024-08-04&sp=rw&sig=abc%3D") is None
    assert "no sig= field" in parsers.sas_token_problem("sv=2024-08-04&sp=rw")
    for text, why in (("https://acct.blob.core.windows.net/c?sv=1&sig=SECRET", "no sv= field"),
                      ("sv=1&sig=SECRET&Account=acct", "more than the token's fields")):
        problem = parsers.sas_token_problem(text)
        assert why in problem and "SECRET" not in problem


def test_the_lora_target_names_are_the_models_projections():
    from ultimate_trainer.models import lora

    assert tuple(lora.TARGETS) == parsers.LORA_TARGETS and lora.parse_targets is parsers.parse_lora_targets
