"""Where a run's metric records go: metrics.jsonl, TensorBoard, Weights & Biases;
and the loss-curve PNG drawn from metrics.jsonl at the end.

Every record is a flat dict with a `step`: training records carry `loss`,
`lr`, `grad_norm`, `tokens_per_sec`, `mfu`; validation records `val_loss`
and `val_perplexity`. metrics.jsonl is the source of truth; TensorBoard and
W&B get the same numbers under `train/...` and `val/...`.
"""

import json
import math
import secrets
from pathlib import Path

from ultimate_trainer.errors import UserError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_CURVE_FILE = "loss_curve.png"
WANDB_ID_FILE = "wandb_run_id"
# Bookkeeping fields that are not curves.
_NOT_SCALARS = {"step", "tokens", "elapsed_sec", "skipped_updates"}


def scalars(record):
    """`{"train/loss": ..., ...}` or `{"val/loss": ...}`: the plottable values of a record."""
    group = "val" if "val_loss" in record else "train"
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{group}/{key[4:] if key.startswith('val_') else key}"] = float(value)
    return out


class MetricsSink:
    """Writes each record to metrics.jsonl and, when asked, TensorBoard and W&B.

    Example:
        sink = MetricsSink("out", tensorboard=True)
        sink.write({"step": 10, "loss": 3.2, "lr": 1e-3})
        sink.close()
    """

    def __init__(self, output_dir, tensorboard=False, wandb_project=None, wandb_run_name=None, config=None,
                 wandb_entity=None):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self._tensorboard = None
        self._wandb = None
        if tensorboard:
            # heavy: tensorflow's summary writer, loaded only with --tensorboard
            import tensorflow as tf

            self._tf = tf
            self._tensorboard = tf.summary.create_file_writer(str(self.output_dir / TENSORBOARD_DIR))
        if wandb_project:
            self._wandb = _start_wandb(self.output_dir, wandb_project, wandb_run_name, config, wandb_entity)

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        values = scalars(record)
        if self._tensorboard is not None:
            with self._tensorboard.as_default():
                for name, value in values.items():
                    self._tf.summary.scalar(name, value, step=record["step"])
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=record["step"])

    def close(self):
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


class NullSink:
    """Where the records of processes other than 0 go in a multi-process run:
    nowhere (process 0 writes metrics.jsonl, TensorBoard and W&B).

    Example:
        NullSink().write({"step": 10, "loss": 3.2})   # no-op
    """

    path = None

    def write(self, record):
        pass

    def close(self):
        pass


def _start_wandb(output_dir, project, run_name, config, entity=None):
    try:
        # optional: wandb, for --wandb-project only
        import wandb
    except ImportError:
        raise UserError("--wandb-project needs the wandb package; pip install wandb (or drop the flag)") from None
    id_file = output_dir / WANDB_ID_FILE
    # One W&B run per output dir: a resumed run continues the same curves.
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    try:
        return wandb.init(project=project, entity=entity, name=run_name or output_dir.resolve().name, id=run_id,
                          resume="allow", dir=str(output_dir), config=config)
    except Exception as e:  # wandb raises its own errors for auth and network; name it and go on
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"--wandb-project {project}: W&B did not start ({detail}); run `wandb login`, or set "
            f"WANDB_MODE=offline to log locally and `wandb sync` later"
        ) from None


def read_metrics(path):
    """(train records, validation records) of a metrics.jsonl."""
    train, val = [], []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            (val if "val_loss" in record else train).append(record)
    return train, val


def plot_loss_curve(metrics_path, png_path, title=None):
    """Draws train and validation loss against steps into `png_path`; returns it,
    or None when there is nothing to draw."""
    train, val = read_metrics(metrics_path)
    if not train and not val:
        return None
    # heavy: matplotlib loads only to draw the end-of-run loss plot
    import matplotlib

    matplotlib.use("Agg")  # no display on a training box
    # heavy: pyplot must load after matplotlib.use("Agg") above
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", linewidth=1.5)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
