"""The recipe presets: exact parameter counts against the published sizes."""

from pathlib import Path

import pytest

from ultimate_trainer.config import load_recipe
from ultimate_trainer.models import sizing

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def _count(name):
    values = {k.split(".", 1)[1]: v for k, v in load_recipe(PRESETS / f"{name}.yaml").items()}
    return sizing.count_params(
        values["vocab_size"], values["d_model"], values["num_layers"], values["num_heads"], values["d_ff"],
        values["seq_len"], use_rope=values.get("use_rope", True), use_rmsnorm=values.get("use_rmsnorm", True),
        use_swiglu=values.get("use_swiglu", True), tie_embeddings=values.get("tie_embeddings", False),
    )


@pytest.mark.parametrize("name,exact,stated", [
    ("llama-1.36b", 1_294_159_104, 1.29e9),
    ("gpt2-1.36b", 1_404_944_512, 1.41e9),
])
def test_recipe_parameter_counts(name, exact, stated):
    counts = _count(name)
    assert counts.total == exact
    assert abs(counts.total / stated - 1) < 0.005  # the recipe's rounded figure
    assert f"{exact:,}" in (PRESETS / f"{name}.yaml").read_text()


def test_models_doc_preset_table_matches_the_formula():
    doc = (PRESETS.parent / "docs" / "models.md").read_text()
    for name, (d, layers, heads, d_ff) in sizing.SIZE_PRESETS.items():
        byte = sizing.count_params(258, d, layers, heads, d_ff, 256)
        vocab32k = sizing.count_params(32000, d, layers, heads, d_ff, 256)
        row = (f"| {name} | {d} | {layers} | {heads} | {d_ff} | {byte.total:,} | {byte.non_embedding:,} | "
               f"{vocab32k.total:,} |")
        assert row in doc, row
