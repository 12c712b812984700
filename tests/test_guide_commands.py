"""Every command of the CLI guide (docs/cli-guide.md) runs as written.

The guide trains from a Hugging Face dataset id; here each `python -m
ultimate_trainer` line of that page runs with local text in place of the id
and a one-step run appended (`--max-steps 1 --batch-size 2 --eval-steps 1
--sample-tokens 8`), so that a 100M-parameter command costs seconds, not hours. Everything else,
the model size included, is the guide's. The runs take minutes together, so
they are `slow`; that the page still parses into commands is checked by default.
"""

import shlex
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import run_main
from tests.test_docs import bash_blocks
from ultimate_trainer.data import sources

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "cli-guide.md"
PREFIX = "python -m ultimate_trainer "
ONE_STEP = ["--max-steps", "1", "--batch-size", "2", "--eval-steps", "1", "--sample-tokens", "8"]


def guide_commands():
    """The argument lists of the guide's `python -m ultimate_trainer` lines."""
    commands = []
    for _, code, _ in bash_blocks(GUIDE):
        commands += [shlex.split(line[len(PREFIX):]) for line in code.splitlines() if line.startswith(PREFIX)]
    return commands


def local(args, data_files):
    """`args` with `--dataset-id ID` replaced by `--data-files data_files`."""
    out = list(args)
    if "--dataset-id" in out:
        at = out.index("--dataset-id")
        out[at:at + 2] = ["--data-files", str(data_files)]
    return out


def test_the_guide_page_holds_its_commands():
    commands = guide_commands()
    assert len(commands) >= 9
    assert all("--dataset-id" in c for c in commands)  # the substitution below applies to each


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Enough varied English and code for the guide's 16,000-piece tokenizer: the
    default data plus standard-library sources (on every Python install)."""
    import json

    records = list(sources.default_records())
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:120]:
        records.append(path.read_text(errors="replace"))
    path = tmp_path_factory.mktemp("guide") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in records))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(guide_commands())))
def test_guide_command_runs(number, corpus, tmp_path):
    args = local(guide_commands()[number], corpus) + ONE_STEP + ["--output-dir", str(tmp_path / "run")]
    result = run_main(args)  # in process: the command's work, without a new interpreter's seconds of imports
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stderr[-3000:]}"
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
