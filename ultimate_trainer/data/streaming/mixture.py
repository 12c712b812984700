"""A weighted mixture of record streams, drawn deterministically and resumable exactly.

Draw k picks source i when a counter-based uniform u(seed, k) falls in i's
slice of the cumulative weights: no generator state, so the position is the
draw count plus each source's own position, and a resume continues the very
same sequence of draws. The realized counts ride along in the position (one
number per source), so the proportions report continues across a resume.

The mixture ends when the source a draw picks has ended (a stream opened
with finite `epochs`); endless sources (the default) never end.

Example:
    mix = Mixture([web, code], [0.7, 0.3], seed=0)
    for text in itertools.islice(mix, 10_000):
        ...
    mix.proportions()          # [0.699..., 0.300...]
    saved = mix.position()     # {"kind": "mixture", "draws": 10000, "sources": [...], ...}
"""

import bisect
import math

from ultimate_trainer.data.streaming import counter_rng
from ultimate_trainer.data.streaming.base import check_position, stamp
from ultimate_trainer.errors import UserError


def check_weights(weights, names=None):
    """The weights normalized to sum 1; UserError for a negative, non-finite or all-zero weight.

    Example:
        >>> check_weights([7, 3])
        [0.7, 0.3]
    """
    names = names or [f"source {i + 1}" for i in range(len(weights))]
    if not weights:
        raise UserError("the data mixture lists no source; give at least one source with a weight")
    for name, w in zip(names, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise UserError(f"the data mixture's weight {w!r} for {name} is not a number >= 0; give each source "
                            f"a weight such as 0.7")
    total = float(sum(weights))
    if total <= 0:
        raise UserError("the data mixture's weights sum to 0; give at least one source a weight above 0")
    return [w / total for w in weights]


class Mixture:
    """Records drawn from several streams in proportion to `weights`.

    `streams`: opened record streams (each at its own saved position on a
    resume, `Mixture.stream_positions(saved)` gives them); `position`: the
    mixture's saved position, which must come with those streams.

    Example:
        saved = mix.position()
        streams = [open_stream(s, position=p) for s, p in zip(specs, Mixture.stream_positions(saved))]
        resumed = Mixture(streams, [0.7, 0.3], seed=0, position=saved)
    """

    kind = "mixture"

    def __init__(self, streams, weights, seed=0, position=None, names=None):
        if len(streams) != len(weights):
            raise UserError(f"the data mixture has {len(streams)} sources but {len(weights)} weights; give one "
                            f"weight per source")
        self.streams, self.seed = list(streams), int(seed)
        self.names = names or [s.describe() for s in self.streams]
        self.weights = check_weights(list(weights), self.names)
        self._edges = [sum(self.weights[:i + 1]) for i in range(len(self.weights))]
        self._draws, self._counts = 0, [0] * len(self.streams)
        if position is not None:
            check_position(position, self.kind, **self._identity())
            self._draws, self._counts = position["draws"], list(position["counts"])

    def _identity(self):
        return {"seed": self.seed, "weights": self.weights}

    @staticmethod
    def stream_positions(position):
        """The per-source positions inside a saved mixture position, to reopen the sources with."""
        return list(position["sources"])

    def pick(self, draw):
        """The source index draw number `draw` takes (a pure function of seed and draw)."""
        u = counter_rng.uniform(self.seed, "mixture", draw)
        return min(bisect.bisect_right(self._edges, u), len(self._edges) - 1)

    def __iter__(self):
        iterators = [iter(s) for s in self.streams]
        while True:
            source = self.pick(self._draws)
            text = next(iterators[source], None)
            if text is None:
                return
            self._draws += 1
            self._counts[source] += 1
            yield text

    def position(self):
        return stamp(self.kind, **self._identity(), draws=self._draws, counts=list(self._counts),
                     sources=[s.position() for s in self.streams])

    def proportions(self):
        """The realized share of each source over all draws so far (resumes included)."""
        return [c / self._draws if self._draws else 0.0 for c in self._counts]

    def report(self):
        """One line: each source's realized share next to its weight."""
        return "; ".join(f"{name}: {share:.1%} (weight {w:.1%})"
                         for name, share, w in zip(self.names, self.proportions(), self.weights))

    def describe(self):
        return "mixture of " + ", ".join(f"{w:.0%} {name}" for name, w in zip(self.names, self.weights))
