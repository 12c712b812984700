"""Runs the tests as CI does and prints one closing line with the totals.

The whole suite runs on jax (the default backend); the tests marked
`backends` run again on torch and tensorflow, each in its own process since
Keras picks its backend once per process. `--slow` runs the tests marked
`slow` (the end-to-end acceptance runs) on jax instead.

Example:
    python tools/run_tests.py            # default suite
    python tools/run_tests.py --slow     # slow acceptance runs
    python tools/run_tests.py -k sizing  # extra args go to every pytest run
"""

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _counts(junit_path):
    if not junit_path.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}
    root = ET.parse(junit_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return {"passed": tests - failed - skipped, "failed": failed, "skipped": skipped}


def main(argv):
    slow = "--slow" in argv
    extra = [a for a in argv if a != "--slow"]
    if slow:
        runs = [("jax", ["-m", "slow"])]
    else:
        runs = [("jax", []), ("torch", ["-m", "backends and not slow"]), ("tensorflow", ["-m", "backends and not slow"])]
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for backend, marker in runs:
            junit = Path(tmp) / f"{backend}.xml"
            env = dict(os.environ, KERAS_BACKEND=backend)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *marker, *extra]
            print(f"== {backend}: {' '.join(cmd[3:])}", flush=True)
            code = subprocess.call(cmd, cwd=REPO, env=env)
            counts = _counts(junit)
            print(f"== {backend}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped (exit {code})", flush=True)
            # pytest exit 5 means no test ran: that is a failure here, never a pass.
            ok = ok and code == 0
            for key in totals:
                totals[key] += counts[key]
    print(f"total: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
