"""Finding the checkpoint a run resumes from and checking that it fits."""

import json
import re
from pathlib import Path

from ultimate_trainer.checkpoint.store import MODEL_FILE, STATE_FILE
from ultimate_trainer.errors import UserError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
CLOUD_SCHEMES = ("s3://", "gs://", "az://", "https://")


def is_complete(directory):
    directory = Path(directory)
    return (directory / MODEL_FILE).is_file() and (directory / STATE_FILE).is_file()


def checkpoints_in(run_dir):
    """Complete `checkpoint-{step}` dirs of a run, oldest first."""
    run_dir = Path(run_dir)
    found = []
    for path in run_dir.glob("checkpoint-*") if run_dir.is_dir() else []:
        match = _CHECKPOINT.match(path.name)
        if match and is_complete(path):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(resume_from, output_dir):
    """Resolves `--resume-from` (a checkpoint dir, a run dir, or `latest` in
    `--output-dir`) to one checkpoint directory.

    Example:
        find_checkpoint("latest", "output_ultimate")   # .../checkpoint-1000
    """
    if str(resume_from).startswith(CLOUD_SCHEMES):
        raise UserError(
            f"--resume-from {resume_from}: resuming from cloud storage is not available yet: it comes with "
            f"cloud checkpoints (issue #6); download the checkpoint and pass its local directory"
        )
    if resume_from == "latest":
        found = checkpoints_in(output_dir)
        if not found:
            raise UserError(f"--resume-from latest: {output_dir} holds no complete checkpoint-<step> directory")
        return found[-1]
    path = Path(resume_from)
    if is_complete(path):
        return path
    found = checkpoints_in(path)
    if found:
        return found[-1]
    if not path.exists():
        raise UserError(f"--resume-from {resume_from}: no such directory")
    raise UserError(
        f"--resume-from {resume_from}: not a complete checkpoint (needs {MODEL_FILE} and {STATE_FILE}) "
        f"and holds no checkpoint-<step> directory"
    )


def read_state(checkpoint):
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


# Training settings that change what the next batch or step means.
_DATA_KEYS = (("training", "batch_size"), ("training", "gradient_accumulation_steps"), ("training", "seed"),
              ("model", "seq_len"), ("loader", "stride"), ("loader", "shuffle_buffer_size"))


def check_resumable(cfg, checkpoint, state, inputs):
    """Refuses a resume whose data stream would not continue the checkpoint's."""
    saved = json.loads((Path(checkpoint) / "training_args.json").read_text())
    for section, key in _DATA_KEYS:
        theirs, ours = saved[section][key], getattr(getattr(cfg, section), key)
        if theirs != ours:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"--resume-from {checkpoint}: it was trained with {flag} {theirs}, this run has {ours}; "
                f"resume with the same value (use --init-from to start a new run from its weights)"
            )
    data = state.get("data", {})
    if data.get("kind") != inputs.kind or data.get("windows_per_epoch") != inputs.windows_per_epoch:
        raise UserError(
            f"--resume-from {checkpoint}: its data ({data.get('kind')}, {data.get('windows_per_epoch')} windows "
            f"per epoch) differs from this run's ({inputs.kind}, {inputs.windows_per_epoch}); resume on the same "
            f"data, or use --init-from to start a new run from its weights"
        )
