"""Bounded 1 Hz series with prefix sums, so a least-squares fit over any recent window is O(1),
and the growth verdict (memory or fd leak) built on those fits."""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple


class Fit(NamedTuple):
    n: int
    span: float  # seconds between the first and last point
    slope: float  # units per second
    r2: float


class Series:
    """At most ``cap`` points ``(t, y)``, one per wall-clock second (a second reading in the
    same second replaces the first). Memory stays below ``2 * cap`` points."""

    __slots__ = ("cap", "_t", "_y", "_p", "_t0", "_y0")

    def __init__(self, cap: int) -> None:
        self.cap = max(2, cap)
        self._t: List[float] = []
        self._y: List[float] = []
        self._p: List[Tuple[float, float, float, float, float]] = [(0.0, 0.0, 0.0, 0.0, 0.0)]
        self._t0 = 0.0
        self._y0 = 0.0

    def __len__(self) -> int:
        return len(self._t)

    def add(self, t: float, y: float) -> None:
        ts = self._t
        if ts and int(t) <= int(ts[-1]):
            if t < ts[-1]:
                return  # out of order: keep the series monotonic
            ts.pop()
            self._y.pop()
            self._p.pop()
        if not ts:
            self._t0, self._y0 = t, y
        ts.append(t)
        self._y.append(y)
        x, v = t - self._t0, y - self._y0
        a = self._p[-1]
        self._p.append((a[0] + x, a[1] + v, a[2] + x * x, a[3] + x * v, a[4] + v * v))
        if len(ts) >= 2 * self.cap:
            self._compact()

    def _compact(self) -> None:
        ts, ys = self._t[-self.cap:], self._y[-self.cap:]
        self._t, self._y = [], []
        self._p = [(0.0, 0.0, 0.0, 0.0, 0.0)]
        for t, y in zip(ts, ys):
            self.add(t, y)

    def values(self) -> Tuple[float, ...]:
        return tuple(self._y[-self.cap:])

    def last(self) -> Optional[Tuple[float, float]]:
        return (self._t[-1], self._y[-1]) if self._t else None

    def first_t(self) -> Optional[float]:
        return self._t[-self.cap:][0] if self._t else None

    def index_at(self, t: float) -> int:
        """Index of the first retained point at or after ``t``."""
        ts = self._t
        lo, hi = max(0, len(ts) - self.cap), len(ts)
        while lo < hi:
            mid = (lo + hi) // 2
            if ts[mid] < t:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def fit(self, i: int, j: int) -> Optional[Fit]:
        """Least-squares line through points ``i .. j-1``."""
        n = j - i
        if n < 2 or i < 0 or j > len(self._t):
            return None
        a, b = self._p[i], self._p[j]
        sx, sy, sxx, sxy, syy = (b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3], b[4] - a[4])
        vx = n * sxx - sx * sx
        vy = n * syy - sy * sy
        cov = n * sxy - sx * sy
        if vx <= 1e-9:
            return None
        slope = cov / vx
        r2 = (cov * cov) / (vx * vy) if vy > 1e-12 * max(1.0, abs(n * syy)) else 0.0
        return Fit(n, self._t[j - 1] - self._t[i], slope, min(1.0, max(0.0, r2)))

    def fit_since(self, t: float) -> Optional[Fit]:
        return self.fit(self.index_at(t), len(self._t))


class Trend(NamedTuple):
    growing: bool  # the growth verdict
    rate_per_s: Optional[float]  # slope of the window the verdict used (or the longest)
    window_s: float
    r2: float


def trend(s: Series, now: float, born: float, *, warmup_s: float, min_span_s: float,
          min_points: int, window_s: float, min_r2: float, flatten_ratio: float,
          min_rate_per_s: float, min_growth: float) -> Trend:
    """Sustained, steady growth after warm-up that is not flattening.

    The longest window (at most ``window_s``, after ``born + warmup_s``) is judged first.
    Shorter windows (halving down to ``min_span_s``) are judged only while growth is
    accelerating (the longest window's last third is steeper than its whole), so a leak that
    began recently is caught, but a decelerating warm-up curve never is.
    """
    start = max(born + warmup_s, now - window_s)
    fit = s.fit_since(start)
    if fit is None:
        return Trend(False, None, 0.0, 0.0)
    rate = fit.slope
    if fit.n < min_points or fit.span < min_span_s:
        return Trend(False, rate, fit.span, fit.r2)
    span = fit.span
    accelerating = True
    while span >= min_span_s:
        w = s.fit_since(now - span) if span < fit.span else fit
        if w is None or w.n < min_points:
            break
        ok, third = _steady(s, now, w, min_r2, flatten_ratio, min_rate_per_s, min_growth)
        if ok:
            return Trend(True, w.slope, w.span, w.r2)
        if span == fit.span:
            accelerating = third is not None and third > w.slope > 0
        if not accelerating:
            break
        span /= 2
    return Trend(False, rate, fit.span, fit.r2)


def _steady(s: Series, now: float, w: Fit, min_r2: float, flatten_ratio: float,
            min_rate: float, min_growth: float) -> Tuple[bool, Optional[float]]:
    last = s.fit_since(now - w.span / 3.0)
    third = last.slope if last is not None and last.n >= 3 else None
    if w.slope < min_rate or w.slope * w.span < min_growth or w.r2 < min_r2:
        return False, third
    if third is None or third < flatten_ratio * w.slope:
        return False, third
    end = now - w.span
    i = s.index_at(end)
    first = s.fit(i, s.index_at(end + w.span / 3.0))
    if first is not None and first.n >= 3 and third < flatten_ratio * first.slope:
        return False, third
    return True, third


def finite(x: Optional[float]) -> Optional[float]:
    return x if x is not None and math.isfinite(x) else None
