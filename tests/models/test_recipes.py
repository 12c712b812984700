"""The shipped recipes: exact parameter counts against the published sizes."""

from pathlib import Path

import pytest

from ultimate_trainer.config import load_recipe
from ultimate_trainer.models import sizing
from ultimate_trainer.recipes import RECIPES_DIR

REPO = Path(__file__).resolve().parents[2]


def _count(name):
    values = {k.split(".", 1)[1]: v for k, v in load_recipe(RECIPES_DIR / f"{name}.yaml").items()}
    return sizing.count_params(sizing.Architecture(
        values["vocab_size"], values["d_model"], values["num_layers"], values["num_heads"], values["d_ff"],
        values["seq_len"], use_rope=values.get("rope", True), use_rmsnorm=values.get("rmsnorm", True),
        use_swiglu=values.get("swiglu", True), tie_embeddings=values.get("tie_embeddings", False),
        use_bias=values.get("use_bias", False),
    ))


@pytest.mark.parametrize("name,exact,stated", [
    ("llama-1.36b", 1_294_159_104, 1.29e9),
    ("gpt2-1.36b", 1_405_338_496, 1.41e9),
])
def test_recipe_parameter_counts(name, exact, stated):
    counts = _count(name)
    assert counts.total == exact
    assert abs(counts.total / stated - 1) < 0.005  # the recipe's rounded figure
    assert f"{exact:,}" in (RECIPES_DIR / f"{name}.yaml").read_text()


def test_models_doc_preset_table_matches_the_formula():
    doc = (REPO / "docs" / "models.md").read_text()
    for name, (d, layers, heads, d_ff) in sizing.SIZE_PRESETS.items():
        byte = sizing.count_params(sizing.Architecture(258, d, layers, heads, d_ff, 256))
        vocab32k = sizing.count_params(sizing.Architecture(32000, d, layers, heads, d_ff, 256))
        row = (f"| {name} | {d} | {layers} | {heads} | {d_ff} | {byte.total:,} | {byte.non_embedding:,} | "
               f"{vocab32k.total:,} |")
        assert row in doc, row


def test_the_136b_pair_differs_in_the_block_only():
    """The comparison's settings (the project's config): same data, batch, budget and optimizer on both sides;
    the GPT-2 side is GPT-2's block: learned positions, LayerNorm, GELU, biases, tied embeddings."""
    from ultimate_trainer.config import resolve_config

    llama, gpt2 = (resolve_config({"run.recipe": name}) for name in ("llama-1.36b", "gpt2-1.36b"))
    for cfg, data_dir in ((llama, "data/slimpajama_6b_llama"), (gpt2, "data/slimpajama_6b_gpt2")):
        t = cfg.training
        assert cfg.data.data_dir == data_dir and cfg.data.dataset_id is None  # .bin shards from prepare-data
        assert (t.global_batch_size, t.batch_size, t.max_steps, t.warmup_steps) == (512, 8, 25000, 2000)
        assert (t.learning_rate, t.lr_end, t.weight_decay, t.grad_clip, t.optimizer) == (3e-4, 3e-5, 0.1, 1.0, "adamw")
        assert t.global_batch_size * t.max_steps * cfg.model.seq_len == 26_214_400_000
        assert f"{26_214_400_000:,}" in (RECIPES_DIR / f"{cfg.run.recipe}.yaml").read_text()
        assert cfg.optimization.use_mixed_precision and cfg.model.dropout_rate == 0.0
        assert (cfg.output.eval_every, cfg.output.eval_steps, cfg.output.save_every) == (1000, 50, 1000)
    assert llama.tokenizer.vocab_size == 32000 and gpt2.tokenizer.vocab_size == 50257
    m = llama.model
    assert (m.rope, m.rmsnorm, m.swiglu, m.use_bias, m.tie_embeddings) == (True, True, True, False, False)
    m = gpt2.model
    assert (m.rope, m.rmsnorm, m.swiglu, m.use_bias, m.tie_embeddings) == (False, False, False, True, True)
    assert m.activation == "gelu"  # the tanh approximation: models/feed_forward.py, export's gelu_new


@pytest.mark.parametrize("name, layers, stated_tokens", [
    ("ttt-125m", 12, 2.4e9), ("ttt-350m", 24, 6.75e9), ("ttt-760m", 24, 14.5e9), ("ttt-1b", 24, 25e9),
])
def test_ttt_recipes_resolve_with_their_token_budgets(name, layers, stated_tokens):
    from ultimate_trainer.config import resolve_config, ttt_kind

    cfg = resolve_config({"run.config": str(RECIPES_DIR / f"{name}.yaml")})
    m, t = cfg.model, cfg.training
    assert ttt_kind(m) == "linear" and m.num_layers == layers and m.seq_len == 2048
    assert t.batch_size * t.gradient_accumulation_steps == 256 and t.warmup_steps == t.max_steps // 10
    assert cfg.optimization.use_mixed_precision and t.weight_decay == 0.1 and t.lr_end == 1e-5
    # The guide's --state_passing, milestones every 2K steps, and a validation set of a fixed, small size.
    assert m.state_passing and cfg.loader.stride is None  # the default stride: each window starts at the last target
    assert cfg.output.milestone_every == 2000 and cfg.output.eval_every == 500
    assert cfg.data.val_split == "validation" and cfg.data.max_val_examples == 10000
    tokens = t.max_steps * 256 * 2048
    # The paper counts 2^19 tokens per step as "0.5M": its budgets are ours / 1.048576.
    assert tokens / 1.048576 == pytest.approx(stated_tokens, rel=1e-3)
    assert f"{tokens:,}" in (RECIPES_DIR / f"{name}.yaml").read_text()
    counts = sizing.count_params(sizing.Architecture(32000, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.seq_len,
                                 tie_embeddings=True, ttt_layer_type="linear", ttt_mini_batch_size=16))
    assert counts.total > 0.85 * float(name.split("-")[1].replace("m", "e6").replace("b", "e9"))


@pytest.mark.parametrize("devices, batch, accumulation", [(8, 32, 1), (4, 32, 2), (2, 16, 8), (1, 16, 16), (16, 32, 0)])
def test_ttt_recipe_batch_adapts_to_the_device_count(devices, batch, accumulation):
    from ultimate_trainer.config import batch_split, resolve_config
    from ultimate_trainer.errors import UserError

    t = resolve_config({"run.config": str(RECIPES_DIR / "ttt-125m.yaml")}).training
    if not accumulation:  # 16 x 32 > 256: no accumulation count reaches the global batch
        with pytest.raises(UserError, match="--global-batch-size 256 is not a multiple of --batch-size 32 x 16"):
            batch_split(t, devices)
        return
    split = batch_split(t, devices)
    assert (split.batch_size, split.gradient_accumulation_steps) == (batch, accumulation)
    assert split.line == f"global batch 256 = {batch} per device x {devices} device(s) x {accumulation} accumulation steps"


@pytest.mark.parametrize("values, message", [
    ({"training.global_batch_size": 100, "training.batch_size": 32}, "--global-batch-size 100 is not a multiple of"),
    ({"training.global_batch_size": 64, "training.gradient_accumulation_steps": 2}, "derives --gradient-accumulation"),
    ({"training.device_batch_sizes": "1:16"}, "--device-batch-sizes picks the per-device batch"),
    ({"training.global_batch_size": 64, "training.device_batch_sizes": "one:16"}, "give DEVICES:BATCH pairs"),
])
def test_global_batch_errors(values, message):
    from ultimate_trainer.config import resolve_config
    from ultimate_trainer.errors import UserError

    with pytest.raises(UserError, match=message):
        resolve_config(values)
