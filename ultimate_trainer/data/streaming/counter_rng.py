"""Counter-based randomness: a number is a pure function of (seed, counter...).

A stream's position must stay O(1) and survive a restart on another machine
or numpy version, so nothing here keeps generator state: draw k of a
mixture, or the shard order of epoch e, is recomputed from its key alone.
BLAKE2b (hashlib) is the counter function: stable across platforms and
releases, unlike numpy's Generator methods, whose streams may change.

Example:
    >>> uniform(0, "mix", 7) == uniform(0, "mix", 7)
    True
    >>> sorted(permutation(5, 0, "shards", 1))
    [0, 1, 2, 3, 4]
"""

import hashlib


def _key(parts):
    return hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()


def uniform(*key):
    """A float in [0, 1) determined by `key` (any reprs: ints, strings).

    Example:
        >>> 0 <= uniform(3, "mixture", 10) < 1
        True
    """
    return int.from_bytes(_key(key), "big") / 2**64


def permutation(n, *key):
    """A permutation of range(n) determined by `key`: indices sorted by their hash.

    O(n log n) in the number of items (files, not records), computed afresh
    each epoch, so no order is ever stored.

    Example:
        >>> permutation(4, 0, "shards", 0) == permutation(4, 0, "shards", 0)
        True
    """
    return sorted(range(n), key=lambda i: _key((*key, i)))
