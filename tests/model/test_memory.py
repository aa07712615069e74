from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional

from flasktop.model.series import Series
from tests.model.helpers import T0, done, model, proc, req, tick

Rss = Callable[[float], float]  # age of the worker (s) -> MB


def leak_flags(rss: Rss, seconds: int, created: float = T0, noise: float = 0.5,
               seed: int = 1) -> List[float]:
    """Feed one worker for ``seconds``; return the times since attach at which it was flagged."""
    rng = random.Random(seed)
    m = model()
    flagged = []
    for i in range(seconds):
        t = T0 + i
        m.feed(tick(t, [proc(7, t, created=created,
                             rss_mb=rss(t - created) + rng.gauss(0, noise))]), t)
        if i % 5 == 0:
            w = m.snapshot(t).workers[0]
            if w.leak_suspected:
                flagged.append(float(i))
    return flagged


def test_series_fit_matches_a_direct_least_squares_fit() -> None:
    rng = random.Random(3)
    s = Series(100)
    pts = [(T0 + i, 50 + 0.3 * i + rng.gauss(0, 2)) for i in range(350)]  # compacts twice
    for t, y in pts:
        s.add(t, y)
    assert len(s.values()) == 100 and len(s) < 200
    tail = pts[-60:]
    n = len(tail)
    mx = sum(t for t, _ in tail) / n
    my = sum(y for _, y in tail) / n
    sxy = sum((t - mx) * (y - my) for t, y in tail)
    sxx = sum((t - mx) ** 2 for t, _ in tail)
    syy = sum((y - my) ** 2 for _, y in tail)
    fit = s.fit_since(tail[0][0])
    assert fit is not None and fit.n == 60
    assert math.isclose(fit.slope, sxy / sxx, rel_tol=1e-6)
    assert math.isclose(fit.r2, sxy * sxy / (sxx * syy), rel_tol=1e-6)


def test_series_keeps_one_point_per_second() -> None:
    s = Series(10)
    s.add(T0 + 0.1, 1.0)
    s.add(T0 + 0.9, 2.0)
    s.add(T0 + 1.2, 3.0)
    assert s.values() == (2.0, 3.0)


def test_steady_leak_in_a_worker_older_than_flasktop_fires_within_two_minutes() -> None:
    for rate in (20.0, 60.0):
        flagged = leak_flags(lambda age: 200 + rate * age / 60.0, 300, created=T0 - 3600)
        assert flagged and flagged[0] <= 120, (rate, flagged[:3])
        assert flagged[-1] == 295.0  # and it stays flagged


def test_noisy_leak_fires_and_stays_flagged() -> None:
    flagged = leak_flags(lambda age: 400 + 20.0 * age / 60.0, 400, created=T0 - 3600, noise=2.0)
    assert flagged[0] <= 120 and flagged == [float(i) for i in range(int(flagged[0]), 400, 5)]


def test_leak_from_birth_fires_within_about_two_minutes() -> None:
    flagged = leak_flags(lambda age: 80 + 25.0 * age / 60.0, 240, created=T0)
    assert flagged and flagged[0] <= 120, flagged[:3]


def test_growth_rate_is_reported_in_mb_per_minute() -> None:
    m = model()
    for i in range(200):
        t = T0 + i
        m.feed(tick(t, [proc(7, t, rss_mb=300 + 40.0 * i / 60.0)]), t)
    w = m.snapshot(T0 + 199).workers[0]
    assert w.leak_suspected
    assert w.growth_mb_per_min is not None and abs(w.growth_mb_per_min - 40.0) < 0.5
    [p] = [p for p in m.snapshot(T0 + 199).problems if p.kind == "memory_leak"]
    assert p.pid == 7 and "40.0 MB/min" in p.summary


def test_warm_up_that_flattens_never_fires() -> None:
    for tau in (5.0, 15.0, 30.0, 60.0):
        for amp in (60.0, 200.0):
            flagged = leak_flags(lambda age: 60 + amp * (1 - math.exp(-age / tau)), 1200,
                                 created=T0, seed=int(tau))
            assert flagged == [], (tau, amp, flagged[:3])


def test_linear_warm_up_then_flat_never_fires() -> None:
    flagged = leak_flags(lambda age: 60 + min(age, 40.0) * 2.0, 900, created=T0)
    assert flagged == []


def test_flat_noisy_memory_never_fires() -> None:
    assert leak_flags(lambda age: 300.0, 900, created=T0 - 600, noise=3.0) == []


def test_max_requests_sawtooth_never_fires() -> None:
    """Each worker grows for its whole (short) life, then is recycled and replaced."""
    m = model()
    rng = random.Random(5)
    pid, born = 1000, T0
    seen: List[bool] = []
    for i in range(1500):
        t = T0 + i
        if t - born >= 80:
            pid, born = pid + 1, t
        m.feed(tick(t, [proc(pid, t, created=born,
                             rss_mb=70 + 40.0 * (t - born) / 60 + rng.gauss(0, 0.3))]), t)
        if i % 5 == 0:
            seen.extend(w.leak_suspected for w in m.snapshot(t).workers)
    assert len(seen) == 300 and not any(seen)
    assert m.sizes()["workers"] == 1


def test_leak_routes_name_the_route_that_was_running_while_memory_grew() -> None:
    rng = random.Random(11)
    m = model()
    rss = 200.0
    for i in range(240):
        t = T0 + i
        leaks = rng.random() < 0.3
        reqs = [req("/fast/<int:n>", 0.003, t - 0.6 + 0.01 * j, tid=7) for j in range(rng.randint(3, 8))]
        if leaks:
            reqs.append(req("/leak", 0.02, t - 0.5, tid=7))
            rss += 1.0
        m.feed(done(7, t, reqs), t + 0.2)
        m.feed(tick(t + 0.3, [proc(7, t + 0.3, rss_mb=rss + rng.gauss(0, 0.02))]), t + 0.3)
    w = m.snapshot(T0 + 240).workers[0]
    assert w.leak_suspected
    assert w.leak_routes and w.leak_routes[0][0] == "/leak"
    assert "/fast/<int:n>" not in dict(w.leak_routes)
    [p] = [p for p in m.snapshot(T0 + 240).problems if p.kind == "memory_leak"]
    assert p.route == "/leak" and "/leak" in p.summary


def fd_problems(fds: Callable[[int], int]) -> Dict[str, Optional[float]]:
    m = model()
    for i in range(300):
        t = T0 + i
        m.feed(tick(t, [proc(7, t, num_fds=fds(i), num_connections=3)]), t)
    snap = m.snapshot(T0 + 299)
    return {p.kind: snap.workers[0].fd_growth_per_min for p in snap.problems}


def test_fd_growth_is_an_fd_leak_and_flat_fds_are_not() -> None:
    growing = fd_problems(lambda i: 20 + i // 10)  # 6 per minute
    assert "fd_leak" in growing and abs(growing["fd_leak"] - 6.0) < 0.5
    assert "memory_leak" not in growing
    assert fd_problems(lambda i: 20 + (i % 7)) == {}
