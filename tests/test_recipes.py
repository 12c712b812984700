"""The shipped recipes as package data: found by name from a wheel install, and
every one passes --dry-run there without network or the user's data."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from ultimate_trainer import recipes
from ultimate_trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# Runs in the fresh venv, from a directory outside the repository: every recipe's
# dry run in one process (each process start costs seconds of imports).
DRY_RUNS = """
import contextlib, io, json, sys
import ultimate_trainer
from ultimate_trainer.cli import main
from ultimate_trainer.recipes import recipe_names

results = {"package": ultimate_trainer.__file__, "recipes": {}}
for name in recipe_names():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["--recipe", name, "--dry-run", "--json", "--peak-flops", "1e12"])  # no CPU peak measured
    results["recipes"][name] = {"rc": rc, "plan": json.loads(out.getvalue()) if rc == 0 else None,
                                "stderr": err.getvalue()[-2000:]}
print(json.dumps(results))
"""


def _run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done


def test_every_recipe_dry_runs_from_a_wheel_install(tmp_path):
    start = time.perf_counter()
    source = tmp_path / "src"
    shutil.copytree(REPO / "ultimate_trainer", source / "ultimate_trainer",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # Offline when the build tools are here already; otherwise pip fetches them.
    offline = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *(["--no-build-isolation"] * offline), "-q",
          str(source), "-w", str(tmp_path / "dist")])
    wheel, = (tmp_path / "dist").glob("ultimate_trainer-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    # The dependencies come from this interpreter's environment, added after the venv's own site-packages
    # (a .pth line adds a path but runs none of the .pth files there, so an editable install stays out).
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", KERAS_BACKEND="jax")
    results = json.loads(_run([str(python), "-c", DRY_RUNS], cwd=elsewhere, env=env).stdout.strip().splitlines()[-1])

    assert Path(results["package"]).is_relative_to(site), results["package"]  # the wheel's copy, not the repo's
    assert sorted(results["recipes"]) == recipes.recipe_names() and len(results["recipes"]) == 9
    for name, result in results["recipes"].items():
        assert result["rc"] == 0, (name, result["stderr"])
        plan = result["plan"]
        data = plan["data"]
        # Nothing readable offline: the plan says what it did not read and why.
        assert data["kind"] == "unread", (name, data)
        assert ("not prepared yet" if name.endswith("1.36b") else "HF_HUB_OFFLINE is set") in data["not_read"]
        assert any(note.startswith("not read here: ") for note in plan["notes"])
        assert plan["schedule"]["total_tokens"] > 1e9 and data["tokenizer"]["vocab_size"] in (32000, 50257)
    assert not any(elsewhere.iterdir()), "a dry run writes nothing"
    print(f"wheel build, install and {len(results['recipes'])} dry runs: {time.perf_counter() - start:.1f}s")


def _dry_run(argv, capsys):
    """`main(argv + --dry-run --json)` in this process: (exit code, plan or None, stderr)."""
    from ultimate_trainer.cli import main

    capsys.readouterr()
    rc = main([*argv, "--dry-run", "--json", "--peak-flops", "1e12"])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if rc == 0 else None, err


def test_the_136b_recipe_plans_before_its_shards_exist_and_reads_them_after(tmp_path, monkeypatch, capsys):
    from ultimate_trainer.cli import main
    from ultimate_trainer.data import shards
    from ultimate_trainer.data.tokenizers import ByteTokenizer
    from ultimate_trainer.models import sizing

    monkeypatch.chdir(tmp_path)
    rc, plan, _ = _dry_run(["--recipe", "llama-1.36b"], capsys)
    assert rc == 0
    assert plan["data"]["kind"] == "unread" and plan["data"]["source"] == "shards in data/slimpajama_6b_llama"
    assert "`ultimate-trainer prepare-data --data-dir data/slimpajama_6b_llama`" in plan["data"]["not_read"]
    assert plan["data"]["tokenizer"]["vocab_size"] == 32000 and plan["data"]["train_tokens_per_epoch"] is None
    assert plan["parameters"]["total"] == sizing.count_params(sizing.Architecture(32000, 2304, 18, 18, 6144, 2048)).total
    assert plan["schedule"]["total_tokens"] == 26_214_400_000 and plan["schedule"]["steps_per_epoch"] is None
    # Training (not a dry run) needs the shards: one line that says how to make them.
    assert main(["--recipe", "llama-1.36b", "--max-steps", "1"]) == 2
    assert "--data-dir data/slimpajama_6b_llama: no such directory; make it with `ultimate-trainer prepare-data" \
        in capsys.readouterr().err

    # Shards made with another tokenizer than the recipe states (the byte one here, not LLaMA-2's): refused.
    text = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20 for i in range(20)]
    for where in ("data/slimpajama_6b_llama", "mine"):
        shards.prepare_shards(tmp_path / where, ByteTokenizer(), {"train": text[:16], "val": text[16:]}, "test",
                              log=lambda line: None)
    rc, _, err = _dry_run(["--recipe", "llama-1.36b", "--seq-len", "64"], capsys)
    assert rc == 2 and err == (
        "error: --data-dir data/slimpajama_6b_llama: its shards' tokenizer has 258 ids, but --vocab-size (or the "
        "recipe) says 32,000; prepare the shards with the tokenizer the recipe names, or pass --vocab-size 258\n")
    # Shards of one's own replace the recipe's, tokenizer and all; a --vocab-size typed with them is checked.
    rc, plan, _ = _dry_run(["--recipe", "llama-1.36b", "--data-dir", "mine", "--seq-len", "64"], capsys)
    assert rc == 0 and plan["data"]["kind"] == "shards" and plan["architecture"]["vocab_size"] == 258
    assert plan["data"]["train_tokens_per_epoch"] == sum(len(t.encode()) + 1 for t in text[:16])
    rc, _, err = _dry_run(["--recipe", "llama-1.36b", "--data-dir", "mine", "--vocab-size", "300"], capsys)
    assert rc == 2 and "its shards' tokenizer has 258 ids, but --vocab-size (or the recipe) says 300" in err


def test_a_hub_recipe_plans_offline_and_says_what_it_did_not_read(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, plan, _ = _dry_run(["--recipe", "ttt-125m"], capsys)
    assert rc == 0 and plan["data"]["kind"] == "unread"
    assert plan["data"]["not_read"] == "the Hugging Face Hub is not reachable (HF_HUB_OFFLINE is set)"
    assert plan["data"]["tokenizer"] == {"kind": "sentencepiece", "vocab_size": 32000,
                                         "planned": "trained on the data when the run starts"}
    assert plan["architecture"]["ttt"]["state_passing"] and plan["schedule"]["total_steps"] == 4800
    assert plan["data"]["eval_batches"] is None  # the validation set's size is unknown until it is read


@pytest.mark.parametrize("argv, message", [
    (["--dataset-id", "allenai/c4"], "so the steps of --epochs 3 are unknown; add --max-steps N or --total-tokens N"),
    (["--dataset-id", "allenai/c4", "--tokenizer", "sentencepiece", "--auto-vocab-size", "--max-steps", "5"],
     "and --auto-vocab-size picks the vocab size from it; pass --vocab-size N to plan the run"),
])
def test_what_an_offline_dry_run_cannot_plan_is_one_line(argv, message, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = _dry_run(argv, capsys)
    assert rc == 2 and message in err and err.count("\n") == 1


def test_a_source_flag_replaces_the_recipes_source(tmp_path):
    from ultimate_trainer.config import planned_vocab_size, resolve_config

    (tmp_path / "notes.txt").write_text("some text\n")
    cfg = resolve_config({"run.recipe": "ttt-125m", "data.data_files": str(tmp_path / "notes.txt")})
    assert (cfg.data.dataset_id, cfg.data.dataset_config, cfg.data.val_split) == (None, None, None)
    assert cfg.data.max_val_examples == 10000  # settings not tied to the source stay
    cfg = resolve_config({"run.recipe": "llama-1.36b", "data.dataset_id": "DKYoon/SlimPajama-6B"})
    assert cfg.data.data_dir is None and cfg.data.dataset_id == "DKYoon/SlimPajama-6B"
    assert "tokenizer.vocab_size" not in cfg.explicit  # the recipe's size described its shards' tokenizer
    cfg = resolve_config({"run.recipe": "llama-1.36b", "data.data_dir": str(tmp_path)})
    assert cfg.data.data_dir == str(tmp_path) and "tokenizer.vocab_size" not in cfg.explicit
    assert planned_vocab_size(resolve_config({"run.recipe": "gpt2-1.36b"})) == 50257
    with pytest.raises(UserError, match="--data-dir nowhere holds no prepared shards yet, so the vocab size is "
                                        "unknown; make them with .* or pass --vocab-size N"):
        planned_vocab_size(resolve_config({"data.data_dir": "nowhere"}))
