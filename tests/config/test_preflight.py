import pytest

from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError


def test_wandb_flags_are_checked(monkeypatch):
    with pytest.raises(UserError, match="--wandb-run-name names a W&B run; add --wandb-project PROJECT"):
        resolve_config({"output.wandb_run_name": "r1"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="--wandb-project demo needs the wandb package; pip install wandb"):
        resolve_config({"output.wandb_project": "demo"})
