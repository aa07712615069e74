"""How fast the model folds events, and how long a snapshot takes when it is full.

    .venv/bin/python bench/model_throughput.py

Prints figures; asserts nothing. Workload: 200 routes x 16 workers, datagrams of 20
requests (what the beacon batches), an hour of 1 Hz psutil ticks, py-spy samples.
Fold figures are CPU time, best of 3 (the machine may be shared); snapshot figures are
the median and p95 over a minute of one snapshot per second of traffic.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flasktop.model import Model  # noqa: E402
from flasktop.model.events import (  # noqa: E402
    Frame, GunicornConfig, ProcStats, StackSample, ThreadDump, TopologyTick,
)
from flasktop.protocol import Datagram, InFlight, Request  # noqa: E402

T0 = 1_700_000_000.0
WORKERS = list(range(1000, 1016))
ROUTES = [f"/api/v1/thing{i}/<int:id>" for i in range(200)]
CFG = GunicornConfig(workers=16, threads=4, timeout=30)
MB = 1 << 20


def tick(t: float, rss: float) -> TopologyTick:
    return TopologyTick(t, 999, True, ProcStats(999, T0 - 7200, t, rss=50 * MB),
                        tuple(ProcStats(p, T0 - 7200, t, rss=int(rss * MB) + p, num_fds=30,
                                        num_connections=4, heartbeat_age_s=0.5)
                              for p in WORKERS), CFG)


def datagrams(n: int, t: float, rng: random.Random) -> List[Datagram]:
    out = []
    for i in range(n):
        pid = WORKERS[i % len(WORKERS)]
        reqs = tuple(Request(ROUTES[rng.randrange(200)], "ep", "GET", 200 if rng.random() > 0.01 else 500,
                             rng.lognormvariate(-4, 1), 100, "", pid + rng.randrange(4), t - rng.random())
                     for _ in range(20))
        out.append(Datagram("r", pid, i, t, reqs, (), 0, 0, 0))
    return out


def stack(pid: int, t: float, k: int) -> StackSample:
    frames = tuple(Frame(f"fn{k}_{d}", "/srv/app.py", d, "app.py") for d in range(8)) + (
        Frame("dispatch_request", "/venv/flask/app.py", 880, "flask/app.py"),
        Frame("wsgi_app", "/venv/flask/app.py", 1478, "flask/app.py"))
    return StackSample(t, pid, tuple(ThreadDump(pid + i, f"t{i}", True, False, frames) for i in range(4)))


def best(runs: int, setup: Callable[[], Tuple[Model, List[Tuple[object, float]]]]) -> float:
    """CPU seconds of the fastest of ``runs`` folds of the same events into fresh models."""
    out = []
    for _ in range(runs):
        m, events = setup()
        feed = m.feed
        t = time.process_time()
        for ev, now in events:
            feed(ev, now)
        out.append(time.process_time() - t)
    return min(out)


def attached() -> Model:
    m = Model(start=T0)
    m.feed(tick(T0, 100), T0)
    return m


def requests_setup() -> Tuple[Model, List[Tuple[object, float]]]:
    dgs = datagrams(5000, T0 + 1, random.Random(1))  # 100k requests
    return attached(), [(d, T0 + 1 + i * 0.0002) for i, d in enumerate(dgs)]


def flights_setup() -> Tuple[Model, List[Tuple[object, float]]]:
    return attached(), [(Datagram("f", WORKERS[i % 16], i, T0 + 2, (), tuple(
        InFlight(ROUTES[(i + j) % 200], "ep", "GET", WORKERS[i % 16] + j, T0 + 1.5)
        for j in range(4)), 4, 0, 0), T0 + 2) for i in range(20000)]


def samples_setup() -> Tuple[Model, List[Tuple[object, float]]]:
    m, events = requests_setup()
    for ev, now in events[:500]:
        m.feed(ev, now)
    samples = [stack(WORKERS[i % 16], T0 + 2 + i * 0.01, i % 50) for i in range(4000)]
    return m, [(s, s.t) for s in samples]


def overflow_setup() -> Tuple[Model, List[Tuple[object, float]]]:
    m = attached()
    for i, r in enumerate(ROUTES):
        m.feed(Datagram("r", 1000, i, T0 + 1, (Request(r, "e", "GET", 200, 0.01, 1, "", 1000, T0 + 1),),
                        (), 0, 0, 0), T0 + 1)
    odd = [Datagram("r", 1000, i, T0 + 1, tuple(
        Request(f"/u/{i * 20 + j}", "e", "GET", 200, 0.01, 1, "", 1000, T0 + 1) for j in range(20)),
        (), 0, 0, 0) for i in range(5000)]
    return m, [(d, T0 + 2) for d in odd]


def fold_rate() -> None:
    dt = best(3, requests_setup)
    print(f"fold completed requests:  {100000 / dt:>10,.0f} requests/s  ({dt / 100000 * 1e6:.2f} us each, "
          f"batches of 20, 200 routes x 16 workers)")
    dt = best(3, flights_setup)
    print(f"fold in-flight reports:   {20000 / dt:>10,.0f} reports/s   ({dt / 20000 * 1e6:.2f} us each, "
          "4 entries)")
    dt = best(3, samples_setup)
    print(f"fold py-spy samples:      {4000 / dt:>10,.0f} samples/s   ({dt / 4000 * 1e6:.1f} us each, "
          "4 threads x 10 frames)")
    dt = best(3, overflow_setup)
    print(f"fold overflow requests:   {100000 / dt:>10,.0f} requests/s  ({dt / 100000 * 1e6:.2f} us each, "
          "every name new, past the 200-route cap)")


def second(m: Model, s: int, rng: random.Random) -> None:
    """One second of traffic: a psutil tick, 80 requests, in-flight reports, 8 stack samples."""
    t = T0 + s
    m.feed(tick(t, 100 + s * 0.01), t)
    for d in datagrams(4, t, rng):
        m.feed(d, t + 0.5)
    for k, pid in enumerate(WORKERS):
        if (s + k) % 2 == 0:
            m.feed(Datagram("f", pid, s, t, (), (InFlight(ROUTES[(s + k) % 200], "ep", "GET", pid, t - 0.2),),
                            1, 0, 0), t + 0.6)
            m.feed(stack(pid, t + 0.7, (s + k) % 300), t + 0.7)


def full_snapshot() -> None:
    rng = random.Random(2)
    m = Model(start=T0)
    t0 = time.perf_counter()
    for s in range(3600):
        second(m, s, rng)
    build = time.perf_counter() - t0
    t = time.perf_counter()
    snap = m.snapshot(T0 + 3600)
    cold = time.perf_counter() - t
    times, cpu = [], []
    for s in range(3600, 3660):  # then as the UI does it: a second of events, a snapshot
        second(m, s, rng)
        t, c = time.perf_counter(), time.process_time()
        snap = m.snapshot(T0 + s + 0.9)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    times.sort()
    cpu.sort()
    t = time.perf_counter()
    text = snap.to_json()
    js = time.perf_counter() - t
    print(f"an hour of history built in {build:.1f} s: {len(snap.routes)} routes, {len(snap.workers)} workers, "
          f"{sum(len(w.rss_history) for w in snap.workers)} RSS points, "
          f"{sum(len(r.history) for r in snap.routes)} latency points")
    print(f"snapshot(), once a second: median {times[len(times) // 2] * 1000:.1f} ms, "
          f"p95 {times[int(len(times) * 0.95)] * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms (60 runs)")
    print(f"snapshot(), CPU time:     median {cpu[len(cpu) // 2] * 1000:.1f} ms, "
          f"p95 {cpu[int(len(cpu) * 0.95)] * 1000:.1f} ms (wall time includes other processes)")
    print(f"snapshot(), first (cold): {cold * 1000:.1f} ms")
    print(f"Snapshot.to_json():       {js * 1000:.0f} ms, {len(text) / 1e6:.1f} MB (for --json, not per second)")
    print("store sizes:", m.sizes())


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}")
    fold_rate()
    full_snapshot()
