"""Per-route latency, rate, errors and busy time: rotating sub-window sketches plus since-attach."""

from __future__ import annotations

import hashlib
import heapq
from typing import Dict, List, Optional, Tuple

from flasktop.model.sketch import Sketch, quantiles_of
from flasktop.model.snapshot import LatencyPoint, RequestRecord
from flasktop.protocol import Request

OTHER = "<other>"
OTHER_METHOD = "*"

RouteKey = Tuple[str, str]
# (duration_s, tie-breaker, pid, request)
Slow = Tuple[float, int, int, Request]
QS = (0.5, 0.95, 0.99)


class Slot:
    """One sub-window of one route."""

    __slots__ = ("epoch", "count", "errors", "busy", "max", "buckets", "slowest", "point")

    def __init__(self) -> None:
        self.epoch = -1
        self.count = 0
        self.errors = 0
        self.busy = 0.0
        self.max = 0.0
        self.buckets: Dict[int, int] = {}
        self.slowest: List[Slow] = []
        self.point: Optional[LatencyPoint] = None

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.count = 0
        self.errors = 0
        self.busy = 0.0
        self.max = 0.0
        self.buckets = {}
        self.slowest = []
        self.point = None


class RouteStats:
    __slots__ = ("route", "method", "count", "errors", "total", "slots", "history",
                 "hot", "hot_leaf", "hot_samples", "last_exc", "archived", "memo", "touched")

    def __init__(self, route: str, method: str, slots: int, sketch: Sketch,
                 history: int) -> None:
        from collections import deque

        self.route = route
        self.method = method
        self.count = 0
        self.errors = 0
        self.total = sketch
        self.slots = [Slot() for _ in range(slots)]
        self.history: "deque[LatencyPoint]" = deque(maxlen=history)
        self.hot: Dict[str, int] = {}
        self.hot_leaf: Dict[str, int] = {}
        self.hot_samples = 0
        self.last_exc = ""
        self.archived = 0  # history points ever archived (a version for memoisation)
        self.memo: Dict[str, Tuple[object, object]] = {}
        self.touched = -1  # the last slot epoch a request or sample concerned this route

    def window_slots(self, epoch: int) -> List[Slot]:
        """The slots inside the window ending at ``epoch`` (inclusive), in no particular order."""
        lo = epoch - len(self.slots)
        return [s for s in self.slots if lo < s.epoch <= epoch]


def slot_point(slot: Slot, slot_s: float, sk: Sketch) -> LatencyPoint:
    if slot.point is None:
        p50, p95, p99 = quantiles_of(slot.buckets, slot.count, QS, sk, 0.0, slot.max)
        slot.point = LatencyPoint((slot.epoch + 1) * slot_s, slot.count,
                                  _ms(p50), _ms(p95), _ms(p99))
    return slot.point


def _ms(x: Optional[float]) -> float:
    return round(x * 1000.0, 3) if x is not None else 0.0


class DistinctCounter:
    """Distinct strings, exact up to ``k`` and estimated past it (k minimum values of a
    64-bit hash). Bounded memory whatever it is fed; deterministic across processes."""

    __slots__ = ("k", "_heap", "_set")

    def __init__(self, k: int = 1024) -> None:
        self.k = k
        self._heap: List[int] = []  # negated: a max-heap of the k smallest hashes
        self._set: set = set()

    def add(self, s: str) -> None:
        h = int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"),
                                           digest_size=8).digest(), "big")
        if h in self._set:
            return
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, -h)
            self._set.add(h)
        elif h < -self._heap[0]:
            gone = -heapq.heapreplace(self._heap, -h)
            self._set.discard(gone)
            self._set.add(h)

    def estimate(self) -> int:
        if len(self._heap) < self.k:
            return len(self._heap)
        kth = -self._heap[0]
        return int((self.k - 1) * float(1 << 64) / max(kth, 1))


def window_counts(slots: List[Slot]) -> Tuple[int, int, float, float]:
    c = e = 0
    busy = mx = 0.0
    for s in slots:
        c += s.count
        e += s.errors
        busy += s.busy
        if s.max > mx:
            mx = s.max
    return c, e, busy, mx


def slowest_records(top: List[Slow], rs: RouteStats) -> Tuple[RequestRecord, ...]:
    """Records of the slowest requests; those already built for an earlier snapshot are reused."""
    prev: Dict[int, RequestRecord] = rs.memo.get("records", (None, {}))[1]  # type: ignore[assignment]
    made: Dict[int, RequestRecord] = {}
    for d, seq, pid, r in top:
        rec = prev.get(seq)
        if rec is None:
            rec = RequestRecord(rs.route, rs.method, r.status, round(d * 1000.0, 3), pid, r.tid,
                                r.end, r.exc, r.size)
        made[seq] = rec
    rs.memo["records"] = (None, made)
    return tuple(made[x[1]] for x in top)
