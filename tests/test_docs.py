"""Every guide's commands run as written, so the docs cannot rot.

Each ```bash block of docs/*.md and README.md runs, in order, with bash -e
(a block may hold several commands that depend on each other), in a fresh
copy of the repository made per guide: the user's runs/ and outputs are never
touched. A block preceded by the line `<!-- docs-test: skip (REASON) -->` is
not run; REASON must say why (network, GPU/TPU, several hosts, a cloud
bucket, an install, a server that does not exit, a minutes-long benchmark).

A block runs command by command (`commands`: a quoted string, a heredoc or a
`\\`-continued line stays one command). A plain `python -m ultimate_trainer
ARGS` on this process's backend runs in this process (`conftest.run_main`, in
the guide's directory and environment): the same entry point with the same
arguments, without a new interpreter's seconds of imports, which over the
docs' ~60 commands were about a fifth of CI. A command with anything a shell
must do (a pipe, a redirect, `||`, a variable set before it) or another
backend runs in bash, as a user's shell would.

The runs take minutes, so the test that executes them is marked `slow`; the
check that the skip markers are well formed runs with the default suite.
"""

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_main

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
# What a guide's commands may use from the repository (no outputs, caches or VCS data).
COPIED = ("ultimate_trainer", "tools", "configs", "docs", "README.md", "setup.cfg", "pyproject.toml")
MARKER = "docs-test"
SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>.*\S.*)\) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")
HEREDOC = re.compile(r"<<-?\s*['\"]?(\w+)['\"]?")
ENTRY = ["python", "-m", "ultimate_trainer"]
SHELL_SYNTAX = set("|&;<>$`()")
# What the guide's environment sets that a command run in this process must see too.
IN_PROCESS_ENV = ("HOME", "HF_HUB_OFFLINE", "MPLBACKEND", "WANDB_MODE", "WANDB_DIR")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
AT_START_UP = ("XLA_", "JAX_", "TF_", "KERAS_", "CUDA", "TPU_", "OMP_", "PYTHON")  # read once, as a process starts


def bash_blocks(path):
    """[(line, code, skip reason or None)] of the ```bash blocks of a markdown file.

    Example:
        bash_blocks(Path("docs/quickstart.md"))[0]  # (5, "python3 -m venv ...", "installs ...")
    """
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "bash":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            match = SKIP.match(before.strip())
            blocks.append((i + 1, "\n".join(lines[i + 1:end]), match.group("reason") if match else None))
        i = end + 1
    return blocks


def commands(code):
    """The commands of a bash block, in order: a line continued with `\\`, a quoted string
    spanning lines and a heredoc each stay within their command; blank and comment lines go.

    Example:
        commands("ls \\\n  -l\ncat > f <<'EOF'\nx\nEOF")   # ['ls \\\n  -l', "cat > f <<'EOF'\nx\nEOF"]
    """
    lines, out, i = code.splitlines(), [], 0
    while i < len(lines):
        text, i = lines[i], i + 1
        while i < len(lines) and (text.endswith("\\") or not _closed(text)):
            text, i = text + "\n" + lines[i], i + 1
        heredoc = HEREDOC.search(text)
        while heredoc and i < len(lines):
            text, i = text + "\n" + lines[i], i + 1
            if lines[i - 1].strip() == heredoc.group(1):
                break
        if not _closed(text) or shlex.split(text.replace("\\\n", " "), comments=True):
            out.append(text)  # (an unclosed quote goes to bash, which will say what is wrong)
    return out


def _closed(text):
    try:
        shlex.split(text.replace("\\\n", " "), comments=True)
    except ValueError:  # a quote still open
        return False
    return True


def in_process_args(command, backend):
    """(CLI arguments, variables set before it) of `command` when it is a plain `python -m
    ultimate_trainer ARGS` that this process (on `backend`) can run as it is; else None (bash
    runs it). A variable read when a framework starts (XLA_FLAGS, ...) needs a new process.

    Example:
        in_process_args("WANDB_MODE=offline python -m ultimate_trainer --dry-run  # a plan", "jax")
        # (['--dry-run'], {'WANDB_MODE': 'offline'})
    """
    words = shlex.split(command.replace("\\\n", " "), comments=True)
    variables = {}
    while words and ASSIGNMENT.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        variables[name] = value
    if any(name.startswith(AT_START_UP) for name in variables):
        return None
    if words[:3] != ENTRY or any(SHELL_SYNTAX & set(w) for w in words if not w.startswith("-")):
        return None
    if "--backend" in words and words[words.index("--backend") + 1:][:1] != [backend]:
        return None  # another backend needs its own process (Keras picks one per process)
    if any(c in command for c in "|&;<>$`"):
        return None  # shell syntax somewhere, even inside an argument: leave it to the shell
    return words[3:], variables


def test_commands_split_a_block_as_bash_does_and_pick_what_runs_in_process():
    block = "\n".join([
        "python -m ultimate_trainer --help   # every flag",
        "python -m ultimate_trainer --model-preset nano --max-steps 2 \\",
        "    --output-dir runs/x",
        "",
        "python -c \"",
        "print(1)",
        "\"",
        "cat > r.yaml <<'EOF'",
        "model: {d_model: 64}",
        "EOF",
        "XLA_FLAGS=--x python -m ultimate_trainer --dry-run",
        "WANDB_MODE=offline python -m ultimate_trainer --dry-run",
        "python -m ultimate_trainer --dry-run --json > plan.json",
        "python -m ultimate_trainer --backend torch --dry-run",
        "python -m ultimate_trainer --backend jax --prompt 'a b' --dry-run || echo refused",
    ])
    found = commands(block)
    assert len(found) == 9 and found[2] == 'python -c "\nprint(1)\n"' and found[3].endswith("EOF")
    assert [in_process_args(c, "jax") for c in found] == [
        (["--help"], {}), (["--model-preset", "nano", "--max-steps", "2", "--output-dir", "runs/x"], {}),
        None, None, None, (["--dry-run"], {"WANDB_MODE": "offline"}), None, None, None,
    ]


def test_every_skip_marker_has_a_reason_and_a_block():
    for path in GUIDES:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not (line.strip().startswith("<!--") and MARKER in line):
                continue  # prose may name the marker; only a comment line is one
            assert SKIP.match(line.strip()), f"{path.name}:{number}: write `<!-- docs-test: skip (REASON) -->`"
            following = next((l for l in lines[number:] if l.strip()), "")
            assert following.startswith("```bash"), f"{path.name}:{number}: the marker must precede a ```bash block"
    assert sum(len(bash_blocks(p)) for p in GUIDES) > 40  # the parser still finds the blocks


def _copy_repo(destination):
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, destination / name)


@pytest.mark.slow
@pytest.mark.parametrize("guide", [p.name for p in GUIDES])
def test_guide_commands_run_as_written(guide, tmp_path):
    path = REPO / ("README.md" if guide == "README.md" else f"docs/{guide}")
    runnable = [(line, code) for line, code, reason in bash_blocks(path) if reason is None]
    if not runnable:
        pytest.skip(f"{guide} has no runnable commands")
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repo(work)
    env = dict(
        os.environ,
        # `python` and `ultimate-trainer` are this interpreter's; the package imported is the copy's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=str(work),
        HF_HUB_OFFLINE="1",  # a block that needs the Hub must be marked skip
        MPLBACKEND="Agg",
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path),
        HOME=str(tmp_path / "home"),
        KERAS_BACKEND=os.environ.get("KERAS_BACKEND", "jax"),
    )
    from ultimate_trainer.training import mfu

    peaks = mfu.peak_cache_path()
    if peaks.exists() and "XDG_CACHE_HOME" not in os.environ:  # the CPU peak is measured once per machine
        (tmp_path / "home" / ".cache" / "ultimate_trainer").mkdir(parents=True)
        shutil.copy(peaks, tmp_path / "home" / ".cache" / "ultimate_trainer" / peaks.name)
    timings = []
    for line, code in runnable:
        start = time.perf_counter()
        for command in commands(code):
            result = _run(command, work, env)
            assert result.returncode == 0, (
                f"{guide}:{line} exited {result.returncode}:\n{command}\n--- stdout\n{result.stdout[-3000:]}"
                f"\n--- stderr\n{result.stderr[-3000:]}"
            )
        timings.append(f"{guide}:{line} {time.perf_counter() - start:.0f}s")
    print("\n".join(timings))


def _run(command, work, env):
    found = in_process_args(command, env["KERAS_BACKEND"])
    if found is None:
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=work, env=env,
                              capture_output=True, text=True, timeout=900)
    args, variables = found
    with contextlib.chdir(work):
        return run_main(args, env={**{name: env[name] for name in IN_PROCESS_ENV}, **variables})
