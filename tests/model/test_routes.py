from __future__ import annotations

import json
import math
import random
from typing import List

from flasktop.model.events import Frame
from tests.model.helpers import (
    IDLE_FRAMES, T0, app_frames, done, flying, gconf, model, proc, req, sample, tick,
)


def attached(pids=(7,), config=None, **kw):
    m = model(**kw)
    m.feed(tick(T0, [proc(p, T0) for p in pids], config), T0)
    return m


def route(snap, name):
    return next(r for r in snap.routes if r.route == name)


def hot(snap, name):
    return {h.frame: (h.samples, h.leaf) for h in route(snap, name).hot_frames}


# --------------------------------------------------------------------------- hot frames

def test_samples_join_the_in_flight_request_and_count_each_frame_once_per_sample() -> None:
    m = attached()
    m.feed(flying(7, T0 + 0.5, [("/export", 7, T0)]), T0 + 0.5)
    recursive = app_frames("fib", "fib", "fib", "export")
    for i in range(1, 6):
        m.feed(sample(7, T0 + i, [(7, recursive)]), T0 + i)
    m.feed(tick(T0 + 6, [proc(7, T0 + 6)]), T0 + 10)  # any event lets matured samples fold
    h = hot(m.snapshot(T0 + 10), "/export")
    assert h["fib (app.py:10)"] == (5, 5)  # three frames... all distinct lines: 10, 11, 12
    assert h["fib (app.py:11)"] == (5, 0) and h["export (app.py:13)"] == (5, 0)
    assert not any("dispatch_request" in f or "handle_request" in f for f in h)  # plumbing cut
    top = route(m.snapshot(T0 + 10), "/export").hot_frames[0]
    assert top.share == 1.0


def test_recursion_counts_a_frame_once_per_sample() -> None:
    m = attached()
    m.feed(flying(7, T0 + 0.5, [("/fib", 7, T0)]), T0 + 0.5)
    same = Frame("fib", "/srv/app.py", 5, "app.py")
    frames = (same, same, same) + app_frames("view")
    for i in range(1, 4):
        m.feed(sample(7, T0 + i, [(7, frames)]), T0 + i)
    m.feed(tick(T0 + 9, [proc(7, T0 + 9)]), T0 + 9)
    assert hot(m.snapshot(T0 + 9), "/fib")["fib (app.py:5)"] == (3, 3)


def test_late_completion_claims_the_sample_it_covers() -> None:
    m = attached()
    m.feed(sample(7, T0 + 1.5, [(7, app_frames("render", "get_order"))]), T0 + 1.5)
    m.feed(sample(7, T0 + 2.2, [(7, IDLE_FRAMES)]), T0 + 2.2)  # idle: nobody claims it
    # The beacon batches: the completion arrives ~1 s after the request ended.
    m.feed(done(7, T0 + 2.4, [req("/orders/<int:oid>", 0.9, T0 + 1.9, tid=7)]), T0 + 2.4)
    m.feed(tick(T0 + 6, [proc(7, T0 + 6)]), T0 + 6)
    snap = m.snapshot(T0 + 6)
    assert hot(snap, "/orders/<int:oid>") == {"render (app.py:10)": (1, 1),
                                              "get_order (app.py:11)": (1, 0)}


def test_a_sample_between_requests_is_not_the_routes_time() -> None:
    """Timing says the request was running; the stack says gunicorn's idle loop (the
    sample was taken as the request ended): once the worker showed request frames, the
    stack wins, so server frames never become a route's hot frames."""
    m = attached()
    m.feed(sample(7, T0 + 1.0, [(7, app_frames("render"))]), T0 + 1.0)
    m.feed(done(7, T0 + 2.0, [req("/orders/<int:oid>", 1.2, T0 + 1.9, tid=7)]), T0 + 2.0)
    # arrives after the completion, dated inside it, but the thread is already idle
    m.feed(sample(7, T0 + 1.85, [(7, IDLE_FRAMES)]), T0 + 2.1)
    m.feed(tick(T0 + 6, [proc(7, T0 + 6)]), T0 + 6)
    h = hot(m.snapshot(T0 + 6), "/orders/<int:oid>")
    assert h == {"render (app.py:10)": (1, 1)}


def test_a_new_workers_idle_stack_is_not_the_routes_time_once_any_worker_showed_requests() -> None:
    """The master's workers run one app: once worker 7's stacks showed request frames, a
    worker spawned later (8, whose first samples are gunicorn's idle loop) trusts its
    stacks too, so its server frames never become a route's hot frames."""
    m = attached(pids=(7, 8))
    m.feed(sample(7, T0 + 1.0, [(7, app_frames("render"))]), T0 + 1.0)
    m.feed(flying(8, T0 + 1.5, [("/orders/<int:oid>", 8, T0 + 1.4)]), T0 + 1.5)
    m.feed(sample(8, T0 + 1.8, [(8, IDLE_FRAMES)]), T0 + 1.8)  # as the request ended
    m.feed(done(7, T0 + 2.4, [req("/orders/<int:oid>", 1.2, T0 + 1.9, tid=7)]), T0 + 2.4)
    m.feed(done(8, T0 + 2.4, [req("/orders/<int:oid>", 0.4, T0 + 1.8, tid=8)]), T0 + 2.4)
    m.feed(tick(T0 + 6, [proc(7, T0 + 6), proc(8, T0 + 6)]), T0 + 6)
    h = hot(m.snapshot(T0 + 6), "/orders/<int:oid>")
    assert h == {"render (app.py:10)": (1, 1)}


def test_completion_already_folded_when_the_sample_arrives() -> None:
    m = attached()
    m.feed(done(7, T0 + 2, [req("/a", 1.0, T0 + 1.9, tid=7)]), T0 + 2)
    m.feed(sample(7, T0 + 1.5, [(7, app_frames("slow_a"))]), T0 + 2.1)
    assert hot(m.snapshot(T0 + 2.1), "/a") == {"slow_a (app.py:10)": (1, 1)}


def test_a_completion_later_than_the_delay_misses_and_other_threads_do_not_mix() -> None:
    m = attached(config=gconf(threads=2))
    m.feed(sample(7, T0 + 1, [(7, app_frames("a_work")), (8, app_frames("b_work"))]), T0 + 1)
    m.feed(done(7, T0 + 2, [req("/b", 0.5, T0 + 1.2, tid=8)]), T0 + 2)
    m.feed(tick(T0 + 4, [proc(7, T0 + 4)]), T0 + 4)  # the sample of thread 7 matures unclaimed
    m.feed(done(7, T0 + 5, [req("/a", 0.5, T0 + 1.2, tid=7)]), T0 + 5)
    snap = m.snapshot(T0 + 5)
    assert hot(snap, "/b") == {"b_work (app.py:10)": (1, 1)}
    assert route(snap, "/a").hot_frames == ()


def test_hot_frames_are_bounded_per_route() -> None:
    m = attached(hot_frames_kept=50)
    m.feed(flying(7, T0, [("/x", 7, T0)]), T0)
    for i in range(2000):
        t = T0 + i * 0.01
        m.feed(sample(7, t, [(7, app_frames(f"f{i}", "common"))]), t)
    m.feed(tick(T0 + 30, [proc(7, T0 + 30)]), T0 + 30)
    assert m.sizes()["hot_frames"] <= 4 * 50
    h = hot(m.snapshot(T0 + 30), "/x")
    assert h["common (app.py:11)"] == (2000, 0)
    assert len(m.snapshot(T0 + 30).routes[0].hot_frames) == 25


# --------------------------------------------------------------------------- latency

def test_percentiles_are_within_the_sketch_accuracy() -> None:
    rng = random.Random(2)
    m = attached()
    durs = [rng.lognormvariate(-3, 1.2) for _ in range(3000)]
    for i in range(30):
        t = T0 + 1 + i
        m.feed(done(7, t, [req("/r", d, t - 0.5, tid=7) for d in durs[i * 100:(i + 1) * 100]]), t)
    r = route(m.snapshot(T0 + 31), "/r")
    s = sorted(durs)
    for q, got in ((0.5, r.p50_ms), (0.95, r.p95_ms), (0.99, r.p99_ms)):
        true = s[math.floor(q * (len(s) - 1))] * 1000
        assert abs(got - true) <= 0.01 * true + 1e-3, (q, got, true)
        assert got == {0.5: r.total_p50_ms, 0.95: r.total_p95_ms, 0.99: r.total_p99_ms}[q]
    assert r.max_ms == round(max(durs) * 1000, 3)
    assert sum(c for _, c in r.histogram) == 3000
    assert r.count == 3000 and abs(r.rate - 3000 / 31) < 1e-6
    assert [x.duration_ms for x in r.slowest] == sorted((round(d * 1000, 3) for d in durs),
                                                        reverse=True)[:10]


def test_recent_window_forgets_old_requests_and_history_keeps_points() -> None:
    m = attached()
    for i in range(120):
        t = T0 + 1 + i
        d = 0.5 if i < 60 else 0.01  # slow for the first minute, then fast
        m.feed(done(7, t, [req("/r", d, t - 0.1, tid=7)]), t)
    r = route(m.snapshot(T0 + 121), "/r")
    assert r.p99_ms < 11 and r.total_p99_ms > 400
    assert r.count == 120 and abs(r.rate * 60 - 60) <= 6
    ts = [p.t for p in r.history]
    assert ts == sorted(ts) and len(ts) >= 11 and all(b - a == 10 for a, b in zip(ts, ts[1:]))
    assert r.history[0].p50_ms > 400 and r.history[-1].p50_ms < 11


def test_errors_and_totals() -> None:
    m = attached()
    for i in range(10):
        t = T0 + 1 + i
        m.feed(done(7, t, [req("/ok", 0.01, t), req("/boom", 0.01, t, status=500, exc="ValueError"),
                           req("/boom", 0.01, t, status=200, exc="")]), t)
    snap = m.snapshot(T0 + 11)
    boom = route(snap, "/boom")
    assert boom.errors == 10 and boom.error_rate == 0.5
    assert abs(snap.rps - 30 / 11) < 1e-6 and abs(snap.error_rate - 1 / 3) < 1e-9
    [p] = [p for p in snap.problems if p.kind == "error_rate"]
    assert p.route == "/boom" and "ValueError" in p.summary and "50%" in p.summary


# --------------------------------------------------------------------------- slow routes

def load(m, mix, seconds: int, workers=(7, 8, 9, 10)) -> None:
    """mix: (route, duration, per second)."""
    for i in range(seconds):
        t = T0 + 1 + i
        for k, pid in enumerate(workers):
            reqs = [req(r, d, t - 0.05 * j, tid=pid) for r, d, n in mix
                    for j in range(n // len(workers) + (k < n % len(workers)))]
            m.feed(done(pid, t, reqs), t)


def slow_routes(m, now) -> List[str]:
    snap = m.snapshot(now)
    flagged = [r.route for r in snap.routes if r.slow]
    assert flagged == [p.route for p in snap.problems if p.kind == "slow_route"]
    return flagged


def test_slow_by_share_with_sub_second_latency() -> None:
    m = attached(pids=(7, 8, 9, 10))
    load(m, [("/report", 0.3, 9), ("/fast/<int:n>", 0.004, 60), ("/health", 0.001, 4)], 60)
    snap = m.snapshot(T0 + 61)
    assert 0.6 < snap.utilization < 0.8
    assert slow_routes(m, T0 + 61) == ["/report"]
    assert snap.routes[0].route == "/report" and snap.routes[0].share > 0.9
    [p] = [p for p in snap.problems if p.kind == "slow_route"]
    assert abs(snap.routes[0].p95_ms - 300) <= 3
    assert f"p95 {snap.routes[0].p95_ms:.0f} ms" in p.summary and "92% of the workers' busy" in p.summary


def test_no_false_slow_route_when_all_routes_are_fast_and_workers_idle() -> None:
    m = attached(pids=(7, 8, 9, 10))
    load(m, [("/a", 0.09, 2), ("/b", 0.002, 20), ("/c", 0.004, 10), ("/d", 0.03, 5)], 60)
    snap = m.snapshot(T0 + 61)
    assert snap.utilization < 0.15
    assert slow_routes(m, T0 + 61) == []
    assert snap.problems == ()


def test_a_route_far_slower_than_the_rest_is_slow_once_workers_are_busy() -> None:
    pids = tuple(range(7, 15))
    quiet = attached(pids=pids)
    load(quiet, [("/x", 0.4, 1), ("/a", 0.005, 20), ("/b", 0.004, 20)], 60, workers=pids)
    assert quiet.snapshot(T0 + 61).utilization < 0.1
    assert slow_routes(quiet, T0 + 61) == []  # 400 ms but the workers are nearly idle
    busy = attached(pids=(7, 8, 9, 10))
    load(busy, [("/x", 0.4, 1), ("/a", 0.02, 30), ("/b", 0.02, 30)], 60)
    snap = busy.snapshot(T0 + 61)
    assert route(snap, "/x").share < 0.3 and snap.utilization > 0.3
    assert slow_routes(busy, T0 + 61) == ["/x"]
    [p] = [p for p in snap.problems if p.kind == "slow_route"]
    assert "20x the typical route's 20 ms" in p.summary


def test_slow_for_users_whatever_the_load() -> None:
    m = attached(pids=(7, 8, 9, 10))
    load(m, [("/export", 2.5, 1), ("/a", 0.005, 20)], 60)
    assert slow_routes(m, T0 + 61) == ["/export"]


# --------------------------------------------------------------------------- route cap

def test_a_million_distinct_route_names_keep_memory_bounded() -> None:
    m = attached(max_routes=200)
    n = 1_000_000
    batch = 250
    for b in range(n // batch):
        t = T0 + 1 + b * 0.001
        m.feed(done(7, t, [req(f"/u/{b * batch + i}\u202e<script>", 0.001, t, tid=7)
                           for i in range(batch)]), t)
    snap = m.snapshot(T0 + 30)
    sizes = m.sizes()
    assert sizes["routes"] == 201 and len(snap.routes) == 201
    other = route(snap, "<other>")
    assert other.count == n - 200 and other.method == "*"
    assert abs(snap.routes_dropped - (n - 200)) < 0.1 * n
    assert sizes["distinct_dropped"] <= 1024 and sizes["per_worker_maps"] < 300
    assert sizes["sketch_buckets"] < 201 * 7 * 10


def test_a_route_first_seen_when_the_table_is_full_takes_the_row_of_one_idle_for_a_window() -> None:
    m = attached(max_routes=3)
    t = T0 + 1
    m.feed(done(7, t, [req(r, 0.01, t) for r in ("/a", "/b", "/c")]), t)
    m.feed(done(7, t + 1, [req("/d", 0.01, t + 1)]), t + 1)  # all three busy: it folds
    assert {r.route for r in m.snapshot(t + 1).routes} == {"/a", "/b", "/c", "<other>"}
    # A window later /a keeps serving and /b is being sampled (a request stuck in it); /c
    # had nothing for a whole window, so a new route takes its row.
    late = t + 75
    m.feed(done(7, late, [req("/a", 0.01, late)]), late)
    m.feed(flying(7, late, [("/b", 9, late - 70)]), late)
    for i in range(3):
        m.feed(sample(7, late + i, [(9, app_frames("wait_for_lock"))]), late + i)
    m.feed(done(7, late + 3, [req("/e", 0.02, late + 3)]), late + 3)
    m.feed(done(7, late + 4, [req("/f", 0.02, late + 4)]), late + 4)  # nothing else idle
    snap = m.snapshot(late + 4)
    assert {r.route for r in snap.routes} == {"/a", "/b", "/e", "<other>"}
    assert route(snap, "/e").count == 1
    assert route(snap, "<other>").count == 3  # /d, what /c counted, then /f
    assert sum(r.count for r in snap.routes) == snap.workers[0].requests_served == 7
    assert snap.routes_dropped == 3  # /d, /c, /f
    assert m.sizes()["routes_evicted"] == 1 and m.sizes()["routes"] == 4


def test_of_the_idle_routes_the_one_with_fewest_requests_gives_up_its_row_first() -> None:
    """A flood of one-request names churns among itself: a real route that paused keeps its
    row (and its since-attach history) while a junk name idle for as long can give one up."""
    m = attached(max_routes=3)
    t = T0 + 1
    m.feed(done(7, t, [req("/real", 0.01, t) for _ in range(50)]), t)
    m.feed(done(7, t + 15, [req("/j1", 0.01, t + 15)]), t + 15)  # slots are 10 s
    m.feed(done(7, t + 25, [req("/j2", 0.01, t + 25)]), t + 25)
    late = t + 100  # all three idle for a whole window; /real the longest
    m.feed(done(7, late, [req("/n1", 0.01, late)]), late)
    snap = m.snapshot(late)
    assert {r.route for r in snap.routes} == {"/real", "/j2", "/n1", "<other>"}  # /j1 first
    assert route(snap, "<other>").count == 1
    m.feed(done(7, late + 1, [req("/n2", 0.01, late + 1)]), late + 1)
    snap = m.snapshot(late + 1)
    assert {r.route for r in snap.routes} == {"/real", "/n1", "/n2", "<other>"}
    assert route(snap, "/real").count == 50 and route(snap, "<other>").count == 2
    # with no one-request route idle, the real one goes too rather than hide a new route
    m.feed(done(7, late + 2, [req("/n3", 0.01, late + 2)]), late + 2)
    snap = m.snapshot(late + 2)
    assert {r.route for r in snap.routes} == {"/n1", "/n2", "/n3", "<other>"}
    assert route(snap, "<other>").count == 52
    assert sum(r.count for r in snap.routes) == snap.workers[0].requests_served == 55


def test_distinct_count_is_exact_while_small() -> None:
    m = attached(max_routes=2)
    t = T0 + 1
    m.feed(done(7, t, [req(f"/r{i % 7}", 0.01, t) for i in range(100)]), t)
    assert m.snapshot(t).routes_dropped == 5


# --------------------------------------------------------------------------- the whole

def busy_day(m) -> None:
    rng = random.Random(9)
    born = {9: T0 + 40}
    for i in range(90):
        t = T0 + i
        pids = [7, 8] if i < 40 else [8, 9]
        m.feed(tick(t, [proc(p, t, created=born.get(p, T0 - 100), rss_mb=100 + i * (p == 8),
                             num_fds=10, cpu_percent=float("nan")) for p in pids]), t)
        for p in pids:
            m.feed(done(p, t, [req(r, rng.expovariate(20), t - rng.random(), tid=p,
                                   status=500 if rng.random() < 0.1 else 200)
                               for r in ("/a", "/b/<int:x>", "/c") for _ in range(3)]), t + 0.1)
            m.feed(flying(p, t + 0.2, [("/c", p, t - 0.1)]), t + 0.2)
            m.feed(sample(p, t + 0.3, [(p, app_frames("work", "c"))]), t + 0.3)


def test_snapshot_json_round_trips_without_nan() -> None:
    m = model()
    busy_day(m)
    text = m.snapshot(T0 + 90).to_json()

    def no_constant(name: str) -> None:
        raise AssertionError(name)

    d = json.loads(text, parse_constant=no_constant)
    assert d["routes"] and d["workers"] and d["events"] and d["problems"]
    assert d["sources"]["beacon"]["state"] == "ok"
    assert json.loads(m.snapshot(T0).to_json(indent=None))["t"] == T0


def test_same_events_give_the_same_snapshot() -> None:
    a, b = model(), model()
    busy_day(a)
    busy_day(b)
    assert a.snapshot(T0 + 90) == b.snapshot(T0 + 90)
    assert a.snapshot(T0 + 90).to_json() == b.snapshot(T0 + 90).to_json()


def test_snapshot_does_not_change_the_model() -> None:
    a, b = model(), model()
    busy_day(a)
    busy_day(b)
    for k in range(5):
        a.snapshot(T0 + 80 + k)
    a.feed(done(8, T0 + 91, [req("/a", 0.2, T0 + 90.5, tid=8)]), T0 + 91)
    b.feed(done(8, T0 + 91, [req("/a", 0.2, T0 + 90.5, tid=8)]), T0 + 91)
    assert a.snapshot(T0 + 95) == b.snapshot(T0 + 95)


def test_hostile_strings_stay_strings_and_odd_numbers_are_dropped() -> None:
    m = attached()
    names = ["[bold red]x[/]", "\x1b[31m/red", "/" + "\u0301" * 199, "<other>", '{"k":1}']
    t = T0 + 1
    reqs = [req(n, 0.01, t, tid=7) for n in names]
    reqs += [req("/nan", float("nan"), t), req("/inf", float("inf"), t),
             req("/neg", -1.0, t), req("/when", 0.1, float("inf"))]
    m.feed(done(7, t, reqs), t)
    m.feed(flying(7, t, [("/nan-start", 7, float("nan")), ("[link]", 8, t - 1)]), t)
    snap = m.snapshot(t)
    assert sorted(r.route for r in snap.routes) == sorted(names)
    w = next(w for w in snap.workers if w.pid == 7)
    assert w.requests_served == len(names)
    assert [v.route for v in w.in_flight_all] == ["[link]"]
    d = json.loads(snap.to_json())
    assert sorted(r["route"] for r in d["routes"]) == sorted(names)
