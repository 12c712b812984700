"""Runs the tests as CI does and prints one closing line with the totals.

The whole suite runs on jax (the default backend); the tests marked
`backends` run again on torch and tensorflow, each in its own process since
Keras picks its backend once per process. `--slow` runs the tests marked
`slow` (the end-to-end acceptance runs) on jax instead.

CI has 2 cores, so the jax run uses two pytest-xdist workers, and the torch
and tensorflow runs go alongside it, one process each: most tests wait on a
compile or a CLI subprocess, and the backend runs fill those gaps. Their
output is held back and printed, whole, once the jax run ends.
`--dist loadgroup` keeps the tests of one `xdist_group` mark on one worker,
for the ones that share a module-scoped fixture (a training run, emulators).
Every jax process of the run (tests, CLI subprocesses, the docs' commands)
shares one persistent compilation cache, in a directory that lives as long
as the run: the same programs (a nano model's train step, say) are compiled
once, not in each process.

Example:
    python tools/run_tests.py            # default suite
    python tools/run_tests.py --slow     # slow acceptance runs
    python tools/run_tests.py -k sizing  # extra args go to every pytest run
    python tools/run_tests.py -n 4       # more workers for the jax run
"""

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKERS = ["-n", "2", "--dist", "loadgroup"]


def _counts(junit_path):
    if not junit_path.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    root = ET.parse(junit_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": tests - failed - skipped, "failed": failed, "skipped": skipped}


def _jax_cache(directory):
    """The environment that gives jax a persistent compilation cache in `directory`:
    every program, however quick to compile, and with a size limit, which is what
    turns on jax's file lock for processes that read and write it together."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30)}


def _start(backend, args, junit, env, log=None):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    print(f"== {backend}: {' '.join(cmd[3:])}" + (" (output below when the jax run ends)" if log else ""), flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=dict(env, KERAS_BACKEND=backend), stdout=log,
                            stderr=subprocess.STDOUT if log else None)


def main(argv):
    slow = "--slow" in argv
    extra = [a for a in argv if a != "--slow"]
    workers = [] if any(a.startswith(("-n", "--numprocesses")) for a in extra) else WORKERS
    if slow:
        jax, others = ["-m", "slow"], []
    else:
        jax, others = [], [(b, ["-m", "backends and not slow"]) for b in ("torch", "tensorflow")]
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**_jax_cache(tmp / "jax-cache"), **os.environ}  # a cache set by the caller wins
        # The backend runs start first, so that their imports overlap the jax run's collection.
        running = []
        for backend, marker in others:
            log = open(tmp / f"{backend}.log", "w+")
            running.append((backend, _start(backend, [*marker, *extra], tmp / f"{backend}.xml", env, log), log))
        running.insert(0, ("jax", _start("jax", [*workers, *jax, *extra], tmp / "jax.xml", env), None))
        for backend, process, log in running:
            code = process.wait()
            if log is not None:
                log.seek(0)
                print(f"== {backend} output:\n{log.read()}", end="", flush=True)
                log.close()
            counts = _counts(tmp / f"{backend}.xml")
            print(f"== {backend}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                  f"(exit {code})", flush=True)
            # pytest exit 5 means no test ran: that is a failure here, never a pass.
            ok = ok and code == 0
            for key in totals:
                totals[key] += counts[key]
    print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
