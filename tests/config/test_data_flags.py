"""The streaming data flags: --data-mix (and the recipe's list form), tfds: ids, --tfds-data-dir, --eval-tokens."""

import pytest

from ultimate_trainer.config import load_recipe, parsers, resolve_config
from ultimate_trainer.errors import UserError


def test_a_data_mix_parses_weights_after_the_last_colon():
    assert parsers.parse_data_mix("web/*.parquet:0.7,tfds:c4/en:3.1.0:0.3") == (
        ("web/*.parquet", 0.7), ("tfds:c4/en:3.1.0", 0.3))
    assert parsers.parse_tfds_id("tfds:c4") == ("c4", None, None)
    assert parsers.parse_tfds_id("tfds:c4/en:3.1.0") == ("c4", "en", "3.1.0")


@pytest.mark.parametrize("values,message", [
    ({"data.data_mix": "a.jsonl:0.5,b.jsonl"}, r"--data-mix 'a.jsonl:0.5,b.jsonl': the item 'b.jsonl' has no "
                                               r"SOURCE:WEIGHT; write SRC:W,SRC:W"),
    ({"data.data_mix": "a.jsonl:x"}, r"the weight 'x' of a.jsonl is not a number >= 0"),
    ({"data.data_mix": "a.jsonl:-1"}, r"the weight '-1' of a.jsonl is not a number >= 0"),
    ({"data.data_mix": "a.jsonl:0,b.jsonl:0"}, "every weight is 0; give at least one source a weight above 0"),
    ({"data.data_mix": "tfds:C4!:1"}, r"--dataset-id tfds:C4!: not a TFDS id; write tfds:NAME\[/CONFIG\]"),
    ({"data.dataset_id": "tfds:c4:3.1"}, r"not a TFDS id"),
    ({"data.dataset_id": "tfds:c4", "data.dataset_config": "en"}, "write the config into the id: tfds:NAME/CONFIG"),
    ({"data.dataset_id": "x/y", "data.tfds_data_dir": "/d"}, "--tfds-data-dir /d applies to TFDS sources only"),
    ({"data.dataset_id": "x/y", "data.data_mix": "a.jsonl:1"}, "--dataset-id and --data-mix both choose the data; pass only one"),
    ({"data.eval_tokens": 0}, "--eval-tokens must be a positive number, got 0"),
    ({"data.eval_tokens": 100}, "--eval-tokens 100 bounds the validation of --dataset-id, --data-files or --data-mix"),
    ({"data.data_mix": "a.jsonl:1", "model.ttt_layer_type": "linear", "model.state_passing": True},
     "--state-passing reads one contiguous stream per batch row from a counted source, which --data-mix is not"),
])
def test_bad_data_flags_are_one_line_errors(values, message):
    with pytest.raises(UserError, match=message) as e:
        resolve_config(values)
    assert "\n" not in str(e.value)


def test_good_streaming_flags_resolve():
    cfg = resolve_config({"data.dataset_id": "tfds:c4/en:3.1.0", "data.tfds_data_dir": "/d", "data.eval_tokens": 5000,
                          "data.val_split": "validation"})
    assert (cfg.data.dataset_id, cfg.data.tfds_data_dir, cfg.data.eval_tokens) == ("tfds:c4/en:3.1.0", "/d", 5000)
    cfg = resolve_config({"data.data_mix": "tfds:c4:0.5,web/*.parquet:0.5", "data.tfds_data_dir": "/d",
                          "data.split": "train"})
    assert cfg.data.data_mix == "tfds:c4:0.5,web/*.parquet:0.5"


def test_a_recipe_mix_list_becomes_the_flag(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  mix:\n    - {source: web/*.parquet, weight: 0.7}\n    - {source: code.jsonl, weight: 0.3}\n")
    assert load_recipe(recipe)["data.data_mix"] == "web/*.parquet:0.7,code.jsonl:0.3"
    for bad, message in [("[{source: a}]", "exactly `source` and `weight`"),
                         ("[{source: a, weight: lots}]", "the weight 'lots' of a is not a number"),
                         ("[{source: 'a,b', weight: 1}]", "without commas"),
                         ("{source: a}", "expected a list of")]:
        recipe.write_text(f"data:\n  mix: {bad}\n")
        with pytest.raises(UserError, match=message):
            load_recipe(recipe)
