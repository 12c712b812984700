"""The MoE guide's YAML recipe shape, the MoE/Muon flags' errors, the shipped
MoE recipes, and one end-to-end run of a tiny MoE model with Muon from a YAML."""

import json
import re
from pathlib import Path

import pytest

from tests.conftest import run_main
from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError
from ultimate_trainer.models import sizing

REPO = Path(__file__).resolve().parents[1]

GUIDE_YAML = """
model:
  d_model: 64
  n_layers: 4
  num_heads: 4
  n_experts: 4
  d_ff: 96
training:
  total_tokens: 2M
  batch_size: 8
  gradient_accumulation_steps: 2
  max_lr: 3.0e-3
  min_lr_ratio: 0.05
  warmup_steps: 20
  optimizer: muon
  checkpoint_dir: {out}
  save_interval: 50
  save_total_limit: 2
data:
  dataset_name: HuggingFaceFW/fineweb
  dataset_config: sample-10BT
  max_examples: 1000
  tokenize_on_fly: true
  use_streaming: true
  num_workers: 2
evaluation:
  enabled: true
  eval_steps: 5
  eval_interval: 25
mixed_precision:
  bf16: true
wandb:
  enabled: false
  project: demo
  entity: my-team
"""

EQUIVALENT_FLAGS = {
    "model.d_model": 64, "model.num_layers": 4, "model.num_heads": 4, "model.num_experts": 4, "model.d_ff": 96,
    "training.total_tokens": 2_000_000, "training.batch_size": 8, "training.gradient_accumulation_steps": 2,
    "training.learning_rate": 3e-3, "training.lr_end": 0.05 * 3e-3, "training.warmup_steps": 20,
    "training.optimizer": "muon", "output.save_every": 50, "output.save_total_limit": 2,
    "data.dataset_id": "HuggingFaceFW/fineweb", "data.dataset_config": "sample-10BT",
    "data.max_train_examples": 1000, "loader.tokenize_on_fly": True, "loader.use_streaming": True,
    "loader.num_workers": 2, "output.eval": True, "output.eval_steps": 5, "output.eval_every": 25,
    "optimization.use_mixed_precision": True,
}


def test_guide_yaml_resolves_like_the_equivalent_flags(tmp_path):
    recipe = tmp_path / "production_training.yaml"
    recipe.write_text(GUIDE_YAML.format(out=tmp_path / "run"))
    from_yaml = resolve_config({"run.config": str(recipe)}).to_dict()
    from_flags = resolve_config({**EQUIVALENT_FLAGS, "output.output_dir": str(tmp_path / "run")}).to_dict()
    from_yaml["run"]["config"] = None
    assert from_yaml == from_flags
    assert from_yaml["output"]["wandb_project"] is None, "wandb.enabled: false turns W&B off"
    assert from_yaml["output"]["wandb_entity"] is None


def test_every_key_of_the_guides_config_lands_in_a_setting(tmp_path):
    """configs/production_training.yaml has the guide's shape; with W&B on and the guide's entity key,
    every value lands in the resolved config: none is dropped or ignored."""
    import yaml

    from ultimate_trainer.config import load_recipe

    guide = yaml.safe_load((REPO / "configs" / "production_training.yaml").read_text())
    guide["wandb"].update(enabled=True, entity="my-team")
    recipe = tmp_path / "guide.yaml"
    recipe.write_text(yaml.safe_dump(guide))
    resolved = resolve_config({"run.config": str(recipe)}).to_dict()
    values = load_recipe(recipe)
    leaves = [f"{section}.{key}" for section, keys in guide.items() for key in keys]
    assert len(values) == len(leaves) - 1  # wandb.enabled switches W&B on; it is no value of its own
    assert values["output.wandb_entity"] == "my-team" and values["output.wandb_project"] == "ultimate-trainer-moe"
    for key, value in values.items():
        section, name = key.split(".")
        if name == "min_lr_ratio":  # no setting of its own: --lr-end, as that fraction of the peak
            section, name, value = "training", "lr_end", value * values["training.learning_rate"]
        assert resolved[section][name] == (10**10 if name == "total_tokens" else value), key


def test_wandb_entity_needs_a_project():
    with pytest.raises(UserError, match="--wandb-entity names a W&B entity; add --wandb-project PROJECT"):
        resolve_config({"output.wandb_entity": "my-team"})


@pytest.mark.parametrize("text, message", [
    ("model:\n  n_expert: 8\n", "unknown key `model.n_expert`; did you mean `model.n_experts`?"),
    ("evaluation:\n  interval: 10\n", "unknown key `evaluation.interval`; did you mean `evaluation.eval_interval`?"),
    ("mixed_precison:\n  bf16: true\n", "unknown key `mixed_precison`; did you mean `mixed_precision`?"),
    ("training:\n  max_lrr: 0.1\n", "unknown key `training.max_lrr`; did you mean `training.max_lr`?"),
    ("wandb:\n  enabled: true\n", "`wandb.enabled: True` needs `wandb.project: NAME`"),
    ("training: {min_lr_ratio: 1.5}", "`min_lr_ratio` 1.5 must lie between 0 and 1"),
    ("training: {min_lr_ratio: a tenth}", "`min_lr_ratio` 'a tenth' must lie between 0 and 1"),
    ("training: {min_lr_ratio: true}", "`min_lr_ratio` True must lie between 0 and 1"),
    ("training: {min_lr_ratio: 0.1, lr_end: 1.0e-5}", "`lr_end` and `min_lr_ratio` both set the end learning rate"),
])
def test_bad_recipe_keys_say_what_to_fix(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_config({"run.config": str(recipe)})


@pytest.mark.parametrize("values, message", [
    ({"model.experts_top_k": 1}, "--experts-top-k configures mixture-of-experts layers; add --num-experts N"),
    ({"model.num_experts": -2}, "--num-experts must be zero"),
    ({"model.num_experts": 4, "model.experts_top_k": 5}, "--experts-top-k 5 must lie between 1 and --num-experts 4"),
    ({"model.num_experts": 4, "model.moe_every": 9}, "--moe-every 9 must lie between 1 and --num-layers 6"),
    ({"model.num_experts": 4, "model.capacity_factor": -1.0}, "--capacity-factor must be zero or positive"),
    ({"model.num_experts": 4, "model.router_z_loss_coef": -0.1}, "--router-z-loss-coef must be zero or positive"),
    ({"model.num_experts": 4, "model.use_lora": True, "model.lora_targets": "qkv,up"},
     "--lora-targets up adapts the dense MLP"),
    ({"output.eval": False, "output.eval_every": 10}, "--eval-every schedules validation"),
    ({"loader.num_workers": 0}, "--num-workers must be a positive number"),
    ({"training.optimizer": "sgd", "training.weight_decay": 0.1}, "applies to --optimizer adamw and muon only"),
])
def test_moe_and_recipe_flag_errors(values, message):
    with pytest.raises(UserError, match=message):
        resolve_config(values)


def test_min_lr_ratio_is_a_recipe_alias_of_lr_end_taken_of_the_final_peak(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training: {max_lr: 2.0e-3, min_lr_ratio: 0.25}\n")
    assert resolve_config({"run.config": str(recipe)}).training.lr_end == pytest.approx(5e-4)
    # A peak typed on the command line is the one the fraction is of; a typed --lr-end wins outright.
    assert resolve_config({"run.config": str(recipe), "training.learning_rate": 1e-3}).training.lr_end == \
        pytest.approx(2.5e-4)
    assert resolve_config({"run.config": str(recipe), "training.lr_end": 1e-5}).training.lr_end == 1e-5
    recipe.write_text("training: {learning_rate: 1.0e-3, min_lr_ratio: 1e-1}\n")  # YAML reads 1e-1 as a string
    assert resolve_config({"run.config": str(recipe)}).training.lr_end == pytest.approx(1e-4)
    assert resolve_config({}).training.lr_end is None  # the plan's default: a tenth of the peak


def test_muon_takes_weight_decay():
    assert resolve_config({"training.optimizer": "muon", "training.weight_decay": 0.1}).training.weight_decay == 0.1


@pytest.mark.parametrize("name, d_model, layers, total", [
    ("moe-500m", 768, 12, 530_541_312), ("moe-1b", 1024, 16, 938_116_096), ("moe-1.5b", 1536, 20, 1_514_190_336),
])
def test_moe_recipes(name, d_model, layers, total):
    path = REPO / "ultimate_trainer" / "recipes" / f"{name}.yaml"
    cfg = resolve_config({"run.config": str(path)})
    m, t = cfg.model, cfg.training
    assert (m.d_model, m.num_layers, m.num_experts, m.experts_top_k) == (d_model, layers, 8, 2)
    assert cfg.data.dataset_id == "HuggingFaceFW/fineweb" and cfg.data.dataset_config == "sample-10BT"
    assert t.optimizer == "muon" and cfg.optimization.use_mixed_precision
    counts = sizing.count_params(sizing.Architecture(cfg.tokenizer.vocab_size, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.seq_len,
                                 num_experts=8, experts_top_k=2))
    assert counts.total == total and f"{total:,}" in path.read_text() and f"{counts.active:,}" in path.read_text()
    assert t.total_tokens // (t.batch_size * t.gradient_accumulation_steps * m.seq_len) == 9536
    assert (REPO / "configs" / "production_training.yaml").resolve() == path.parent / "moe-500m.yaml"


def test_bf16_falls_back_where_the_gpu_lacks_it(monkeypatch):
    import keras

    from ultimate_trainer import backend

    assert backend.bf16_unsupported_reason() is None  # the CPU test box computes bfloat16
    if keras.backend.backend() != "jax":
        pytest.skip("the fake device is a jax one")
    import jax

    class V100:
        platform, device_kind, compute_capability = "gpu", "Tesla V100-SXM2-16GB", "7.0"

    monkeypatch.setattr(jax, "devices", lambda *a: [V100()])
    assert backend.bf16_unsupported_reason() == "Tesla V100-SXM2-16GB (compute capability 7.0) has no bfloat16"


def test_tiny_moe_with_muon_from_a_guide_yaml(tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""
model: {{d_model: 32, n_layers: 2, num_heads: 2, n_experts: 4, d_ff: 32, seq_len: 32, dropout_rate: 0.0}}
training: {{total_tokens: 512, batch_size: 4, max_lr: 0.01, min_lr_ratio: 0.1, warmup_steps: 1,
           optimizer: muon, checkpoint_dir: {out}, save_interval: 2}}
data: {{num_workers: 1}}
evaluation: {{enabled: false}}
mixed_precision: {{bf16: false}}
""")
    result = run_main(["--config", str(recipe), "--log-every", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--total-tokens 512 / (4 batch x 1 accumulation x 32 seq_len) = 4 steps" in result.stdout
    assert "active per token" in result.stdout and "MoE in 2 of 2 blocks" in result.stdout
    assert "moe aux" in result.stdout and "no validation (--no-eval)" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all("val_loss" not in r for r in records)
    assert sum(records[-1][f"expert_load_{i}"] for i in range(4)) == pytest.approx(1.0)
    assert not (out / "best_checkpoint").exists()
    from ultimate_trainer import load_model

    model, tokenizer = load_model(out / "checkpoint-4")
    assert model.moe["num_experts"] == 4 and model.count_params() == json.loads(
        (out / "training_summary.json").read_text())["parameters"]["total"]
