"""What every record stream shares: iteration, a JSON-able position, and its checks.

A stream yields text records (str) and answers `position()`: a small dict,
JSON-able, naming the next record it would yield. Reopening the same source
with `position=` continues exactly there. The keys every position carries
(`kind`, `seed`, `process_index`, `process_count`, `epoch`) let a resume
refuse, in one line, a position saved by a different setup.

Example:
    stream = FileStream(files, seed=1)
    first = next(iter(stream)); saved = stream.position()
    again = FileStream(files, seed=1, position=saved)   # continues after `first`
"""

from ultimate_trainer.errors import UserError
from ultimate_trainer.data import sources

POSITION_VERSION = 1


class RecordStream:
    """Base of the streams: iterate for records, `position()` for where the next one is.

    The settings every stream takes: `text_column`, `seed`, this process's
    `process_index` of `process_count`, `epochs` (None: endless), `keep`
    (a predicate on the text; refused records still advance the position)
    and `stats` (a `sources.ReadStats` for undecodable bytes).
    """

    kind = "stream"

    def __init__(self, text_column="text", seed=0, process_index=0, process_count=1, epochs=None, keep=None,
                 stats=None):
        check_processes(process_index, process_count)
        self.text_column, self.seed = text_column, int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.epochs, self.keep = epochs, keep
        self.stats = stats if stats is not None else sources.ReadStats()

    def _setup(self):
        """The settings every saved position must agree with (each stream adds its source's shape)."""
        return {"seed": self.seed, "process_index": self.process_index, "process_count": self.process_count}

    def _wanted(self, text):
        """Whether a record is yielded: not blank, and kept by `keep`."""
        return bool(text.strip()) and (self.keep is None or self.keep(text))

    def _no_text(self):
        """The error for an epoch that yielded nothing (an endless stream of nothing would hang a run)."""
        return UserError(f"{self.describe()}: holds no text for this process; check the data and "
                         f"--text-column {self.text_column}")

    def __iter__(self):
        raise NotImplementedError

    def position(self):
        """The JSON-able position of the next record (copy; safe to keep)."""
        raise NotImplementedError

    def describe(self):
        """One line: the source, its order and what this process reads."""
        raise NotImplementedError


def check_processes(process_index, process_count):
    """Raises UserError unless 0 <= process_index < process_count.

    Example:
        check_processes(jax.process_index(), jax.process_count())
    """
    if not (isinstance(process_count, int) and process_count >= 1
            and isinstance(process_index, int) and 0 <= process_index < process_count):
        raise UserError(
            f"process {process_index} of {process_count}: the process index must be in 0..count-1 and the count >= 1"
        )


def check_position(position, kind, **expected):
    """Raises UserError when a saved `position` is not one this stream can continue.

    `expected` are the settings the position must have been saved with (seed,
    process count, the source's shape); a difference names both values.

    Example:
        check_position(saved, "files", seed=0, process_count=4)
    """
    if not isinstance(position, dict) or position.get("kind") != kind:
        found = position.get("kind") if isinstance(position, dict) else type(position).__name__
        raise UserError(f"the saved input position is of kind {found!r}, but this input is {kind!r}; "
                        f"resume with the same data flags")
    if position.get("version") != POSITION_VERSION:
        raise UserError(f"the saved input position has version {position.get('version')!r}; this build reads "
                        f"version {POSITION_VERSION}")
    for key, value in expected.items():
        if position.get(key) != value:
            raise UserError(
                f"the saved input position has {key}={position.get(key)!r}, this run {key}={value!r}; "
                f"resume with the same data, seed and process count"
            )


def stamp(kind, **fields):
    """A position dict with the common keys first.

    Example:
        >>> stamp("tfds", index=7)
        {'kind': 'tfds', 'version': 1, 'index': 7}
    """
    return {"kind": kind, "version": POSITION_VERSION, **fields}
