"""The immutable picture of the model at one instant.

The model builds a :class:`Snapshot`; the Textual UI renders only from it and
``flasktop snapshot --json`` prints :meth:`Snapshot.to_json`. Every text field
here may come from outside (route names, thread names, file names): renderers
must treat it as plain text, never markup. The JSON schema is documented in
docs/snapshot.md; the keys below are that schema.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

# Worker states
IDLE = "idle"
BUSY = "busy"
STUCK = "stuck"
STARTING = "starting"
GONE = "gone"
STOPPED = "stopped"  # SIGSTOPped / traced (psutil status "stopped" / "tracing-stop")
UNKNOWN = "unknown"  # no beacon and no stack yet


@dataclass(frozen=True)
class RequestRecord:
    """One completed request."""

    route: str
    method: str
    status: int
    duration_ms: float
    pid: int
    tid: int
    end: float  # wall-clock seconds
    exc: str = ""
    size: int = -1


@dataclass(frozen=True)
class InFlightView:
    """A request running now."""

    route: str
    method: str
    tid: int
    start: float  # wall-clock seconds
    elapsed_s: float
    # "beacon": the true age, from the beacon's in-flight report.
    # "stack": no beacon; a lower bound from an unchanged in-request stack across samples.
    source: str = "beacon"


@dataclass(frozen=True)
class HotFrame:
    frame: str  # "function (file:line)"
    samples: int  # samples in which this frame was on the stack of the route's thread
    share: float  # samples / route's samples, 0..1
    leaf: int = 0  # samples in which it was the innermost frame


@dataclass(frozen=True)
class LatencyPoint:
    """Percentiles of one time bucket (for the route's latency-over-time chart)."""

    t: float
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


@dataclass(frozen=True)
class RouteView:
    route: str  # the template, "/orders/<int:oid>"; "<other>" is the overflow bucket
    method: str
    count: int  # since attach
    errors: int  # 5xx and exceptions, since attach
    rate: float  # requests/s over the recent window
    error_rate: float  # errors / count over the recent window, 0..1
    p50_ms: Optional[float]  # recent window (falls back to since-attach when the window is empty)
    p95_ms: Optional[float]
    p99_ms: Optional[float]
    max_ms: Optional[float]
    share: float  # share of all workers' busy time spent in this route, recent window, 0..1
    total_p50_ms: Optional[float] = None  # since attach
    total_p95_ms: Optional[float] = None
    total_p99_ms: Optional[float] = None
    total_max_ms: Optional[float] = None
    in_flight: int = 0
    hot_frames: Tuple[HotFrame, ...] = ()
    slowest: Tuple[RequestRecord, ...] = ()  # slowest recent requests, slowest first
    histogram: Tuple[Tuple[float, int], ...] = ()  # (upper bound ms, count), since attach
    history: Tuple[LatencyPoint, ...] = ()  # oldest first
    slow: bool = False  # flagged by the slow-route detector


@dataclass(frozen=True)
class ThreadView:
    tid: int
    name: str
    active: bool
    frames: Tuple[str, ...]  # innermost first, "function (file:line)"
    in_flight: Optional[InFlightView] = None


@dataclass(frozen=True)
class WorkerView:
    pid: int
    state: str  # IDLE, BUSY, STUCK, STARTING, STOPPED, UNKNOWN
    started: float  # wall-clock seconds (process create time)
    rss_bytes: Optional[int]
    uss_bytes: Optional[int] = None
    pss_bytes: Optional[int] = None
    cpu_percent: Optional[float] = None
    num_threads: Optional[int] = None
    num_fds: Optional[int] = None
    num_connections: Optional[int] = None
    heartbeat_age_s: Optional[float] = None
    rss_history: Tuple[float, ...] = ()  # bytes, one a second, oldest first
    fd_history: Tuple[float, ...] = ()
    growth_mb_per_min: Optional[float] = None
    leak_suspected: bool = False
    leak_routes: Tuple[Tuple[str, float], ...] = ()  # (route, share of requests while growing)
    in_flight: Optional[InFlightView] = None  # the oldest request it is serving
    in_flight_all: Tuple[InFlightView, ...] = ()
    stack: Optional[Tuple[str, ...]] = None  # the serving thread's (else main thread's) frames
    threads: Tuple[ThreadView, ...] = ()
    recent_requests: Tuple[RequestRecord, ...] = ()  # newest first
    requests_served: int = 0  # seen by the beacon since attach
    stuck_for_s: Optional[float] = None
    missing: Tuple[str, ...] = ()  # one line each: what could not be read, and why
    fd_growth_per_min: Optional[float] = None  # file descriptors (or connections) per minute
    fd_leak_suspected: bool = False


@dataclass(frozen=True)
class MasterView:
    pid: int
    alive: bool
    worker_class: str
    workers: Optional[int]  # configured
    threads: Optional[int]
    timeout: float
    max_requests: Optional[int]
    bind: Tuple[str, ...]
    app: Optional[str] = None
    preload: bool = False
    rss_bytes: Optional[int] = None
    cpu_percent: Optional[float] = None
    new_master_pid: Optional[int] = None  # USR2 replacement, when one is seen
    # gunicorn's default, because its process title hides the arguments (setproctitle)
    timeout_assumed: bool = False


@dataclass(frozen=True)
class WorkerEvent:
    t: float
    kind: str  # started, exited, timeout_killed, recycled, reloaded, added, removed,
    #            crash_loop, master_exited, master_replaced
    pid: Optional[int]
    summary: str  # one line for a person
    route: Optional[str] = None  # the route it was serving when it died
    stack: Optional[Tuple[str, ...]] = None  # its last sampled stack


@dataclass(frozen=True)
class Problem:
    kind: str  # slow_route, memory_leak, stuck_worker, worker_timeout, error_rate, crash_loop, ...
    severity: int  # higher is worse; the list is sorted by it
    summary: str  # one line for a person
    pid: Optional[int] = None
    route: Optional[str] = None


@dataclass(frozen=True)
class SourceView:
    name: str  # "psutil", "pyspy", "beacon"
    state: str  # ok, waiting, degraded, denied, missing, error, off
    detail: str = ""


@dataclass(frozen=True)
class BeaconView:
    address: str = ""
    received: int = 0
    accepted: int = 0
    events: int = 0
    rejected: Tuple[Tuple[str, int], ...] = ()
    lost: int = 0
    kernel_drops: Optional[int] = None
    app_dropped: int = 0  # events the beacons dropped in-process (buffer full)
    senders: int = 0
    last_heard_s: Optional[float] = None  # seconds since the last datagram
    ignored: int = 0  # datagrams from pids that are not workers of this master
    dropped_backlog: int = 0  # decoded datagrams flasktop threw away because it fell behind


@dataclass(frozen=True)
class Snapshot:
    t: float
    attached_s: float
    master: Optional[MasterView]
    workers: Tuple[WorkerView, ...]
    routes: Tuple[RouteView, ...]  # most busy time first
    problems: Tuple[Problem, ...]  # worst first
    events: Tuple[WorkerEvent, ...]  # oldest first
    sources: Tuple[SourceView, ...]
    beacon: BeaconView
    rps: float = 0.0  # all routes, recent window
    error_rate: float = 0.0
    routes_dropped: int = 0  # distinct routes folded into the overflow bucket
    # busy time / (workers x threads x window), 0..1+; None for async workers or before topology
    utilization: Optional[float] = None

    def source(self, name: str) -> Optional[SourceView]:
        for s in self.sources:
            if s.name == name:
                return s
        return None

    def to_dict(self) -> Dict[str, Any]:
        """The documented JSON schema (docs/snapshot.md)."""
        d = asdict(self)
        d["sources"] = {s.name: {"state": s.state, "detail": s.detail} for s in self.sources}
        d["sources"]["beacon"] = {**d["sources"].get("beacon", {"state": "off", "detail": ""}),
                                  **asdict(self.beacon)}
        d["sources"]["beacon"]["rejected"] = dict(self.beacon.rejected)
        del d["beacon"]
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str, allow_nan=False)


EMPTY_BEACON = BeaconView()
