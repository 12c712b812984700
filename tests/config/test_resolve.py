import pytest

from ultimate_trainer.config import resolve_config
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


def test_target_params_sets_the_architecture():
    cfg = resolve_config({"model.target_params": 10_000_000})
    m = cfg.model
    from ultimate_trainer.models import sizing

    total = sizing.count_params(sizing.Architecture(258, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.seq_len)).total
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
