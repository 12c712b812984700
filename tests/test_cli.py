"""The command line as a user meets it: help, dry run, and one-line errors."""

import json

import pytest

from tests.conftest import assert_no_start_up_logs, run_cli, tiny_model_flags
from ultimate_trainer import config as config_lib
from ultimate_trainer.cli import main

ISSUE_FLAGS = """
--dataset-id --dataset-config --text-column --split --val-split --max-train-examples
--max-val-examples --data-files --auto-vocab-size --vocab-size --min-vocab-size --max-vocab-size
--tokenizer-train-examples --retrain-tokenizer --tokenizer-path --model-preset --target-params
--prefer-depth --d-model --num-layers --num-heads --d-ff --seq-len --dropout-rate --activation
--no-rmsnorm --no-swiglu --no-rope --no-flash-attention --use-lora --lora-rank --epochs
--batch-size --gradient-accumulation-steps --learning-rate --weight-decay --warmup-steps
--grad-clip --max-steps --total-tokens --lr-end --seed --shuffle-buffer-size
--stride --use-mixed-precision --output-dir --log-every --save-every --eval-every --resume-from
--cloud-provider --cloud-bucket --cloud-region --cloud-prefix --azure-sas-token
--azure-account-name --backend --config --dry-run --json --overwrite
""".split()


def _help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_shows_every_flag_grouped_with_defaults(capsys):
    text = _help(capsys)
    for flag in ISSUE_FLAGS:
        assert flag in text, flag
    for group in ("dataset:", "tokenizer:", "model:", "training:", "data loading:", "optimization:",
                  "checkpoint & logging:", "cloud:"):
        assert f"\n{group}\n" in text
    for default in ("(default: 16000)", "(default: 512)", "(default: 5e-4)".replace("5e-4", "0.0005"),
                    "(default: output_ultimate)", "(default: 600.0)", "(default: 10000)"):
        assert default in text


def test_help_lists_every_config_field_but_the_hidden_aliases(capsys):
    text = _help(capsys)
    for _, _, f in config_lib.iter_fields():
        assert (config_lib.flag_name(f) in text) != bool(f.metadata.get("hidden")), f.name


def test_hidden_aliases_are_accepted_and_the_plan_says_they_change_nothing(capsys, tmp_path):
    args = ["--model-preset", "nano", "--use-streaming", "--tokenize-on-fly", "--max-train-examples", "40",
            "--dry-run", "--output-dir", str(tmp_path / "o")]
    assert main(args) == 0
    assert "--use-streaming and --tokenize-on-fly: text sources are always streamed" in capsys.readouterr().out


def test_dry_run_json_is_one_object(tmp_path):
    result = run_cli(["--model-preset", "nano", "--dry-run", "--json", "--output-dir", str(tmp_path / "o")])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["architecture"]["d_model"] == 128 and plan["architecture"]["num_layers"] == 6
    assert plan["architecture"]["block_style"] == "llama"
    assert plan["parameters"]["total"] == 1_640_576
    assert plan["parameters"]["non_embedding"] + plan["parameters"]["embedding"] == plan["parameters"]["total"]
    assert plan["schedule"]["total_steps"] == 3 * plan["schedule"]["steps_per_epoch"]
    assert plan["backend"]["backend"] == "jax"
    assert not (tmp_path / "o").exists(), "a dry run must not create the output dir"
    assert_no_start_up_logs(result.stdout + result.stderr)


def test_dry_run_text_and_token_budget(tmp_path, capsys):
    assert main(["--model-preset", "tiny", "--dry-run", "--total-tokens", "1M", "--batch-size", "8",
                 "--gradient-accumulation-steps", "2", "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "--total-tokens 1,000,000 / (8 batch x 2 accumulation x 256 seq_len) = 244 steps" in out
    assert "parameters:" in out and "non-embedding" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--d-model", "128", "--num-heads", "5"], "--num-heads 5 does not divide --d-model 128"),
        (["--d-model", "-8"], "--d-model must be a positive number"),
        (["--model-preset", "gigantic"], "unknown --model-preset 'gigantic'"),
        (["--model-preset", "nano", "--target-params", "1M"], "--model-preset and --target-params"),
        (["--config", "/no/such/recipe.yaml"], "--config /no/such/recipe.yaml: no such file"),
        (["--num-layers", "three"], "invalid int value: 'three'"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message, capsys):
    assert main(args + ["--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], captured.err
    assert captured.out == ""


def test_bad_input_in_a_real_process_is_one_line_exit_2():
    # The same as above through `python -m`: no traceback, nothing else on stderr, not even start-up logs.
    result = run_cli(["--d-model", "128", "--num-heads", "5", "--dry-run"])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --num-heads 5 does not divide --d-model 128; "), result.stderr
    assert result.stdout == ""


def test_output_dir_with_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "training_args.json").write_text("{}")
    assert main(["--model-preset", "nano", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (out / "training_args.json").read_text() == "{}"


def test_in_process_main_returns_exit_code(capsys):
    assert main(["--d-model", "0", "--dry-run"]) == 2
    assert "error: --d-model must be a positive number, got 0" in capsys.readouterr().err


def test_explicit_train_subcommand(tmp_path, capsys):
    assert main(["train", *tiny_model_flags(), "--dry-run", "--output-dir", str(tmp_path)]) == 0
    assert "dry run: nothing trained" in capsys.readouterr().out
