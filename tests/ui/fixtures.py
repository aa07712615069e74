"""Deterministic snapshots and a feed that pushes them only when a test says so."""

from __future__ import annotations

import threading
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from flasktop.model.snapshot import (
    BUSY,
    IDLE,
    STUCK,
    BeaconView,
    HotFrame,
    InFlightView,
    LatencyPoint,
    MasterView,
    Problem,
    RequestRecord,
    RouteView,
    Snapshot,
    SourceView,
    ThreadView,
    WorkerEvent,
    WorkerView,
)

T0 = 1_700_000_000.0
MB = 1 << 20
MASTER_PID = 4100
IDLE_PID, BUSY_PID, LEAK_PID, STUCK_PID = 4101, 4102, 4103, 4104
STUCK_FRAMES = (
    "wait_for_lock (reports.py:88)",
    "build_report (reports.py:40)",
    "export (views.py:12)",
    "dispatch_request (flask/app.py:880)",
)

HOSTILE = (
    "[/]",
    "[link=http://x]y",
    "[bold red]x",
    "/osc\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\",
    "/clear\x1b[2J",
)


class FixedFeed:
    """A Feed for tests: records what the app asks, pushes snapshots when told."""

    def __init__(self, snapshots: Iterable[Snapshot] = ()) -> None:
        self.snapshots: List[Snapshot] = list(snapshots)
        self.on_snapshot: Optional[Callable[[Snapshot], None]] = None
        self.started = 0
        self.stopped = 0
        self.focused: List[Optional[int]] = []

    def start(self, on_snapshot: Callable[[Snapshot], None]) -> None:
        self.started += 1
        self.on_snapshot = on_snapshot

    def stop(self) -> None:
        self.stopped += 1

    def focus(self, pid: Optional[int]) -> None:
        self.focused.append(pid)

    def push(self, snap: Optional[Snapshot] = None) -> Snapshot:
        """Push `snap`, or the next held snapshot, as the engine would."""
        assert self.on_snapshot is not None, "the app has not started the feed"
        if snap is None:
            snap = self.snapshots.pop(0)
        self.on_snapshot(snap)
        return snap

    def push_from_thread(self, snap: Snapshot) -> None:
        """Push from another thread, as the real engine does."""
        t = threading.Thread(target=self.push, args=(snap,))
        t.start()
        t.join()


def latency_history(base: float, i: int, n: int = 40) -> Tuple[LatencyPoint, ...]:
    pts = []
    for k in range(n):
        wave = 1 + ((k * 7 + i) % 10) / 10
        pts.append(LatencyPoint(t=T0 + i - (n - k) * 10, count=5 + k % 3, p50_ms=base * wave,
                                p95_ms=base * wave * 3, p99_ms=base * wave * 5))
    return tuple(pts)


def histogram(base: float) -> Tuple[Tuple[float, int], ...]:
    bounds = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
    return tuple((float(b), max(0, int(100 - abs(b - base) / max(base, 1) * 30))) for b in bounds)


def route(name: str, *, method: str = "GET", base: float = 20.0, i: int = 0, share: float = 0.1,
          slow: bool = False, errors: int = 0, pid: int = BUSY_PID) -> RouteView:
    count = 100 + 10 * i
    slowest = tuple(
        RequestRecord(route=name, method=method, status=500 if k == 0 and errors else 200,
                      duration_ms=base * (8 - k), pid=pid + (k % 2), tid=pid + 10 + k, end=T0 + i - 5 * k,
                      exc="TimeoutError('db')" if k == 0 and errors else "")
        for k in range(5)
    )
    return RouteView(
        route=name, method=method, count=count, errors=errors, rate=2.5 + i * 0.5,
        error_rate=errors / count, p50_ms=base, p95_ms=base * 3 + i, p99_ms=base * 5 + i, max_ms=base * 8 + i,
        share=share, total_p50_ms=base, total_p95_ms=base * 3, total_p99_ms=base * 5, total_max_ms=base * 8,
        in_flight=1 if slow else 0,
        hot_frames=(HotFrame(STUCK_FRAMES[0], 40, 0.62, 35), HotFrame(STUCK_FRAMES[1], 50, 0.77, 2)),
        slowest=slowest, histogram=histogram(base), history=latency_history(base, i), slow=slow,
    )


def routes(i: int = 0, hostile: bool = False) -> Tuple[RouteView, ...]:
    out = [
        route("/export", base=900.0, i=i, share=0.55, slow=True, errors=3, pid=STUCK_PID),
        route("/orders/<int:oid>", base=40.0, i=i, share=0.25),
        route("/login", method="POST", base=15.0, i=i, share=0.12),
        route("/health", base=1.0, i=i, share=0.03),
    ]
    if hostile:
        out += [route(name, base=5.0, i=i, share=0.01) for name in HOSTILE]
    return tuple(out)


def worker(pid: int, state: str, i: int, *, rss_mb: float = 120.0, growth: float = 0.0, leak: bool = False,
           in_flight: Optional[InFlightView] = None, stack: Optional[Tuple[str, ...]] = None,
           threads: Tuple[ThreadView, ...] = (), stuck_for: Optional[float] = None) -> WorkerView:
    n = 30 + i
    hist = tuple((rss_mb + growth * (k - n) / 60) * MB for k in range(n))
    served = tuple(
        RequestRecord(route="/orders/<int:oid>", method="GET", status=200 if k % 4 else 404,
                      duration_ms=30.0 + k, pid=pid, tid=pid, end=T0 + i - k)
        for k in range(6)
    )
    return WorkerView(
        pid=pid, state=state, started=T0 - 600, rss_bytes=int(hist[-1]), uss_bytes=int(hist[-1] * 0.8),
        cpu_percent=12.0 + i, num_threads=len(threads) or 1, num_fds=20 + i, num_connections=2,
        rss_history=hist, fd_history=tuple(float(20 + k % 5) for k in range(n)), growth_mb_per_min=growth,
        leak_suspected=leak, leak_routes=(("/orders/<int:oid>", 0.7),) if leak else (),
        in_flight=in_flight, in_flight_all=(in_flight,) if in_flight else (), stack=stack, threads=threads,
        recent_requests=served, requests_served=100 + i, stuck_for_s=stuck_for,
    )


def workers(i: int = 0, *, stuck: bool = True, stack_source: str = "beacon",
            drop: Sequence[int] = ()) -> Tuple[WorkerView, ...]:
    flight = InFlightView(route="/export", method="GET", tid=STUCK_PID + 6, start=T0 - 41, elapsed_s=41.0 + i,
                          source=stack_source)
    threads = (
        ThreadView(tid=STUCK_PID + 6, name="MainThread", active=True, frames=STUCK_FRAMES, in_flight=flight),
        ThreadView(tid=STUCK_PID + 7, name="heartbeat\x1b[31m", active=False,
                   frames=("sleep (gunicorn/workers/base.py:10)",)),
    )
    out = [
        worker(IDLE_PID, IDLE, i),
        worker(BUSY_PID, BUSY, i, rss_mb=140.0,
               in_flight=InFlightView("/orders/<int:oid>", "GET", BUSY_PID, T0 + i - 0.2, 0.2)),
        worker(LEAK_PID, BUSY, i, rss_mb=300.0 + i, growth=6.5, leak=True),
    ]
    if stuck:
        out.append(worker(STUCK_PID, STUCK, i, rss_mb=180.0, in_flight=flight, stack=STUCK_FRAMES,
                          threads=threads, stuck_for=41.0 + i))
    else:
        out.append(worker(STUCK_PID, IDLE, i, rss_mb=180.0))
    return tuple(w for w in out if w.pid not in drop)


def snapshot(i: int = 0, *, hostile: bool = False, beacon: str = "ok", pyspy: str = "ok",
             master_alive: bool = True, drop: Sequence[int] = (), stuck: bool = True,
             stack_source: str = "beacon", route_list: Optional[Tuple[RouteView, ...]] = None,
             events: Tuple[WorkerEvent, ...] = ()) -> Snapshot:
    """Tick `i` of a small deterministic gunicorn: 4 workers, one leaking, one stuck on /export."""
    t = T0 + i
    rs = route_list if route_list is not None else (routes(i, hostile) if beacon == "ok" else ())
    pyspy_detail = {"ok": "", "denied": "ptrace not permitted: run as root or set kernel.yama.ptrace_scope=0"}
    sources = (
        SourceView("psutil", "ok"),
        SourceView("pyspy", pyspy, pyspy_detail.get(pyspy, "py-spy exited with 1")),
        SourceView("beacon", beacon, "" if beacon == "ok" else "nothing heard on 127.0.0.1:7181"),
    )
    evs = (WorkerEvent(t=T0 - 300, kind="started", pid=IDLE_PID, summary=f"worker {IDLE_PID} started"),) + events
    problems = (
        Problem("stuck_worker", 90, f"worker {STUCK_PID} stuck 41s on GET /export in wait_for_lock (reports.py:88)",
                pid=STUCK_PID, route="/export"),
        Problem("memory_leak", 60, f"worker {LEAK_PID} grows 6.5 MB/min", pid=LEAK_PID),
        Problem("slow_route", 40, "GET /export p95 2.7s", route="/export"),
    )
    return Snapshot(
        t=t, attached_s=120.0 + i,
        master=MasterView(pid=MASTER_PID, alive=master_alive, worker_class="sync", workers=4, threads=1,
                          timeout=60.0, max_requests=None, bind=("127.0.0.1:8000",)),
        workers=workers(i, stuck=stuck, stack_source=stack_source, drop=drop),
        routes=rs, problems=problems if beacon == "ok" else problems[:2], events=evs, sources=sources,
        beacon=BeaconView(address="127.0.0.1:7181", received=1000 + i, accepted=1000 + i, events=2000,
                          lost=3 if beacon == "ok" else 0, senders=4 if beacon == "ok" else 0,
                          last_heard_s=0.1 if beacon == "ok" else None),
        rps=10.0 + i, error_rate=0.02,
    )


def timeout_event(pid: int = STUCK_PID) -> WorkerEvent:
    return WorkerEvent(t=T0 + 50, kind="timeout_killed", pid=pid,
                       summary=f"worker {pid} killed after 60s on GET /export", route="/export",
                       stack=STUCK_FRAMES)
