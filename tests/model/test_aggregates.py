"""Kind "a": requests the beacon counted per latency bucket fold like requests sent one by one,
except for what needs a request's own times (slowest, recent, stack attribution)."""

from __future__ import annotations

import math
import random
import struct
from array import array
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flasktop.model.sketch import Sketch
from flasktop.protocol import (
    AGG_MAX_KEY, AGG_ZERO, UNMATCHED, Aggregate, Datagram, Encoder, bucket_of, decode,
    duration_words, high_bytes,
)
from tests.model.helpers import T0, agg, counted, done, model, proc, req, tick


def attached(pids=(7,), **kw):
    m = model(**kw)
    m.feed(tick(T0, [proc(p, T0) for p in pids]), T0)
    return m


def route(snap, name):
    return next(r for r in snap.routes if r.route == name)


def quantile(durs: List[float], q: float) -> float:
    s = sorted(durs)
    return s[math.floor(q * (len(s) - 1))]


def lognormal(n: int, seed: int = 2) -> List[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(-3, 1.2) for _ in range(n)]


def test_a_route_fed_only_aggregates() -> None:
    m = attached()
    durs = lognormal(3000)
    for i in range(30):
        t = T0 + 1 + i
        part = durs[i * 100:(i + 1) * 100]
        # one row per thread, as the beacon keys rows by (route, status, thread)
        m.feed(counted(7, t, [agg("/r", part[:60], t, tid=7), agg("/r", part[60:], t, tid=8)]), t)
    snap = m.snapshot(T0 + 31)
    r = route(snap, "/r")
    assert r.count == 3000 and abs(r.rate - 3000 / 31) < 1e-6
    assert abs(snap.rps - 3000 / 31) < 1e-6
    for q, got, total in ((0.5, r.p50_ms, r.total_p50_ms), (0.95, r.p95_ms, r.total_p95_ms),
                          (0.99, r.p99_ms, r.total_p99_ms)):
        true = quantile(durs, q) * 1000
        assert abs(got - true) <= 0.02 * true, (q, got, true)
        assert got == total
    assert abs(r.max_ms - max(durs) * 1000) <= 0.01 * max(durs) * 1000
    assert sum(c for _, c in r.histogram) == 3000
    assert r.errors == 0 and r.error_rate == 0.0
    assert r.slowest == ()  # no individual times
    w = snap.workers[0]
    assert w.requests_served == 3000 and w.recent_requests == ()
    assert r.history and sum(p.count for p in r.history) <= 3000


def test_aggregated_errors_count() -> None:
    m = attached()
    for i in range(10):
        t = T0 + 1 + i
        m.feed(counted(7, t, [agg("/ok", [0.01], t),
                              agg("/boom", [0.01, 0.02], t, status=500, exc="ValueError"),
                              agg("/boom", [0.01, 0.02], t, status=200),
                              agg("/boom", [0.01], t, status=503)]), t)
    snap = m.snapshot(T0 + 11)
    boom = route(snap, "/boom")
    assert boom.count == 50 and boom.errors == 30 and abs(boom.error_rate - 0.6) < 1e-9
    assert abs(snap.rps - 60 / 11) < 1e-6 and abs(snap.error_rate - 0.5) < 1e-9
    [p] = [p for p in snap.problems if p.kind == "error_rate"]
    assert p.route == "/boom" and "ValueError" in p.summary


def test_mixing_events_and_aggregates_matches_all_events() -> None:
    """The beacon sends slow, failed and sampled requests one by one, the rest aggregated:
    the route's numbers match those of every request sent one by one."""
    rng = random.Random(5)
    both, single = attached(pids=(7, 8)), attached(pids=(7, 8))
    for i in range(40):
        t = T0 + 1 + i
        for pid in (7, 8):
            durs = [rng.lognormvariate(-4, 1.0) for _ in range(50)]
            statuses = [500 if rng.random() < 0.05 else 200 for _ in durs]
            ends = [t - 0.1 - 0.001 * j for j in range(len(durs))]
            reqs = [req("/m", d, e, tid=pid, status=s) for d, e, s in zip(durs, ends, statuses)]
            single.feed(done(pid, t, reqs), t)
            alone = [r for j, r in enumerate(reqs)
                     if r.duration_s > 0.05 or r.status >= 500 or j % 10 == 0]
            fast = [r.duration_s for r in reqs if r not in alone]
            both.feed(done(pid, t, alone), t)
            both.feed(counted(pid, t, [agg("/m", fast, t, tid=pid)]), t)
    a, b = route(both.snapshot(T0 + 41), "/m"), route(single.snapshot(T0 + 41), "/m")
    assert (a.count, a.errors, a.rate, a.error_rate) == (b.count, b.errors, b.rate, b.error_rate)
    for x, y in ((a.p50_ms, b.p50_ms), (a.p95_ms, b.p95_ms), (a.p99_ms, b.p99_ms),
                 (a.total_p50_ms, b.total_p50_ms), (a.total_p95_ms, b.total_p95_ms),
                 (a.total_p99_ms, b.total_p99_ms), (a.max_ms, b.max_ms)):
        assert abs(x - y) <= 0.02 * y, (x, y)
    assert a.histogram == b.histogram
    assert a.slowest == b.slowest  # the slowest all went one by one
    sa, sb = both.snapshot(T0 + 41), single.snapshot(T0 + 41)
    assert sa.rps == sb.rps and sa.error_rate == sb.error_rate
    assert [w.requests_served for w in sa.workers] == [w.requests_served for w in sb.workers]
    assert abs(sa.utilization - sb.utilization) <= 0.01 * sb.utilization


def test_the_route_cap_holds_with_aggregates() -> None:
    m = attached(max_routes=200)
    n = 0
    for b in range(100):
        t = T0 + 1 + b * 0.01
        aggs = [agg(f"/u/{b * 50 + i}", [0.001] * (1 + i % 3), t, tid=7) for i in range(50)]
        n += sum(a.count for a in aggs)
        m.feed(counted(7, t, aggs), t)
    snap = m.snapshot(T0 + 3)
    sizes = m.sizes()
    assert sizes["routes"] == 201 and len(snap.routes) == 201
    assert sum(r.count for r in snap.routes) == n == snap.workers[0].requests_served
    assert route(snap, "<other>").method == "*"
    assert abs(snap.routes_dropped - (5000 - 200)) < 0.1 * 5000  # an estimate past 1024
    assert sizes["per_worker_maps"] < 300


def test_another_sketch_accuracy_rekeys_the_buckets() -> None:
    durs = lognormal(2000, seed=3)
    for acc in (0.02, 0.005):
        m = attached(sketch_accuracy=acc)
        t = T0 + 1
        m.feed(counted(7, t, [agg("/r", durs, t)]), t)
        r = route(m.snapshot(t), "/r")
        assert r.count == 2000
        for q, got in ((0.5, r.p50_ms), (0.95, r.p95_ms), (0.99, r.p99_ms)):
            true = quantile(durs, q) * 1000
            assert abs(got - true) <= (0.01 + acc) * true * 1.001, (acc, q, got, true)


def test_zero_bucket_and_extreme_keys() -> None:
    m = attached()
    t = T0 + 1
    top = Aggregate("/r", "r", "GET", 200, "", 7, t - 1, t, ((AGG_ZERO, 5), (AGG_MAX_KEY, 1),
                                                             (-AGG_MAX_KEY + 1, 4)))
    m.feed(counted(7, t, [top]), t)
    r = route(m.snapshot(t), "/r")
    assert r.count == 10 and r.p50_ms == 0.0 and r.max_ms > 1e9
    assert sum(c for _, c in r.histogram) == 10


def test_hand_made_oddities_are_dropped_never_raise() -> None:
    m = attached()
    t = T0 + 1
    odd = [
        Aggregate("/a", "a", "GET", 200, "", 7, t, t, ((5, 0), (5, -3), (AGG_MAX_KEY + 1, 2),
                                                       (-AGG_MAX_KEY - 1, 2), (True, 1), (5, 1.5),
                                                       (10 ** 9, 1), (5, 2))),
        Aggregate("/b", "b", "GET", 200, "", 7, t, float("inf"), ((5, 1),)),
        Aggregate("/c", "c", "GET", 200, "", 7, t, float("nan"), ((5, 1),)),
        Aggregate("/d", "d", "GET", 200, "", 7, t, t, ()),
        Aggregate(UNMATCHED, "", "GET", 404, "", 7, t, t, ((bucket_of(0.002), 3),)),
    ]
    m.feed(counted(7, t, odd), t)
    snap = m.snapshot(t)
    assert {r.route: r.count for r in snap.routes} == {"/a": 2, UNMATCHED: 3}
    assert snap.workers[0].requests_served == 5


def test_aggregates_feed_the_leak_route_correlation() -> None:
    """A worker whose requests come only as aggregates still names the route that leaks."""
    rng = random.Random(11)
    m = model()
    rss = 200.0
    for i in range(240):
        t = T0 + i
        aggs = [agg("/fast/<int:n>", [0.003] * rng.randint(3, 8), t - 0.5, tid=7, span=0.1)]
        if rng.random() < 0.3:
            aggs.append(agg("/leak", [0.02], t - 0.5, tid=7, span=0.1))
            rss += 1.0
        m.feed(counted(7, t, aggs), t + 0.2)
        m.feed(tick(t + 0.3, [proc(7, t + 0.3, rss_mb=rss + rng.gauss(0, 0.02))]), t + 0.3)
    w = m.snapshot(T0 + 240).workers[0]
    assert w.leak_suspected and w.leak_routes and w.leak_routes[0][0] == "/leak"
    assert "/fast/<int:n>" not in dict(w.leak_routes)


def test_held_until_the_tick_that_confirms_the_worker() -> None:
    m = attached()
    t = T0 + 1
    m.feed(counted(9, t, [agg("/r", [0.01] * 4, t, tid=9)]), t)
    assert m.snapshot(t).routes == ()
    m.feed(tick(t + 0.5, [proc(7, t + 0.5), proc(9, t + 0.5)]), t + 0.5)
    snap = m.snapshot(t + 0.5)
    assert route(snap, "/r").count == 4
    assert {w.pid: w.requests_served for w in snap.workers} == {7: 0, 9: 4}


def test_decoded_datagrams_fold() -> None:
    """The beacon's encoding, decoded, folds into the counts it encoded (split rows too)."""
    durs = lognormal(5000, seed=8)
    buckets: dict = {}
    for d in durs:
        buckets[bucket_of(d)] = buckets.get(bucket_of(d), 0) + 1
    ms = 1_700_000_001_000
    rows: List[list] = [["/r", "r", "GET", 200, "", 7, 150, sorted(buckets.items())]] * 3
    wire = Encoder(7).aggregates(ms, rows)
    assert len(wire) > 1
    m = attached()
    got: List[Tuple[Datagram, float]] = []
    for data in wire:
        dg = decode(data)
        assert isinstance(dg, Datagram)
        got.append((dg, ms / 1000))
    for dg, t in got:
        m.feed(dg, t)
    r = route(m.snapshot(ms / 1000), "/r")
    assert r.count == 15000
    sk = Sketch(0.01)
    for d in durs:
        sk.add(d, 3)
    assert r.p95_ms == round(sk.quantile(0.95) * 1000, 3)


@pytest.mark.parametrize("kind", ["d", "h"])
def test_decoded_durations_fold_as_the_aggregates_of_the_same_requests(kind: str) -> None:
    """Kinds "d" and "h" (a busy flush's durations, bucketed by decode()) fold exactly as
    kind "a" rows of the same requests: counts, quantiles and histogram."""
    # one top byte, as a busy flush's durations have (30.5 us to 2 s)
    raw = array("d", (min(max(d, 31e-6), 1.9) for d in lognormal(5000, seed=9)))
    row = ["/r", "r", "GET", 200, "", 7, 150]
    ms = 1_700_000_001_000
    if kind == "d":
        wire_d, keep = Encoder(7).durations(ms, [row + [duration_words(raw)]]), 4
    else:
        wire_d, keep = Encoder(7).high_bytes(ms, [row + [high_bytes(raw)]]), 3
    assert len(wire_d) > 1  # split: a datagram holds a few hundred
    # what the kind keeps of each: the top bytes of its binary64, the rest zero
    durs = [struct.unpack("<d", bytes(8 - keep) + struct.pack("<d", d)[8 - keep:])[0] for d in raw]
    buckets: dict = {}
    for d in durs:
        buckets[bucket_of(d)] = buckets.get(bucket_of(d), 0) + 1
    wire_a = Encoder(7).aggregates(ms, [["/r", "r", "GET", 200, "", 7, 150, sorted(buckets.items())]])
    snaps = []
    for wire in (wire_d, wire_a):
        m = attached()
        for data in wire:
            dg = decode(data)
            assert isinstance(dg, Datagram)
            m.feed(dg, ms / 1000)
        snaps.append(route(m.snapshot(ms / 1000), "/r"))
    d, a = snaps
    assert d.count == a.count == 5000
    assert (d.p50_ms, d.p95_ms, d.p99_ms, d.max_ms) == (a.p50_ms, a.p95_ms, a.p99_ms, a.max_ms)
    assert d.histogram == a.histogram


def test_bounded_under_a_flood_of_aggregates() -> None:
    m = attached(max_routes=50)
    rng = random.Random(1)
    for i in range(2000):
        t = T0 + 1 + i * 0.05
        aggs = [Aggregate(f"/r{rng.randrange(500)}", "e", rng.choice(["GET", "POST"]),
                          rng.randrange(1000), rng.choice(["", "E"]), rng.randrange(1, 5000),
                          t - rng.random() * 86400, t,
                          tuple((rng.choice([AGG_ZERO, rng.randint(-AGG_MAX_KEY + 1, AGG_MAX_KEY)]),
                                 rng.randint(1, 1 << 31)) for _ in range(rng.randint(1, 30))))
                for _ in range(10)]
        m.feed(counted(7, t, aggs), t)
    sizes = m.sizes()
    assert sizes["routes"] == 51
    assert sizes["per_worker_maps"] <= 64 + 10
    assert sizes["sketch_buckets"] <= 51 * (6 + 1) * 2048
    m.snapshot(T0 + 101).to_json()


keys = st.one_of(st.just(AGG_ZERO), st.integers(-AGG_MAX_KEY + 1, AGG_MAX_KEY))
rows = st.lists(st.tuples(
    st.sampled_from(["/a", "/b", UNMATCHED, "<pending>", "<other>", "/" + "x" * 199]),
    st.sampled_from(["GET", "POST", "*"]), st.integers(0, 999),
    st.sampled_from(["", "E"]), st.integers(1, 1 << 32), st.integers(0, 86_400_000),
    st.lists(st.tuples(keys, st.integers(1, 1 << 31)), min_size=1, max_size=300)),
    max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(rows, st.integers(1_000_000_000_000, 7_258_118_400_000),
                          st.floats(-1e6, 1e6)), max_size=5))
def test_any_decoded_aggregate_folds_without_raising(batches: list) -> None:
    m = attached(max_routes=3, sketch_max_buckets=64)
    total = 0
    for rs, ms, skew in batches:
        wire = Encoder(7).aggregates(ms, [[r, r, meth, st_, exc, tid, span, b]
                                          for r, meth, st_, exc, tid, span, b in rs])
        for data in wire:
            dg = decode(data)
            assert isinstance(dg, Datagram)
            total += sum(a.count for a in dg.aggregates)
            m.feed(dg, ms / 1000 + skew)
    snap = m.snapshot(T0 + 10)
    snap.to_json()
    assert snap.workers[0].requests_served == total
    assert sum(r.count for r in snap.routes) == total
    sizes = m.sizes()
    assert sizes["routes"] <= 4 and sizes["per_worker_maps"] <= 64
