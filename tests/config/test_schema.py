import dataclasses
import json

import pytest

from ultimate_trainer import config as config_lib
from ultimate_trainer.config import REDACTED, resolve_config


def test_every_field_has_help_and_a_unique_flag():
    flags = [config_lib.flag_name(f) for _, _, f in config_lib.iter_fields()]
    assert len(flags) == len(set(flags))
    for _, _, f in config_lib.iter_fields():
        assert f.metadata["help"]


def test_secrets_are_redacted(tmp_path):
    spec = resolve_config({})
    cfg = dataclasses.replace(spec, cloud=dataclasses.replace(spec.cloud, azure_sas_token="sv=2024&sig=SECRET123"))
    path = tmp_path / "training_args.json"
    config_lib.write_json(cfg, path)
    text = path.read_text()
    assert "SECRET123" not in text
    assert json.loads(text)["cloud"]["azure_sas_token"] == REDACTED


def test_to_dict_covers_every_section():
    d = resolve_config({}).to_dict()
    for attr, _, cls in config_lib.SECTIONS:
        assert set(d[attr]) == {f.name for f in dataclasses.fields(cls)}


def test_a_resolved_spec_is_frozen():
    cfg = resolve_config({"model.model_preset": "nano"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training = config_lib.TrainingConfig()
    for attr, _, _ in config_lib.SECTIONS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, attr), dataclasses.fields(getattr(cfg, attr))[0].name, None)
    assert cfg.model.d_model == 128


def test_from_dict_round_trips_and_skips_unknown_keys():
    cfg = resolve_config({"model.model_preset": "nano", "training.seed": 3})
    data = cfg.to_dict(redact=False)
    data["model"]["a_field_of_another_version"] = 1
    again = config_lib.RunSpec.from_dict(data)
    assert again.to_dict(redact=False) == cfg.to_dict(redact=False)
    assert config_lib.RunSpec.from_dict({}).model == config_lib.ModelConfig()
