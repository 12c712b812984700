"""Where a run's metric records go: metrics.jsonl, TensorBoard, Weights & Biases;
the loss-curve PNG drawn from metrics.jsonl at the end; and the run's summary
(training_summary.json and its closing line).

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
SUMMARY_FILE = "training_summary.json"
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


class RunSummary:
    """The closing record of a finished run: what training_summary.json holds
    and the `done:` line.

    `plan` is the run's `training.plan.Plan`; `start_step` the step it began
    at (`resumed`: from a checkpoint); `logger` a `callbacks.MetricsLogger`
    (its `train_seconds`, `history` and MFU `peak`).

    Example:
        summary = RunSummary(plan, start_step=0).record(wall, logger, initial, final, evaluator, "out/checkpoint-6")
        RunSummary.write(summary, "out")
    """

    def __init__(self, plan, start_step=0, resumed=False, eval_enabled=True):
        self.plan, self.start_step, self.resumed, self.eval_enabled = plan, start_step, resumed, eval_enabled

    def record(self, wall, logger, initial, final, evaluator, checkpoint):
        """The summary dict; `initial` and `final` are validation records, `evaluator` holds the best."""
        s, plan = self.plan.schedule, self.plan
        trained_tokens = (s.total_steps - self.start_step) * s.tokens_per_step  # in this process
        tokens_per_sec = trained_tokens / max(logger.train_seconds, 1e-9)
        mfu = logger.peak.mfu(plan.flops_per_token * tokens_per_sec)  # may raise a peak that was too low
        return {
            "steps": s.total_steps,
            "resumed_from_step": self.start_step if self.resumed else None,
            "tokens": s.total_steps * s.tokens_per_step,
            "wall_seconds": wall,
            "train_seconds": logger.train_seconds,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu,
            "peak_flops": logger.peak.peak if plan.peak_flops is not None else None,
            "initial_val_loss": initial["val_loss"],
            "final_val_loss": final["val_loss"],
            "final_val_perplexity": final["val_perplexity"],
            "final_train_loss": logger.history[-1]["loss"] if logger.history else None,
            "val_loss_reduction": 1 - final["val_loss"] / initial["val_loss"] if self.eval_enabled else None,
            "best_val_loss": evaluator.best_val_loss,
            "best_step": evaluator.best_step,
            "checkpoint": str(checkpoint),
            "parameters": plan.to_json()["parameters"],
            "architecture": plan.architecture,
            "backend": plan.devices.to_json() if plan.devices is not None else None,
            "distribution": plan.distribution,
        }

    @staticmethod
    def write(summary, output_dir):
        path = Path(output_dir) / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return path

    @staticmethod
    def line(summary):
        """`done: N steps in T, R tok/s; val_loss A -> B (P% lower); checkpoint C`."""
        validation = "no validation (--no-eval); " if summary["val_loss_reduction"] is None else (
            f"val_loss {summary['initial_val_loss']:.4f} -> {summary['final_val_loss']:.4f} "
            f"({100 * summary['val_loss_reduction']:.0f}% lower); ")
        return (f"done: {summary['steps']:,} steps in {format_seconds(summary['wall_seconds'])}, "
                f"{summary['tokens_per_sec']:,.0f} tok/s; {validation}checkpoint {summary['checkpoint']}")


def format_seconds(seconds):
    """`42s`, `3m07s` or `2h05m`.

    Example:
        >>> format_seconds(187)
        '3m07s'
    """
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


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
    """(train records, validation records) of a metrics.jsonl; other records (a mixture's shares) are left out."""
    train, val = [], []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            if "val_loss" in record:
                val.append(record)
            elif "loss" in record:
                train.append(record)
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
