"""Every guide's commands run as written, so the docs cannot rot.

Each ```bash block of docs/*.md and README.md runs, in order, with bash -e
(a block may hold several commands that depend on each other), in a fresh
copy of the repository made per guide: the user's runs/ and outputs are never
touched. A block preceded by the line `<!-- docs-test: skip (REASON) -->` is
not run; REASON must say why (network, GPU/TPU, several hosts, a cloud
bucket, an install, a server that does not exit, a minutes-long benchmark).

The runs take minutes, so the test that executes them is marked `slow`; the
check that the skip markers are well formed runs with the default suite.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDES = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
# What a guide's commands may use from the repository (no outputs, caches or VCS data).
COPIED = ("ultimate_trainer", "tools", "configs", "docs", "README.md", "setup.cfg", "pyproject.toml")
MARKER = "docs-test"
SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>.*\S.*)\) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


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
    )
    from ultimate_trainer.training import mfu

    peaks = mfu.peak_cache_path()
    if peaks.exists() and "XDG_CACHE_HOME" not in os.environ:  # the CPU peak is measured once per machine
        (tmp_path / "home" / ".cache" / "ultimate_trainer").mkdir(parents=True)
        shutil.copy(peaks, tmp_path / "home" / ".cache" / "ultimate_trainer" / peaks.name)
    timings = []
    for line, code in runnable:
        start = time.perf_counter()
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=work, env=env,
                                capture_output=True, text=True, timeout=900)
        timings.append(f"{guide}:{line} {time.perf_counter() - start:.0f}s")
        assert result.returncode == 0, (
            f"{guide}:{line} exited {result.returncode}:\n{code}\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-3000:]}"
        )
    print("\n".join(timings))
