"""A DDSketch-style quantile sketch: log-spaced buckets, bounded relative error, mergeable.

A positive value ``x`` lands in bucket ``k = ceil(log(x) / log(gamma))`` with
``gamma = (1 + a) / (1 - a)``; the bucket's representative value
``2 * gamma**k / (gamma + 1)`` is within relative error ``a`` of every value in it.
Values at or below ``min_value`` share one zero bucket (reported as 0). When there
are more than ``max_buckets`` buckets, the lowest ones are collapsed into one, so
memory is bounded and only the lowest quantiles lose their guarantee.

The bucket maps are plain ``dict[int, int]`` so hot paths can update them inline:
compute :meth:`Sketch.key` once and add it to several maps.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from itertools import accumulate
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ZERO_KEY = -(1 << 30)  # the bucket of values <= min_value


class Sketch:
    """A mergeable quantile sketch with relative accuracy ``accuracy``."""

    __slots__ = ("accuracy", "gamma", "inv_log_gamma", "min_value", "max_buckets",
                 "buckets", "count", "max", "min")

    def __init__(self, accuracy: float = 0.01, max_buckets: int = 2048,
                 min_value: float = 1e-6) -> None:
        if not 0.0 < accuracy < 1.0:
            raise ValueError("accuracy must be in (0, 1)")
        if max_buckets < 2:
            raise ValueError("max_buckets must be at least 2")
        self.accuracy = accuracy
        self.gamma = (1.0 + accuracy) / (1.0 - accuracy)
        self.inv_log_gamma = 1.0 / math.log(self.gamma)
        self.min_value = min_value
        self.max_buckets = max_buckets
        self.buckets: Dict[int, int] = {}
        self.count = 0
        self.max = 0.0
        self.min = math.inf

    def key(self, x: float) -> int:
        if x <= self.min_value:
            return ZERO_KEY
        return math.ceil(math.log(x) * self.inv_log_gamma)

    def value(self, key: int) -> float:
        """The representative value of bucket ``key``."""
        if key == ZERO_KEY:
            return 0.0
        return 2.0 * self.gamma ** key / (self.gamma + 1.0)

    def upper(self, key: int) -> float:
        """The largest value bucket ``key`` holds."""
        if key == ZERO_KEY:
            return self.min_value
        return self.gamma ** key

    def add(self, x: float, n: int = 1) -> None:
        if not x >= 0.0 or x == math.inf:  # also rejects NaN
            return
        k = self.key(x)
        b = self.buckets
        b[k] = b.get(k, 0) + n
        self.count += n
        if x > self.max:
            self.max = x
        if x < self.min:
            self.min = x
        if len(b) > self.max_buckets:
            self._collapse()

    def add_counts(self, buckets: Dict[int, int], count: int, mx: float, mn: float) -> None:
        """Merge raw bucket counts kept by a caller with the same parameters."""
        b = self.buckets
        for k, v in buckets.items():
            b[k] = b.get(k, 0) + v
        self.count += count
        if mx > self.max:
            self.max = mx
        if mn < self.min:
            self.min = mn
        if len(b) > self.max_buckets:
            self._collapse()

    def merge(self, other: "Sketch") -> None:
        if other.gamma != self.gamma or other.min_value != self.min_value:
            raise ValueError("cannot merge sketches with different parameters")
        self.add_counts(other.buckets, other.count, other.max, other.min)

    def copy(self) -> "Sketch":
        s = Sketch(self.accuracy, self.max_buckets, self.min_value)
        s.add_counts(self.buckets, self.count, self.max, self.min)
        return s

    def _collapse(self) -> None:
        keys = sorted(k for k in self.buckets if k != ZERO_KEY)
        excess = len(self.buckets) - self.max_buckets
        if excess <= 0 or len(keys) <= excess:
            return
        into = keys[excess]
        b = self.buckets
        moved = 0
        for k in keys[:excess]:
            moved += b.pop(k)
        b[into] += moved

    def quantile(self, q: float) -> Optional[float]:
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> List[Optional[float]]:
        """Estimates of the values at rank ``floor(q * (count - 1))``, clamped to [min, max]."""
        if self.count == 0:
            return [None] * len(qs)
        return quantiles_of(self.buckets, self.count, qs, self, self.min, self.max)

    def histogram(self, bins: int) -> Tuple[Tuple[float, int], ...]:
        return histogram_of(self.buckets, bins, self)


def quantiles_of(buckets: Dict[int, int], count: int, qs: Sequence[float], sk: Sketch,
                 lo: float = 0.0, hi: float = math.inf) -> List[Optional[float]]:
    """Quantiles of raw bucket counts (``sk`` gives the bucket geometry)."""
    if count <= 0 or not buckets:
        return [None] * len(qs)
    keys = sorted(buckets)
    return _quantiles(keys, list(accumulate([buckets[k] for k in keys])), count, qs, sk, lo, hi)


def _quantiles(keys: List[int], cum: List[int], count: int, qs: Sequence[float], sk: Sketch,
               lo: float, hi: float) -> List[Optional[float]]:
    last = len(keys) - 1
    out: List[Optional[float]] = []
    for q in qs:
        rank = math.floor(min(max(q, 0.0), 1.0) * (count - 1))
        k = keys[min(bisect_right(cum, rank), last)]
        out.append(min(max(sk.value(k), lo), hi))
    return out


def merge_counts(maps: Iterable[Dict[int, int]]) -> Dict[int, int]:
    out: Dict[int, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return out


def histogram_of(buckets: Dict[int, int], bins: int, sk: Sketch) -> Tuple[Tuple[float, int], ...]:
    """At most ``bins`` log-spaced bins ``(upper bound, count)`` covering the occupied buckets."""
    if not buckets or bins <= 0:
        return ()
    keys = sorted(buckets)
    return _histogram(keys, list(accumulate([buckets[k] for k in keys])), bins, sk)


def _histogram(keys: List[int], cum: List[int], bins: int,
               sk: Sketch) -> Tuple[Tuple[float, int], ...]:
    """The histogram of sorted ``keys`` with cumulative counts ``cum`` (no Python loop per key)."""
    out: List[Tuple[float, int]] = []
    start = 0
    if keys[0] == ZERO_KEY:
        out.append((sk.min_value, cum[0]))
        start = 1
        if len(keys) == 1:
            return tuple(out)
    lo, hi = keys[start], keys[-1]
    width = max(1, math.ceil((hi - lo + 1) / max(1, bins - len(out))))
    below = cum[start - 1] if start else 0
    edge = lo + width - 1
    while True:
        i = bisect_right(keys, edge) - 1
        if cum[i] > below:
            out.append((sk.upper(edge), cum[i] - below))
            below = cum[i]
        if edge >= hi:
            return tuple(out)
        edge += width


def summary_of(buckets: Dict[int, int], count: int, qs: Sequence[float], bins: int, sk: Sketch,
               lo: float = 0.0, hi: float = math.inf
               ) -> Tuple[List[Optional[float]], Tuple[Tuple[float, int], ...]]:
    """Quantiles and histogram from one sort of the buckets."""
    if count <= 0 or not buckets:
        return [None] * len(qs), ()
    keys = sorted(buckets)
    cum = list(accumulate([buckets[k] for k in keys]))
    return _quantiles(keys, cum, count, qs, sk, lo, hi), _histogram(keys, cum, bins, sk)
