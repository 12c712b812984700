"""A prepared TFDS dataset (`tfds:NAME[/CONFIG][:VERSION]`), read through tf.data, resumable by index.

TFDS knows each split's example count from its metadata, so a position is
one number: the index of the next example. A resume reads the split slice
`SPLIT[index:end]`, which TFDS turns into file instructions: the files
before the one holding `index` are not opened, and inside that file TFRecord
skips the earlier examples (array_record seeks). TFDS shuffles examples when
it prepares a dataset, so the order read is already mixed; this stream adds
no shuffle.

Several processes: process p of P reads the contiguous slice
[N * p // P, N * (p + 1) // P) of the N examples (`tfds.even_splits` does the
same), disjoint, together the whole split.

Example:
    stream = TfdsStream("c4/en:3.1.0", data_dir="gs://my-bucket/tfds", split="train")
    text = next(iter(stream)); stream.position()["index"]   # 1
"""

from ultimate_trainer.data import sources
from ultimate_trainer.data.streaming.base import RecordStream, check_position, stamp
from ultimate_trainer.errors import UserError


def load_builder(name, data_dir=None):
    """The TFDS builder of a prepared dataset, or a one-line UserError saying how to prepare it.

    Example:
        load_builder("c4/en:3.1.0", "/data/tfds").info.splits["train"].num_examples
    """
    import tensorflow_datasets as tfds  # heavy: seconds to import; only tfds: ids need it

    where = f"--dataset-id tfds:{name}" + (f" --tfds-data-dir {data_dir}" if data_dir else "")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends, bad names and versions
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{where}: {detail}") from None
    if not builder.is_prepared():
        raise UserError(f"{where}: the dataset is not prepared in {builder.data_dir}; prepare it first "
                        f"(tfds build {name} --data_dir DIR) and pass --tfds-data-dir DIR")
    return builder


class TfdsStream(RecordStream):
    """One split of a prepared TFDS dataset, a text feature per record.

    Example:
        stream = TfdsStream("my_text/en", data_dir="/data/tfds", split="train", epochs=1)
        texts = list(stream)
    """

    kind = "tfds"

    def __init__(self, name, data_dir=None, split="train", text_column="text", seed=0, process_index=0,
                 process_count=1, epochs=None, position=None, keep=None, stats=None):
        super().__init__(text_column, seed, process_index, process_count, epochs, keep, stats)
        self.name, self.data_dir, self.split = name, None if data_dir is None else str(data_dir), split
        self.builder = load_builder(name, self.data_dir)
        splits = self.builder.info.splits
        if split not in splits:
            raise UserError(f"--dataset-id tfds:{name}: no split {split!r}; the splits are "
                            f"{', '.join(sorted(splits.keys()))}")
        features = self.builder.info.features
        if text_column not in features.keys():
            raise sources._missing_column(f"--dataset-id tfds:{name}", text_column, features.keys())
        self.num_examples = splits[split].num_examples
        n, p, count = self.num_examples, process_index, process_count
        self.begin, self.end = n * p // count, n * (p + 1) // count
        self._epoch, self._index = 0, self.begin
        if position is not None:
            check_position(position, self.kind, **self._identity())
            self._epoch, self._index = position["epoch"], position["index"]

    def _identity(self):
        return {"dataset": self.name, "split": self.split, "examples": self.num_examples, **self._setup()}

    def position(self):
        return stamp(self.kind, **self._identity(), epoch=self._epoch, index=self._index)

    def slice(self):
        """The TFDS split string a read from the current position uses (`train[index:end]`)."""
        return f"{self.split}[{self._index}:{self.end}]"

    def __iter__(self):
        column, where = self.text_column, f"tfds:{self.name} split {self.split!r}"
        while self.epochs is None or self._epoch < self.epochs:
            whole_epoch, kept = self._index == self.begin, 0
            if self._index < self.end:
                ds = self.builder.as_dataset(split=self.slice(), shuffle_files=False)
                for value in ds.map(lambda example: example[column]).as_numpy_iterator():
                    self._index += 1
                    text = sources._text_of(value, column, where, self.stats)
                    if self._wanted(text):
                        kept += 1
                        yield text
            if whole_epoch and not kept:
                raise self._no_text()
            self._epoch, self._index = self._epoch + 1, self.begin

    def describe(self):
        text = f"tfds:{self.name} split {self.split} ({self.num_examples:,} examples, in TFDS's prepared order)"
        if self.process_count > 1:
            text += (f"; process {self.process_index} of {self.process_count} reads examples "
                     f"{self.begin:,}..{self.end - 1:,}")
        return text
