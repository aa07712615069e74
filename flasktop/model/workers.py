"""Per-worker state: psutil series, the beacon's in-flight view, sampled stacks, pending samples."""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

from flasktop.model.events import ProcStats
from flasktop.model.series import Series
from flasktop.protocol import InFlight, Request

MB = 1024.0 * 1024.0
MAX_TIDS = 1024  # per worker; a hostile beacon cannot grow per-thread maps past this


class ThreadState:
    """One thread as the latest sample of its worker saw it."""

    __slots__ = ("tid", "name", "active", "frames", "in_request", "since", "t", "req_frames")

    def __init__(self, tid: int, name: str, active: bool, frames: Tuple[str, ...],
                 in_request: bool, since: float, t: float,
                 req_frames: Optional[Tuple[str, ...]] = None) -> None:
        self.tid = tid
        self.name = name
        self.active = active
        self.frames = frames
        self.in_request = in_request
        self.since = since  # first sample of the current run of identical in-request stacks
        self.t = t
        self.req_frames = req_frames  # the latest stack seen inside a request


class Pending:
    """One thread of one py-spy sample waiting to be joined with the request it served."""

    __slots__ = ("t", "frames", "leaf", "route", "done")

    def __init__(self, t: float, frames: Tuple[str, ...], route: object) -> None:
        self.t = t
        self.frames = frames
        self.leaf = frames[0] if frames else ""
        self.route = route  # RouteStats of the in-flight request seen at sample time, or None
        self.done = False


class WorkerState:
    __slots__ = (
        "pid", "create_time", "first_seen", "pre_attach", "stats", "traced_ticks",
        "rss", "fds", "conns", "inflight", "inflight_t", "beacon_t", "dropped",
        "recent", "served", "last_done", "pending", "threads", "sample_t", "sample_n",
        "phase", "req_by_sec", "growth_by_sec", "last_rss", "corr", "corr_routes", "long",
        "records",
    )

    def __init__(self, pid: int, create_time: float, t: float, pre_attach: bool,
                 series_points: int, recent: int) -> None:
        self.pid = pid
        self.create_time = create_time
        self.first_seen = t
        self.pre_attach = pre_attach
        self.stats: Optional[ProcStats] = None
        self.traced_ticks = 0
        self.rss = Series(series_points)  # bytes
        self.fds = Series(series_points)
        self.conns = Series(series_points)
        # tid -> requests running on that thread: one for sync and gthread workers, any number
        # for gevent/eventlet, whose greenlets share the OS thread.
        self.inflight: Dict[int, List[InFlight]] = {}
        self.inflight_t = 0.0  # beacon time of the in-flight report in use
        self.beacon_t: Optional[float] = None  # when we last heard from its beacon
        self.dropped = -1  # the beacon's cumulative drop count; -1 until its first report
        self.recent: Deque[Request] = deque(maxlen=recent)
        self.served = 0
        self.long: Optional[Request] = None  # the latest completion long enough to be a kill
        self.records: Dict[int, Tuple[Request, object]] = {}  # snapshot memo of recent requests
        self.last_done: Dict[int, Tuple[float, float, object]] = {}  # tid -> (start, end, route)
        self.pending: Dict[int, List[Pending]] = {}
        self.threads: Dict[int, ThreadState] = {}
        self.sample_t: Optional[float] = None
        self.sample_n = 0
        self.phase = 0.0  # fractional second of psutil readings, to align requests with them
        self.req_by_sec: Dict[int, Dict[str, int]] = {}
        self.growth_by_sec: Dict[int, float] = {}
        self.last_rss: Optional[Tuple[float, float]] = None
        self.corr = [0.0, 0.0, 0.0]  # seconds, sum of growth, sum of growth squared
        self.corr_routes: Dict[str, List[float]] = {}  # route -> [sum n, sum n^2, sum n*d, growth]

    def main_thread(self) -> Optional[ThreadState]:
        th = self.threads.get(self.pid)
        if th is not None:
            return th
        for t in self.threads.values():
            if t.name == "MainThread":
                return t
        return next(iter(self.threads.values()), None)


MATCH_S = 0.01  # the same request's start, from an in-flight report and from its completion


def same_request(begin: float, end: float, f: InFlight, reported: float) -> bool:
    """Is the completed request ``begin .. end`` the one in flight as ``f`` in a report sent at
    ``reported``? Its start must match, and it must have been running when the report was sent:
    on one thread a fast request that ended just before the next one began has nearly the same
    start, but ended before the report."""
    return abs(begin - f.start) <= MATCH_S and end >= reported - 0.002


def running_at(flights: Optional[List[InFlight]], t: float) -> Optional[InFlight]:
    """The request on one thread that was running at ``t``: the latest one begun by then."""
    best = None
    if flights:
        for f in flights:
            if f.start <= t and (best is None or f.start > best.start):
                best = f
    return best


def request_cut(names: Tuple[str, ...], request_functions: frozenset) -> int:
    """Index (innermost first) of the innermost request-handling frame, or -1. py-spy names
    a method by its qualified name on Python 3.11+ ("Flask.dispatch_request"), by its bare
    name before."""
    for i, n in enumerate(names):
        if n in request_functions or n[n.rfind(".") + 1:] in request_functions:
            return i
    return -1
