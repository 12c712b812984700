"""A bounded validation set: the first K records (or T tokens) of a source, read once and kept.

A streamed source's validation split may be as large as its training split
(C4's holds 365k documents), and evaluating on all of it at every interval
would cost more than training. The set is the first records in the source's
own order (no shuffle, one reader for every process), so every evaluation,
every process and every resume sees the same records.

Example:
    val = read_validation(open_stream("./c4_copy", split="validation", shuffle=False, epochs=1),
                          max_examples=1000)
    print(val.describe())   # 'the first 1,000 records of ... (2,345,678 characters), read once'
"""

import dataclasses
import itertools

from ultimate_trainer.errors import UserError

# A streamed source's validation set when no bound is given: its first records until they hold this
# many windows of tokens (256 x seq_len: 65k tokens for `nano`, 524k at seq_len 2048). In records it
# would depend on the documents' length: C4's 1,000 first would be 0.5M tokens, a corpus of books'
# 100M, and every evaluation would cost that.
DEFAULT_WINDOWS = 256
# The held-out records --auto-vocab-size measures a streamed run's candidate vocab sizes on.
HELDOUT_EXAMPLES = 1000


def default_tokens(seq_len):
    """The default token bound of a streamed validation set for windows of `seq_len`.

    Example:
        >>> default_tokens(256)
        65536
    """
    return DEFAULT_WINDOWS * seq_len


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """The records of a bounded validation set and how they were bounded.

    Example:
        ValidationSet(("a", "b"), 2, None, "my.jsonl").describe()
    """

    records: tuple
    max_examples: int
    max_tokens: int
    source: str
    tokens: int = None

    def describe(self):
        size = f"{len(self.records):,} records" + (f", {self.tokens:,} tokens" if self.tokens is not None else "")
        bound = " and ".join(b for b in (f"at most {self.max_examples:,} records" if self.max_examples else "",
                                         f"at least {self.max_tokens:,} tokens" if self.max_tokens else "") if b)
        return f"the first {size} of {self.source} ({bound}), read once"


def read_validation(stream, max_examples=None, max_tokens=None, count_tokens=None):
    """Reads the validation set: records of `stream` until `max_examples` records, or until they
    hold `max_tokens` tokens (whole records: the last one may pass the bound; one EOS each).

    `stream` should be opened with `epochs=1` and `shuffle=False` (for files),
    so the set is the source's first records; a source shorter than the bound
    gives all its records. Raises UserError without a bound, or with no text.

    Example:
        read_validation(stream, max_tokens=100_000, count_tokens=tokenizer.count_tokens).tokens
    """
    for name, value in (("--max-val-examples", max_examples), ("--eval-tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name} {value!r}: must be a whole number >= 1")
    if max_examples is None and max_tokens is None:
        raise UserError("a streamed validation source needs a bound; pass --max-val-examples N or --eval-tokens N")
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_tokens needs count_tokens, the tokenizer's counter")
    records, tokens = [], 0
    for text in itertools.islice(stream, max_examples):
        records.append(text)
        if count_tokens is not None:
            tokens += count_tokens(text) + 1
            if max_tokens is not None and tokens >= max_tokens:
                break
    if not records:
        raise UserError(f"{stream.describe()}: the validation data holds no text; check --val-split")
    return ValidationSet(tuple(records), max_examples, max_tokens, stream.describe(),
                         tokens if count_tokens is not None else None)
