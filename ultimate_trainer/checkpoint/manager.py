"""The checkpoints a run writes while it trains: regular `checkpoint-{step}/`
ones (with the `latest` pointer and --save-total-limit), milestones,
`best_checkpoint/` and `final_model/`, each handed to the cloud uploader.

The manager decides names, retention and uploads; writing one directory is
`store.save_checkpoint`'s job, reached through the `write` callable, so the
manager is tested with a fake writer and a tmp dir.
"""

import contextlib
import dataclasses
import os
from pathlib import Path

from ultimate_trainer.checkpoint.store import link_copy, prune_checkpoints, set_latest

BEST_DIR = "best_checkpoint"
FINAL_DIR = "final_model"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how many: `output_dir`, `keep` (--save-total-limit, 0: every
    checkpoint stays), `milestone_every` (0: none), `chief` (this process
    writes; the others only take part in gathering the weights) and `protect`
    (checkpoints retention never removes: the one this run resumed from).

    Example:
        CheckpointConfig.from_output(cfg.output, Path("out"), chief=True, resume=None).keep
    """

    output_dir: Path
    keep: int = 0
    milestone_every: int = 0
    chief: bool = True
    protect: tuple = ()

    @classmethod
    def from_output(cls, output_cfg, output_dir, chief=True, resume=None):
        """From the run's `OutputConfig`."""
        return cls(Path(output_dir), output_cfg.save_total_limit or 0, output_cfg.milestone_every or 0, chief,
                   (resume,) if resume else ())


class CheckpointManager:
    """Saves, keeps and uploads a run's checkpoints.

    `write(name, state, replace=False, latest=False)` writes `output_dir/name/`
    and returns its path; `state(step)` is the trainer state saved with step
    `step`; `gather()` is the context in which every process takes part in
    saving (weights split across processes are gathered); `uploader` is a
    `cloud.Uploader` or None.

    Example:
        manager = CheckpointManager(CheckpointConfig(Path("out"), keep=2), write, state)
        manager.save(100)   # out/checkpoint-100, older ones beyond the newest 2 removed
        manager.final(manager.save(200))   # out/final_model
    """

    def __init__(self, config, write, state, say=print, uploader=None, gather=contextlib.nullcontext):
        self.config = config
        self.write, self.state, self.say = write, state, say
        self.uploader, self.gather = uploader, gather
        self.saved = {}  # step -> path of the regular checkpoints this run saved (and still has)
        self.best_step = None  # the step best_checkpoint/ holds, when this run saved it

    def save(self, step):
        """A regular checkpoint at `step` (once per step), then the oldest beyond --save-total-limit go."""
        if step in self.saved:
            return self.saved[step]
        path = self.config.output_dir / f"checkpoint-{step}"
        if self.best_step == step:
            # Validation has just saved this very step as the best (evaluation runs before the save
            # at a step), with the same state: link its files rather than write the weights twice.
            # Every process takes this branch (none gathers), whatever its own disk holds.
            if self.config.chief:
                if path.exists():  # never replaced in place: the older one stays beside it, as a write keeps it
                    path.rename(path.with_name(f".{path.name}.replaced-{os.getpid()}"))
                link_copy(self.config.output_dir / BEST_DIR, path)
                set_latest(self.config.output_dir, path.name)
        else:
            with self.gather():
                if self.config.chief:
                    path = self.write(path.name, self.state(step), latest=True)
        self.saved[step] = path
        if not self.config.chief:
            return path
        self.say(f"saved {path}")
        self._upload(path)
        if self.config.keep:
            self._prune()
        return path

    def milestone(self, step):
        """`milestone-{step}/`: kept forever, never pruned."""
        with self.gather():
            if self.config.chief:
                path = self.write(f"milestone-{step}", self.state(step))
                self.say(f"saved milestone {path}")
                self._upload(path)

    def milestone_due(self, step):
        return bool(self.config.milestone_every) and step % self.config.milestone_every == 0

    def save_best(self, step):
        """`best_checkpoint/`, replacing the previous best."""
        path = self.config.output_dir / BEST_DIR
        with self.gather():
            if self.config.chief:
                self.write(BEST_DIR, self.state(step), replace=True)
                self._upload(path)
        self.best_step = step
        self.say(f"best validation loss so far: saved {path}")

    def final(self, checkpoint):
        """`final_model/`: the last checkpoint's files, linked (chief only)."""
        final_model = link_copy(checkpoint, self.config.output_dir / FINAL_DIR)
        self.say(f"final model: {final_model}")
        self._upload(final_model)
        return final_model

    def last_good(self):
        """The newest regular checkpoint this run saved, or None."""
        return self.saved[max(self.saved)] if self.saved else None

    def _upload(self, path):
        if self.uploader is not None:
            self.uploader.submit(path)

    def _prune(self):
        # A checkpoint not uploaded yet is kept locally until it is.
        keep = list(self.config.protect) + (self.uploader.pending if self.uploader is not None else [])
        for gone in prune_checkpoints(self.config.output_dir, self.config.keep, protect=keep):
            for step in [s for s, p in self.saved.items() if p == gone]:
                del self.saved[step]
            self.say(f"--save-total-limit {self.config.keep}: removed {gone}")
