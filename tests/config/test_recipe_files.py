import pytest

from ultimate_trainer.config import resolve_config
from ultimate_trainer.errors import UserError


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


def test_recipe_choice_values_are_checked(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  optimizer: lamb\n")
    with pytest.raises(UserError, match="--optimizer 'lamb' is not one of adamw, adam, sgd"):
        resolve_config({"run.config": str(recipe)})
    recipe.write_text("tokenizer:\n  tokenizer: sentencepiece\n  tokenizer_model: wordpiece\n")
    with pytest.raises(UserError, match="--tokenizer-model 'wordpiece' is not one of bpe, unigram"):
        resolve_config({"run.config": str(recipe)})


def test_the_renamed_fields_old_names_still_read_in_recipes_and_saved_runs(tmp_path):
    # use_rope/use_rmsnorm/use_swiglu/eval_enabled became rope/rmsnorm/swiglu/eval, to read like
    # --no-rope/--no-rmsnorm/--no-swiglu/--no-eval; a recipe or a run saved with the old names means the same.
    from ultimate_trainer.config import RunSpec
    from ultimate_trainer.config.recipe_files import load_recipe

    sectioned = tmp_path / "old.yaml"
    sectioned.write_text("model: {use_rope: false, use_rmsnorm: false}\noutput: {eval_enabled: false}\n")
    flat = tmp_path / "flat.yaml"
    flat.write_text("use_swiglu: false\n")
    assert load_recipe(sectioned) == {"model.rope": False, "model.rmsnorm": False, "output.eval": False}
    assert load_recipe(flat) == {"model.swiglu": False}
    cfg = resolve_config({"run.config": str(sectioned)})
    assert (cfg.model.rope, cfg.model.rmsnorm, cfg.model.swiglu, cfg.output.eval) == (False, False, True, False)
    saved = RunSpec.from_dict({"model": {"use_rope": False, "use_swiglu": False}, "output": {"eval_enabled": False}})
    assert (saved.model.rope, saved.model.swiglu, saved.model.rmsnorm, saved.output.eval) == (False, False, True, False)
