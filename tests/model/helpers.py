"""Builders of synthetic events for model tests, and a fake clock."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

from flasktop.model import Model, ModelConfig
from flasktop.model.events import (
    Frame, GunicornConfig, ProcStats, StackSample, ThreadDump, TopologyTick,
)
from flasktop.protocol import Aggregate, Datagram, InFlight, Request, bucket_of

T0 = 1_700_000_000.0
MASTER = 100
MB = 1024 * 1024


def gconf(**kw: object) -> GunicornConfig:
    kw.setdefault("timeout", 30.0)
    return GunicornConfig(**kw)  # type: ignore[arg-type]


def proc(pid: int, t: float, created: float = T0 - 3600, rss_mb: Optional[float] = 100.0,
         **kw: object) -> ProcStats:
    rss = int(rss_mb * MB) if rss_mb is not None else None
    return ProcStats(pid, created, t, rss=rss, **kw)  # type: ignore[arg-type]


def tick(t: float, workers: Iterable[ProcStats], config: Optional[GunicornConfig] = None,
         alive: bool = True, new_master: Optional[int] = None) -> TopologyTick:
    return TopologyTick(t, MASTER, alive, proc(MASTER, t, rss_mb=50), tuple(workers),
                        config or gconf(), new_master)


def req(route: str, dur: float, end: float, tid: int = 1, status: int = 200,
        method: str = "GET", exc: str = "") -> Request:
    return Request(route, route.strip("/") or "index", method, status, dur, 10, exc, tid, end)


def done(pid: int, t: float, reqs: Sequence[Request], seq: int = 0) -> Datagram:
    return Datagram("r", pid, seq, t, tuple(reqs), (), 0, 0, 0)


def agg(route: str, durs: Iterable[float], end: float, tid: int = 1, status: int = 200,
        method: str = "GET", exc: str = "", span: float = 0.15) -> Aggregate:
    """Requests of ``durs`` seconds counted per bucket, as the beacon's aggregates carry them."""
    buckets: dict = {}
    for d in durs:
        k = bucket_of(d)
        buckets[k] = buckets.get(k, 0) + 1
    return Aggregate(route, route.strip("/") or "index", method, status, exc, tid, end - span,
                     end, tuple(sorted(buckets.items())))


def counted(pid: int, t: float, aggs: Sequence[Aggregate], seq: int = 0) -> Datagram:
    return Datagram("a", pid, seq, t, (), (), 0, 0, 0, tuple(aggs))


def flying(pid: int, t: float, items: Sequence[Tuple[str, int, float]], dropped: int = 0,
           method: str = "GET") -> Datagram:
    """An in-flight report: (route, tid, start) each."""
    fl = tuple(InFlight(r, r.strip("/"), method, tid, start) for r, tid, start in items)
    return Datagram("f", pid, 0, t, (), fl, len(fl), dropped, 0)


REQUEST_FRAMES = (
    Frame("dispatch_request", "/venv/flask/app.py", 880, "flask/app.py"),
    Frame("full_dispatch_request", "/venv/flask/app.py", 865, "flask/app.py"),
    Frame("wsgi_app", "/venv/flask/app.py", 1478, "flask/app.py"),
    Frame("handle_request", "/venv/gunicorn/workers/sync.py", 178, "gunicorn/workers/sync.py"),
    Frame("run", "/venv/gunicorn/arbiter.py", 60, "gunicorn/arbiter.py"),
)
IDLE_FRAMES = (
    Frame("wait", "/venv/gunicorn/workers/sync.py", 36, "gunicorn/workers/sync.py"),
    Frame("run_for_one", "/venv/gunicorn/workers/sync.py", 70, "gunicorn/workers/sync.py"),
)


def app_frames(*names: str, line: int = 10) -> Tuple[Frame, ...]:
    """Innermost first: the given app functions, then Flask/gunicorn request plumbing."""
    own = tuple(Frame(n, "/srv/app.py", line + i, "app.py") for i, n in enumerate(names))
    return own + REQUEST_FRAMES


def sample(pid: int, t: float, threads: Sequence[Tuple[int, Tuple[Frame, ...]]]) -> StackSample:
    return StackSample(t, pid, tuple(ThreadDump(tid, "MainThread" if tid == pid else f"t{tid}",
                                                True, False, frames) for tid, frames in threads))


def model(**kw: object) -> Model:
    return Model(ModelConfig(**kw), start=T0)  # type: ignore[arg-type]
