"""Finding the checkpoint a run resumes from and checking that it fits."""

import json
import re
from pathlib import Path

from ultimate_trainer.checkpoint.store import (
    MODEL_FILE,
    STATE_FILE,
    CorruptCheckpoint,
    read_latest,
    verify_checkpoint,
)
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


def newest_valid(run_dir, what, log=print, preferred=None):
    """The newest checkpoint of `run_dir` that passes verification, trying
    `preferred` (the `latest` pointer's target) first; says which it skipped."""
    candidates = list(reversed(checkpoints_in(run_dir)))
    if preferred is not None:
        candidates = [preferred] + [c for c in candidates if c.resolve() != Path(preferred).resolve()]
    problems = []
    for checkpoint in candidates:
        try:
            verify_checkpoint(checkpoint, what)
        except CorruptCheckpoint as e:
            problems.append(str(e))
            continue
        if problems:
            log(f"{what}: {len(problems)} checkpoint(s) failed verification ({problems[0]}); "
                f"falling back to {checkpoint}, the newest valid one")
        return checkpoint
    if problems:
        raise UserError(f"{what}: {run_dir} holds no valid checkpoint; the newest: {problems[0]}")
    raise UserError(f"{what}: {run_dir} holds no complete checkpoint-<step> directory")


REMOTE_CACHE_DIR = "remote-checkpoints"


def find_checkpoint(resume_from, output_dir, log=print, bucket_for=None):
    """Resolves `--resume-from` (a checkpoint dir, a run dir, or `latest` in
    `--output-dir`) to one verified checkpoint directory.

    `latest` follows the run's `latest` pointer and, when that checkpoint is
    missing or fails verification, falls back to the newest valid one, saying
    so; a run dir resumes from its newest valid checkpoint. A checkpoint
    named outright must verify: it is refused, not replaced. An `s3://`,
    `gs://`, `az://` or Azure `https://` URI is downloaded into
    `<output_dir>/remote-checkpoints/` first (`bucket_for(uri)` builds the
    bucket with the run's endpoint and credentials).

    Example:
        find_checkpoint("latest", "output_ultimate")   # .../checkpoint-1000
    """
    if str(resume_from).startswith(CLOUD_SCHEMES):
        from ultimate_trainer.checkpoint import cloud

        bucket = bucket_for(resume_from) if bucket_for else None
        return cloud.fetch_for_resume(resume_from, Path(output_dir) / REMOTE_CACHE_DIR, bucket, log)
    if resume_from == "latest":
        pointer = read_latest(output_dir)
        if pointer is not None and not is_complete(pointer):
            log(f"--resume-from latest: {Path(output_dir) / 'latest'} names {pointer.name}, which is not a complete "
                f"checkpoint; looking for the newest valid one")
            pointer = None
        return newest_valid(output_dir, "--resume-from latest", log, preferred=pointer)
    path = Path(resume_from)
    if is_complete(path):
        verify_checkpoint(path, "--resume-from")
        return path
    if checkpoints_in(path):
        return newest_valid(path, f"--resume-from {resume_from}", log, preferred=read_latest(path))
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
              ("model", "seq_len"), ("loader", "stride"), ("loader", "shuffle_buffer_size"),
              ("model", "state_passing"))


def check_resumable(cfg, checkpoint, state, inputs, sequences_per_step=None):
    """Refuses a resume whose data stream would not continue the checkpoint's
    (`sequences_per_step`: this run's, over all devices)."""
    saved = json.loads((Path(checkpoint) / "training_args.json").read_text())
    for section, key in _DATA_KEYS:
        ours = getattr(getattr(cfg, section), key)
        theirs = saved[section].get(key, getattr(type(getattr(cfg, section))(), key))  # older runs: the default
        if theirs != ours:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"--resume-from {checkpoint}: it was trained with {flag} {theirs}, this run has {ours}; "
                f"resume with the same value (use --init-from to start a new run from its weights)"
            )
    if sequences_per_step is not None:
        t = saved["training"]
        theirs = state.get("sequences_per_step", t["batch_size"] * t.get("gradient_accumulation_steps", 1))
        if theirs != sequences_per_step:
            raise UserError(
                f"--resume-from {checkpoint}: its steps took {theirs} sequences, this run's take {sequences_per_step} "
                f"(--batch-size per device x data-parallel devices x accumulation); resume on the same number of "
                f"data-parallel devices"
            )
    data = state.get("data", {})
    if data.get("kind") != inputs.kind or data.get("windows_per_epoch") != inputs.windows_per_epoch:
        raise UserError(
            f"--resume-from {checkpoint}: its data ({data.get('kind')}, {data.get('windows_per_epoch')} windows "
            f"per epoch) differs from this run's ({inputs.kind}, {inputs.windows_per_epoch}); resume on the same "
            f"data, or use --init-from to start a new run from its weights"
        )
