"""A Hugging Face dataset streamed by `datasets`, resumable through its state_dict.

`datasets.load_dataset(..., streaming=True)` reads lazily, and its
`IterableDataset.state_dict()` / `load_state_dict()` record and restore the
shard and the example inside it. The saved position holds that state dict
(JSON-able) plus the epoch. A resume opens the saved shard and skips inside
it: `datasets` reads the shard's earlier row groups (or lines) again to skip
them, but no earlier shard (measured in docs/data.md). For local parquet and
jsonl copies, `files.FileStream` seeks straight to the row group or byte
instead, so `open_stream` uses it there.

Several processes: `datasets.distributed.split_dataset_by_node` gives each
process whole shards when the shard count divides by the process count,
else every P-th example. Order: the dataset's own (no shuffle here, since
`datasets`' shuffle buffer is not restored by `load_state_dict`); the
tokenizing pipeline's shuffle mixes windows downstream.

Example:
    stream = HubStream("allenai/c4", "en", split="train", process_index=0, process_count=8)
    text = next(iter(stream)); saved = stream.position()
"""

import copy
from pathlib import Path

from ultimate_trainer.data import sources
from ultimate_trainer.data.streaming.base import RecordStream, check_position, stamp
from ultimate_trainer.errors import UserError


def load_streaming(dataset_id, config=None, split="train"):
    """`datasets.load_dataset(..., streaming=True)` with its errors as one-line UserErrors.

    Example:
        load_streaming("allenai/c4", "en", "validation").num_shards
    """
    local = Path(dataset_id).expanduser()
    if not local.exists():
        sources._require_hub(dataset_id)
    try:
        import datasets  # heavy: seconds to import, and only hub ids and other-format directories need it
    except ImportError:
        raise UserError(f"--dataset-id needs the datasets library; pip install '{sources.DATASETS_PIN}'") from None
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(str(local) if local.exists() else dataset_id, config, split=split, streaming=True)
    except Exception as e:  # the library's many error types (missing dataset, bad split or config, I/O)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"--dataset-id {dataset_id}" + (f" --dataset-config {config}" if config else "")
        raise UserError(f"{where} split {split!r}: {detail}") from None


class HubStream(RecordStream):
    """One split of a `datasets` dataset (hub id or local directory), streamed and resumable.

    Example:
        stream = HubStream("./my_dataset", split="train", epochs=1)
        texts = list(stream)
    """

    kind = "hub"

    def __init__(self, dataset_id, config=None, split="train", text_column="text", seed=0, process_index=0,
                 process_count=1, epochs=None, position=None, keep=None, stats=None):
        super().__init__(text_column, seed, process_index, process_count, epochs, keep, stats)
        self.dataset_id, self.config, self.split = str(dataset_id), config, split
        self._dataset = load_streaming(self.dataset_id, config, split)
        if process_count > 1:
            from datasets.distributed import split_dataset_by_node  # heavy: as `datasets` above

            self._dataset = split_dataset_by_node(self._dataset, rank=process_index, world_size=process_count)
        self._start = self._dataset.state_dict()
        self._epoch, self._state = 0, None
        if position is not None:
            check_position(position, self.kind, **self._identity())
            self._epoch, self._state = position["epoch"], position["state"]

    def _identity(self):
        return {"dataset": self.dataset_id, "config": self.config, "split": self.split, **self._setup()}

    def position(self):
        return stamp(self.kind, **self._identity(), epoch=self._epoch, state=copy.deepcopy(self._state))

    def __iter__(self):
        where = f"--dataset-id {self.dataset_id} split {self.split!r}"
        while self.epochs is None or self._epoch < self.epochs:
            whole_epoch, kept = self._state is None, 0
            # A state dict is where iteration starts: the saved one, or the start
            # (load_state_dict sticks, so a new epoch must load the start again).
            self._dataset.load_state_dict(copy.deepcopy(self._state or self._start))
            for number, item in enumerate(self._dataset, 1):
                self._state = self._dataset.state_dict()
                text = sources._text_of(item, self.text_column, f"{where} record {number}", self.stats)
                if self._wanted(text):
                    kept += 1
                    yield text
            if whole_epoch and not kept:
                raise self._no_text()
            self._epoch, self._state = self._epoch + 1, None

    def split_sizes(self):
        """The dataset's split metadata (`datasets.SplitDict`: num_examples, num_bytes), or None."""
        return self._dataset.info.splits

    def describe(self):
        text = self.dataset_id + (f" ({self.config})" if self.config else "") + f" split {self.split}"
        text += f", streamed by datasets ({self._dataset.num_shards} shards, in the dataset's order)"
        if self.process_count > 1:
            text += f"; process {self.process_index} of {self.process_count} (split_dataset_by_node)"
        return text
