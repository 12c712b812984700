"""Checkpoints on local disk: written whole into a temporary dir, then renamed.

A checkpoint is a directory `checkpoint-{step}/` with `model.keras` (config,
weights and optimizer state), the tokenizer, the run's `training_args.json`,
`trainer_state.json` and `manifest.json` (every other file's size and
SHA-256). The files are fsynced, the directory renamed into place, and only
then does the run's `latest` pointer move to it, so a crash at any moment
leaves the previous checkpoint and `latest` intact. Loading verifies the
manifest.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from ultimate_trainer import config as config_lib
from ultimate_trainer.checkpoint.layout import (  # noqa: F401  the names are read from here too
    LATEST_FILE,
    MANIFEST_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    checkpoints_in,
)
from ultimate_trainer.errors import UserError

# CausalLM config keys that may differ between a checkpoint and the model
# that loads its weights: they change no weight's shape or meaning.
# state_passing_rows only sizes carried TTT states (variables, not weights), and stream_windows only
# says when they restart; see `load_model_weights`.
FREE_KEYS = {"name", "trainable", "dtype", "dropout_rate", "flash_attention", "state_passing_rows", "stream_windows"}


def _fsync_tree(directory):
    for path in Path(directory).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(directory):
    """Makes a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path, chunk=1 << 22):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory, step=None):
    """Records every file of a checkpoint dir (sizes and SHA-256) in manifest.json."""
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    manifest = {"format": 1, "step": step, "written_at": time.time(), "files": files}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class CorruptCheckpoint(UserError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


def verify_checkpoint(directory, flag="--resume-from"):
    """Checks every file of a checkpoint against its manifest; raises `CorruptCheckpoint`
    naming the first file that is missing, truncated or altered.

    Example:
        verify_checkpoint("out/checkpoint-100")   # returns the manifest, or raises
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CorruptCheckpoint(
            f"{flag} {directory}: no {MANIFEST_FILE}, so it cannot be verified (a partial copy, or not a checkpoint)"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpoint(f"{flag} {directory}: {MANIFEST_FILE} is damaged (not the JSON this tool writes)") from None
    for name, size, digest in entries:
        target = directory / name
        if not target.is_file():
            raise CorruptCheckpoint(f"{flag} {directory}: {name} is missing (the manifest lists it)")
        if target.stat().st_size != size:
            raise CorruptCheckpoint(
                f"{flag} {directory}: {name} has {target.stat().st_size:,} bytes, the manifest says {size:,} "
                f"(truncated or partly copied)"
            )
        if file_digest(target) != digest:
            raise CorruptCheckpoint(f"{flag} {directory}: {name} does not match its SHA-256 in the manifest (altered or damaged)")
    return manifest


def set_latest(output_dir, name):
    """Points `output_dir/latest` at checkpoint `name`, atomically (write, fsync, rename)."""
    output_dir = Path(output_dir)
    tmp = output_dir / f".{LATEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output_dir / LATEST_FILE)
    _fsync_dir(output_dir)


def read_latest(output_dir):
    """The checkpoint dir `output_dir/latest` names, or None when there is no pointer."""
    path = Path(output_dir) / LATEST_FILE
    if not path.is_file():
        return None
    name = path.read_text().strip()
    return Path(output_dir) / name if name and "/" not in name else None


def link_copy(source, destination):
    """Copies a checkpoint dir as hard links (no second copy of the weights on disk), atomically."""
    source, destination = Path(source), Path(destination)
    tmp = destination.with_name(f".{destination.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, copy_function=os.link)
    if destination.exists():
        old = destination.with_name(f".{destination.name}.replaced-{os.getpid()}")
        destination.rename(old)
        os.replace(tmp, destination)
        shutil.rmtree(old)
    else:
        os.replace(tmp, destination)
    return destination


def prune_checkpoints(output_dir, keep, protect=()):
    """Deletes the oldest complete `checkpoint-<step>` dirs beyond the newest `keep`.

    Only this run's regular checkpoints are candidates: milestones,
    `best_checkpoint/`, `final_model/` and the paths in `protect` are never
    touched. Returns the deleted paths.
    """
    protected = {Path(p).resolve() for p in protect}
    candidates = [p for p in checkpoints_in(output_dir) if p.resolve() not in protected]
    doomed = candidates[: max(0, len(candidates) - keep)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def architecture(model):
    """The part of a model's config that fixes its weights."""
    return {k: v for k, v in model.get_config().items() if k not in FREE_KEYS}


def save_checkpoint(model, tokenizer, cfg, output_dir, name, state, write_extra=None, replace=False, latest=False):
    """Writes `output_dir/name/` atomically and returns its path.

    With `latest`, `output_dir/latest` then points at it (regular
    checkpoints: the ones `--resume-from latest` continues).
    `write_extra(tmp_dir)` may add files before the rename (LoRA adapters).
    An existing `name/` is moved aside, never overwritten in place; with
    `replace` (the run's own `best_checkpoint/`) the superseded copy is then
    deleted.

    Example:
        save_checkpoint(model, tokenizer, cfg, "out", "checkpoint-100", {"step": 100})
    """
    output_dir = Path(output_dir)
    final = output_dir / name
    tmp = output_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from an earlier failed save in this process
    tmp.mkdir(parents=True)
    model.save(tmp / MODEL_FILE)
    tokenizer.save(tmp)
    config_lib.write_json(cfg, tmp / "training_args.json")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(architecture(model), indent=2) + "\n")
    if write_extra is not None:
        write_extra(tmp)
    write_manifest(tmp, state.get("step"))
    _fsync_tree(tmp)
    old = None
    if final.exists():
        # Never overwrite a checkpoint in place: keep the older one beside it.
        old = output_dir / f".{name}.replaced-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    os.replace(tmp, final)
    _fsync_dir(output_dir)
    if replace and old is not None:
        shutil.rmtree(old)
    if latest:
        set_latest(output_dir, name)
    return final


def check_architecture(model, checkpoint_dir, flag="--init-from"):
    """Refuses a checkpoint whose architecture differs from `model`'s, naming the field.

    A RoPE model may change `seq_len` (its weights do not depend on it).
    """
    directory = Path(checkpoint_dir)
    if not (directory / MODEL_FILE).is_file() or not (directory / MODEL_CONFIG_FILE).is_file():
        raise UserError(f"{flag} {checkpoint_dir}: not a checkpoint (needs {MODEL_FILE} and {MODEL_CONFIG_FILE})")
    theirs = json.loads((directory / MODEL_CONFIG_FILE).read_text())
    ours = architecture(model)
    for key in sorted(set(theirs) | set(ours)):
        if key == "seq_len" and ours.get("use_rope"):
            continue
        if theirs.get(key) != ours.get(key):
            raise UserError(
                f"{flag} {checkpoint_dir}: the checkpoint has {key}={theirs.get(key)!r} but this run "
                f"builds {key}={ours.get(key)!r}; match the flag to the checkpoint"
            )


def init_from(model, checkpoint_dir):
    """Loads a checkpoint's weights (not its optimizer) into `model`; the architectures must match."""
    check_architecture(model, checkpoint_dir)
    verify_checkpoint(checkpoint_dir, "--init-from")
    load_model_weights(model, checkpoint_dir)


def load_model_weights(model, checkpoint_dir):
    """`model.load_weights` of a checkpoint, also across TTT state passing on/off
    (or another batch): the carried states are then left at their start."""
    directory = Path(checkpoint_dir)
    args = json.loads((directory / "training_args.json").read_text())
    rows = args["training"]["batch_size"] if args["model"].get("state_passing") else None
    if rows == model.state_passing_rows:
        model.load_weights(directory / MODEL_FILE)
        return
    from ultimate_trainer.models.causal_lm import CausalLM  # heavy: the model imports keras; resume reads this module first

    donor = CausalLM.from_config(dict(model.get_config(), state_passing_rows=rows))
    donor.build((None, model.seq_len))
    donor.load_weights(directory / MODEL_FILE)

    def learned(m):
        carried = {id(v) for vs in m.carried for v in vs}
        return [v for v in m.weights if id(v) not in carried and not v.path.endswith("stream_step")]

    for mine, value in zip(learned(model), learned(donor), strict=True):
        mine.assign(value)


def rng_state(model):
    """Dropout RNG states (Keras seed generators), in the model's variable order.

    They are not weights, so `model.save` leaves them out; an exact resume
    needs them.
    """
    import keras  # heavy: resume and the config read this module before the backend is chosen

    return [keras.ops.convert_to_numpy(v).tolist() for v in model.variables if "seed_generator_state" in v.path]


def set_rng_state(model, values):
    if not values:
        return
    states = [v for v in model.variables if "seed_generator_state" in v.path]
    for variable, value in zip(states, values):
        variable.assign(value)


def load_model(checkpoint_dir):
    """Loads a trained model and its tokenizer from a checkpoint directory.

    Example:
        from ultimate_trainer import load_model
        model, tokenizer = load_model("output_ultimate/checkpoint-170")
        logits = model(np.array([tokenizer.encode("def ")]))
    """
    # heavy: keras, tensorflow and the model load only when a model is loaded
    import keras

    # heavy: tensorflow and keras; importing causal_lm registers the model classes
    from ultimate_trainer.data.tokenizers import load_tokenizer
    from ultimate_trainer.models import causal_lm  # noqa: F401

    path = Path(checkpoint_dir) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{checkpoint_dir} holds no {MODEL_FILE}; point at a checkpoint-<step> directory")
    verify_checkpoint(checkpoint_dir, "checkpoint")
    return keras.models.load_model(path, compile=False), load_tokenizer(checkpoint_dir)
