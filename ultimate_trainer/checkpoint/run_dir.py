"""The output dir: never clobber a run that is already there."""

import datetime
from pathlib import Path

from ultimate_trainer.errors import UserError

RUN_FILES = ("training_args.json", "metrics.jsonl", "training_summary.json", "samples.txt")
RUN_DIR_PATTERNS = ("checkpoint-*", "milestone-*", "final_model", "best_checkpoint")
PREVIOUS_RUNS = "previous-runs"


def run_entries(output_dir):
    """The files and dirs in `output_dir` that belong to an earlier run."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    entries = [out / name for name in RUN_FILES if (out / name).exists()]
    for pattern in RUN_DIR_PATTERNS:
        entries.extend(sorted(out.glob(pattern)))
    return entries


def prepare_output_dir(output_dir, overwrite, dry_run=False):
    """Refuses an output dir that holds a run unless `overwrite`; then moves
    the old run to `previous-runs/<time>/` (never deletes it). Returns the
    path the old run moved to, or None."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {output_dir} is a file; pass a directory path")
    entries = run_entries(out)
    if not entries:
        if not dry_run:
            out.mkdir(parents=True, exist_ok=True)
        return None
    if not overwrite:
        raise UserError(
            f"--output-dir {output_dir} already holds a run ({entries[0].name}); continue it with "
            f"--resume-from latest, choose another --output-dir, or pass --overwrite to move the old run "
            f"into {out / PREVIOUS_RUNS}/"
        )
    if dry_run:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dest = out / PREVIOUS_RUNS / stamp
    dest.mkdir(parents=True)
    for entry in entries:
        entry.rename(dest / entry.name)
    return dest
