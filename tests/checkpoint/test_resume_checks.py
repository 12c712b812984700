"""A resume refuses whatever would change the run, unless allowed by name; then the LR continues.

In process (`cli.main`): one short run makes the checkpoints, and each refusal stops before any
model is built.
"""

import json
import math

import pytest

from tests.conftest import tiny_model_flags
from ultimate_trainer import config as config_lib
from ultimate_trainer.checkpoint.resume import changeable_names, parse_allowed, saved_config
from ultimate_trainer.cli import main
from ultimate_trainer.errors import UserError

# On one pytest-xdist worker (tools/run_tests.py), so that the module's first run is made once.
pytestmark = pytest.mark.xdist_group("resume-checks")

QUIET = [*tiny_model_flags(), "--warmup-steps", "1", "--log-every", "1", "--no-eval", "--no-tensorboard"]
PEAK, END, WARMUP, TOTAL = 5e-4, 5e-5, 1, 6  # the first run: the defaults' LR and end, --max-steps 6


def plain_lr(step, peak=PEAK, end=END, warmup=WARMUP, total=TOTAL):
    """The LR of update `step` (from 0) in a run that is never resumed."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def _lrs(out):
    """{step: lr} of metrics.jsonl; step k is logged after update k - 1."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "lr" in r}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "first"
    assert main([*QUIET, "--max-steps", str(TOTAL), "--save-every", "3", "--output-dir", str(out)]) == 0
    return out


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("changes, named, allow", [
    (["--max-steps", "12"], "--max-steps 6 (checkpoint) vs 12 (this run); ", "max_steps"),
    # The default end LR is a tenth of the peak: it follows --learning-rate and is not named apart.
    (["--max-steps", "6", "--learning-rate", "1e-3"], "--learning-rate 0.0005 (checkpoint) vs 0.001 (this run); ", "lr"),
    (["--max-steps", "6", "--lr-end", "1e-4"], "--lr-end 5e-05 (checkpoint) vs 0.0001 (this run); ", "lr_end"),
    (["--max-steps", "12", "--learning-rate", "1e-3", "--lr-end", "1e-5", "--warmup-steps", "2", "--grad-clip", "0.5"],
     "--max-steps 6 (checkpoint) vs 12 (this run), --learning-rate 0.0005 vs 0.001, --lr-end 5e-05 vs 1e-05, "
     "--warmup-steps 1 vs 2, --grad-clip 1 vs 0.5; ", "max_steps,lr,lr_end,warmup,grad_clip"),
])
def test_a_changed_trajectory_is_refused_naming_both_values(run, capsys, changes, named, allow):
    line = _error(capsys, [*QUIET, *changes, "--output-dir", str(run), "--resume-from", str(run / "checkpoint-3")])
    assert f"this run differs from the checkpoint's: {named}" in line
    assert f"on purpose add --allow-changed-config {allow} " in line


def test_what_cannot_continue_is_refused_even_with_the_others_allowed(run, capsys):
    line = _error(capsys, [*QUIET, "--max-steps", "6", "--seed", "7", "--weight-decay", "0.1", "--num-layers", "3",
                           "--output-dir", str(run), "--resume-from", str(run / "checkpoint-3")])
    assert "--weight-decay 0.01 (checkpoint) vs 0.1 (this run), --seed 42 vs 7, --num-layers 2 vs 3; " in line
    assert "--seed, --num-layers cannot change on a resume, the checkpoint's data stream and weights would not fit" in line
    assert "to change the rest on purpose add --allow-changed-config weight_decay" in line
    line = _error(capsys, [*QUIET, "--max-steps", "6", "--seed", "7", "--weight-decay", "0.1",
                           "--allow-changed-config", "weight_decay", "--output-dir", str(run), "--resume-from",
                           str(run / "checkpoint-3")])
    assert "differs from the checkpoint's: --seed 42 (checkpoint) vs 7 (this run); " in line
    assert "--weight-decay" not in line


def test_settings_that_keep_the_math_are_free(run, tmp_path, capsys):
    # Logging, eval, saving, workers, another output dir; and the same resolved run typed
    # differently: 768 tokens = 6 steps of 4 x 32, the default end LR (0.1 x the peak) typed.
    argv = [*tiny_model_flags(), "--warmup-steps", "1", "--total-tokens", "768", "--lr-end", "5e-5",
            "--log-every", "2", "--save-every", "5", "--eval-every", "4", "--eval-steps", "1", "--skip-nonfinite", "2",
            "--num-workers", "2", "--output-dir", str(tmp_path / "elsewhere"), "--resume-from", str(run / "checkpoint-3"),
            "--dry-run", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["resume"]["changes"] == [] and plan["resume"]["changed"] is None
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert plan["schedule"]["lr_schedule"] == state["schedule"] == {
        "peak": PEAK, "end": pytest.approx(END), "warmup_steps": WARMUP, "total_steps": TOTAL}


def test_allowed_changes_keep_the_learning_rate_continuous(run, tmp_path, capsys):
    out = tmp_path / "longer"
    assert main([*QUIET, "--max-steps", "12", "--learning-rate", "1e-3", "--save-every", "3", "--output-dir", str(out),
                 "--allow-changed-config", "max-steps,learning_rate", "--resume-from",
                 str(run / "checkpoint-3")]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "--allow-changed-config" in line]
    assert len(said) == 1 and said[0].startswith(
        "resume: --allow-changed-config max-steps,learning_rate: --max-steps 6 -> 12; --learning-rate 0.0005 -> "
        "0.001; the learning rate continues from 0.0003445 (the checkpoint's schedule at step 3) and decays by cosine "
        "to 0.0001 at step 12 (warmup done)"), said

    before, after = _lrs(run), _lrs(out)
    assert sorted(after) == list(range(4, 13))
    start = plain_lr(3)  # what the first run's 4th update used; the resumed run's first
    expected = {step: 1e-4 + 0.5 * (start - 1e-4) * (1 + math.cos(math.pi * (step - 1 - 3) / (12 - 3)))
                for step in range(4, 13)}
    assert after == pytest.approx(expected, rel=1e-5)
    assert before[3] == pytest.approx(plain_lr(2), rel=1e-5)
    normal = max(abs(plain_lr(s + 1) - plain_lr(s)) for s in range(TOTAL))  # the largest change of one step
    assert abs(after[4] - before[3]) <= normal * 1.0001
    # Rebuilt from scratch, the new schedule would have jumped there.
    assert abs(plain_lr(3, 1e-3, 1e-4, 1, 12) - before[3]) > 3 * normal

    # A resume of the resumed run keeps the continued schedule, which its checkpoints record...
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["schedule"]["from_step"] == 3 and state["schedule"]["from_lr"] == pytest.approx(start, rel=1e-5)
    assert main([*QUIET, "--max-steps", "12", "--learning-rate", "1e-3", "--output-dir", str(out), "--resume-from",
                 str(out / "checkpoint-6"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["schedule"]["lr_schedule"] == state["schedule"] and plan["resume"]["changed"] is None
    # ...and compares with its settings, not the first run's.
    line = _error(capsys, [*QUIET, "--max-steps", "6", "--learning-rate", "1e-3", "--output-dir", str(out),
                           "--resume-from", str(out / "checkpoint-6")])
    assert "differs from the checkpoint's: --max-steps 12 (checkpoint) vs 6 (this run); " in line


@pytest.mark.parametrize("args, message", [
    (["--max-steps", "2", "--allow-changed-config", "max_steps", "--resume-from", "CHECKPOINT"],
     "is at step 3, and this run ends at step 2; give a run length beyond step 3"),
    (["--resume-from", "latest", "--output-dir", "EMPTY"], "holds no complete checkpoint"),
    (["--resume-from", "NOPE"], "no such directory"),
    (["--resume-from", "s3://bucket/run", "--cloud-endpoint-url", "http://127.0.0.1:9"],
     "; check the bucket name, the credentials and --cloud-endpoint-url"),
    (["--max-steps", "6", "--batch-size", "8", "--resume-from", "CHECKPOINT"],
     "differs from the checkpoint's: --batch-size 4 (checkpoint) vs 8 (this run); --batch-size cannot change"),
])
def test_resume_errors(run, tmp_path, capsys, args, message):
    where = {"CHECKPOINT": str(run / "checkpoint-3"), "EMPTY": str(tmp_path / "empty"), "NOPE": str(tmp_path / "nope")}
    line = _error(capsys, [*QUIET, "--output-dir", str(run), *[where.get(a, a) for a in args]])
    assert message in line


@pytest.mark.parametrize("text, names", [("lr", {"lr"}), ("--max-steps, total-tokens,EPOCHS", {"max_steps"}),
                                         ("min_lr_ratio,use-mixed-precision,dropout_rate", {"lr_end", "precision", "dropout"})])
def test_allow_changed_config_takes_short_and_flag_names(text, names):
    assert parse_allowed(text) == names


@pytest.mark.parametrize("value, message", [
    ("lr,bogus", "--allow-changed-config 'bogus': not a setting it knows; give comma-separated names from: "
                 "max_steps, lr, lr_end, warmup, weight_decay, grad_clip, precision, dropout, aux_loss, z_loss"),
    ("seq-len", "--allow-changed-config seq-len: --seq-len cannot change on a resume, the checkpoint's data stream "
                "would not fit; resume with its value, or start a new run from its weights with --init-from"),
    ("d_model", "--d-model cannot change on a resume, the checkpoint's weights would not fit; resume with its value. "),
])
def test_allow_changed_config_refuses_unknown_and_fixed_names(value, message):
    with pytest.raises(UserError) as caught:
        config_lib.resolve_config({"output.allow_changed_config": value, "output.resume_from": "latest"})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_allow_changed_config_needs_a_resume_and_its_help_lists_every_name():
    with pytest.raises(UserError, match="--allow-changed-config applies to --resume-from; add it"):
        config_lib.resolve_config({"output.allow_changed_config": "lr"})
    field = next(f for _, _, f in config_lib.iter_fields() if f.name == "allow_changed_config")
    for name in changeable_names():
        assert name in field.metadata["help"], name


def test_an_older_checkpoint_is_compared_with_its_settings_and_defaults(run, tmp_path, capsys):
    import shutil

    from ultimate_trainer.checkpoint import store

    # Written before checkpoints recorded their schedule or had --grad-clip: rebuilt from its
    # settings, a missing key read as the default.
    old = shutil.copytree(run / "checkpoint-3", tmp_path / "checkpoint-3")
    state = json.loads((old / "trainer_state.json").read_text())
    del state["schedule"]
    (old / "trainer_state.json").write_text(json.dumps(state))
    args = json.loads((old / "training_args.json").read_text())
    del args["training"]["grad_clip"]
    (old / "training_args.json").write_text(json.dumps(args))
    store.write_manifest(old, 3)
    assert main([*QUIET, "--max-steps", "6", "--output-dir", str(tmp_path / "o"), "--resume-from", str(old),
                 "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["resume"]["changes"] == [] and plan["schedule"]["lr_schedule"]["total_steps"] == TOTAL
    assert main([*QUIET, "--max-steps", "12", "--allow-changed-config", "max_steps", "--output-dir",
                 str(tmp_path / "o"), "--resume-from", str(old), "--dry-run", "--json"]) == 0
    schedule = json.loads(capsys.readouterr().out)["schedule"]["lr_schedule"]
    assert schedule["from_step"] == 3 and schedule["from_lr"] == pytest.approx(plain_lr(3), rel=1e-5)


def test_eval_only_needs_only_the_model_to_match(run, tmp_path, capsys):
    argv = [*tiny_model_flags(), "--eval-only", "--eval-steps", "1", "--json", "--resume-from", str(run / "checkpoint-3"),
            "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--learning-rate", "1e-3", "--seed", "7"]) == 0  # it trains nothing
    assert json.loads(capsys.readouterr().out)["val_loss"] > 0
    line = _error(capsys, [*argv, "--num-layers", "3"])
    assert "differs from the checkpoint's: --num-layers 2 (checkpoint) vs 3 (this run); " in line


def test_a_resumed_run_keeps_a_better_best_checkpoint(tmp_path):
    import shutil

    # At this learning rate the tiny model's validation loss rises from step 1 to step 2.
    out = tmp_path / "run"
    argv = [*tiny_model_flags(), "--warmup-steps", "1", "--learning-rate", "0.2", "--max-steps", "2", "--save-every", "1",
            "--eval-every", "1", "--eval-steps", "2", "--no-tensorboard", "--sample-tokens", "0", "--output-dir", str(out)]
    assert main(argv) == 0
    assert not (out / "samples.txt").exists()  # --sample-tokens 0: no end-of-run samples
    losses = {r["step"]: r["val_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "val_loss" in r}
    assert losses[2] > losses[1], losses  # the premise; if training changes, pick another learning rate
    best_state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["best"]
    assert best_state == {"val_loss": pytest.approx(losses[1]), "step": 1}

    shutil.rmtree(out / "checkpoint-2")
    assert main([*argv, "--resume-from", str(out / "checkpoint-1")]) == 0
    # Step 2's worse loss did not replace step 1's best (a fresh best of inf would have).
    assert json.loads((out / "best_checkpoint" / "trainer_state.json").read_text())["step"] == 1
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["best_step"] == 1 and summary["best_val_loss"] == pytest.approx(losses[1])


def test_a_checkpoint_saved_with_min_lr_ratio_reads_as_its_lr_end(tmp_path):
    # Before issue 22 min_lr_ratio was a field of its own; training_args.json may hold it.
    args = {"training": {"learning_rate": 2e-3, "lr_end": None, "min_lr_ratio": 0.05}}
    (tmp_path / "training_args.json").write_text(json.dumps(args))
    assert saved_config(tmp_path).training.lr_end == pytest.approx(1e-4)
    args["training"].update(lr_end=3e-5, min_lr_ratio=None)
    (tmp_path / "training_args.json").write_text(json.dumps(args))
    assert saved_config(tmp_path).training.lr_end == 3e-5
