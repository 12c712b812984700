"""What a checkpoint directory is called and holds: the names the local store,
the resume logic and the bucket code all read.

Its own module so that `store`, `resume` and `cloud` share it without importing
each other in a circle.

Example:
    checkpoints_in("output_ultimate")   # [.../checkpoint-500, .../checkpoint-1000]
"""

import re
from pathlib import Path

MODEL_FILE = "model.keras"
STATE_FILE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def is_complete(directory):
    """Whether `directory` holds a checkpoint's model and state (written last, by the rename)."""
    directory = Path(directory)
    return (directory / MODEL_FILE).is_file() and (directory / STATE_FILE).is_file()


def checkpoints_in(run_dir):
    """Complete `checkpoint-{step}` dirs of a run, oldest first."""
    run_dir = Path(run_dir)
    found = []
    for path in run_dir.glob("checkpoint-*") if run_dir.is_dir() else []:
        match = CHECKPOINT_NAME.match(path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]
