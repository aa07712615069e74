from __future__ import annotations

from flasktop.model.events import ListenerStats, SourceState
from tests.model.helpers import T0, done, flying, model, proc, req, sample, tick, app_frames


def stats(t: float, lost: int = 0, received: int = 10, kernel: int = 0) -> ListenerStats:
    return ListenerStats(t, "127.0.0.1:9711", received, received, received * 3,
                         (("bad_json", 2),), lost, kernel, 2, 1000)


def state(m, name: str, now: float):
    s = m.snapshot(now).source(name)
    return (s.state, s.detail)


def test_beacon_waits_then_is_ok_then_degraded_by_losses_then_silence() -> None:
    m = model()
    m.feed(tick(T0, [proc(7, T0)]), T0)
    m.feed(stats(T0), T0)
    st, detail = state(m, "beacon", T0)
    assert st == "waiting" and "127.0.0.1:9711" in detail and "Beacon" in detail
    m.feed(flying(7, T0 + 1, []), T0 + 1)
    m.feed(stats(T0 + 1), T0 + 1)
    assert state(m, "beacon", T0 + 1)[0] == "ok"
    m.feed(stats(T0 + 2, lost=3), T0 + 2)
    st, detail = state(m, "beacon", T0 + 2)
    assert st == "degraded" and "lost 3" in detail
    for i in range(3, 70):
        m.feed(flying(7, T0 + i, []), T0 + i)
        m.feed(stats(T0 + i, lost=3), T0 + i)
    assert state(m, "beacon", T0 + 69)[0] == "ok"  # the losses are more than a minute old
    st, detail = state(m, "beacon", T0 + 90)
    assert st == "degraded" and "no datagram for 21 s" in detail


def test_app_side_drops_since_attach_are_summed_and_degrade_the_beacon() -> None:
    """The beacon's count is cumulative: for workers that predate flasktop, their first
    report is the baseline (what they dropped while nobody watched is not ours); a worker
    born since was watched all along, so all of its count is."""
    m = model()
    m.feed(tick(T0, [proc(7, T0), proc(8, T0)]), T0)
    m.feed(flying(7, T0 + 1, [], dropped=5), T0 + 1)
    m.feed(flying(8, T0 + 1, [], dropped=2), T0 + 1)
    m.feed(flying(7, T0 + 2, [], dropped=9), T0 + 2)
    m.feed(tick(T0 + 2, [proc(7, T0 + 2), proc(8, T0 + 2), proc(9, T0 + 2, created=T0 + 1.5)]),
           T0 + 2)
    m.feed(flying(9, T0 + 2, [], dropped=3), T0 + 2)
    m.feed(stats(T0 + 2), T0 + 2)
    snap = m.snapshot(T0 + 2)
    assert snap.beacon.app_dropped == (9 - 5) + 3
    assert snap.beacon.rejected == (("bad_json", 2),) and snap.beacon.last_heard_s == 0.0
    assert snap.source("beacon").state == "degraded"
    assert snap.to_dict()["sources"]["beacon"]["rejected"] == {"bad_json": 2}


def test_datagrams_from_other_pids_are_counted_and_ignored() -> None:
    m = model()
    m.feed(done(4242, T0 - 1, [req("/early", 0.01, T0 - 1.1)]), T0 - 1)  # before any tick: kept
    m.feed(tick(T0, [proc(7, T0), proc(4242, T0)]), T0)
    m.feed(done(999, T0 + 1, [req("/intruder", 0.01, T0 + 0.5)]), T0 + 1)
    m.feed(flying(999, T0 + 1, [("/intruder", 1, T0)]), T0 + 1)
    m.feed(sample(999, T0 + 1, [(999, app_frames("x"))]), T0 + 1)
    assert m.snapshot(T0 + 1).beacon.ignored == 0  # held: the next tick may show a new worker
    m.feed(tick(T0 + 2, [proc(7, T0 + 2), proc(4242, T0 + 2)]), T0 + 2)
    snap = m.snapshot(T0 + 2)
    assert [w.pid for w in snap.workers] == [7, 4242]
    assert [r.route for r in snap.routes] == ["/early"]
    assert snap.beacon.ignored == 2
    assert "not this master's workers" in snap.source("beacon").detail


def test_pyspy_failures_per_pid_are_one_line() -> None:
    m = model()
    m.feed(tick(T0, [proc(p, T0) for p in (7, 8, 9)]), T0)
    assert state(m, "pyspy", T0)[0] == "waiting"
    m.feed(sample(7, T0, [(7, app_frames("x"))]), T0)
    assert state(m, "pyspy", T0)[0] == "ok"
    for pid in (8, 9):
        m.feed(SourceState("pyspy", "denied", f"permission denied on {pid}: run as root", pid), T0)
    st, detail = state(m, "pyspy", T0)
    assert st == "degraded"
    assert detail.startswith("py-spy failed for 2 of 3 workers (8, 9): permission denied on 8")
    m.feed(SourceState("pyspy", "denied", "permission denied on 7: run as root", 7), T0)
    st, detail = state(m, "pyspy", T0)
    assert st == "denied" and detail.startswith("py-spy failed for all 3 workers (7, 8, 9)")
    m.feed(SourceState("pyspy", "missing", "py-spy not found: pip install py-spy"), T0)
    assert state(m, "pyspy", T0) == ("missing", "py-spy not found: pip install py-spy")


def test_psutil_state_and_master_view() -> None:
    m = model()
    assert state(m, "psutil", T0)[0] == "waiting"
    assert m.snapshot(T0).master is None
    m.feed(tick(T0, [proc(7, T0)]), T0)
    assert state(m, "psutil", T0)[0] == "ok"
    master = m.snapshot(T0).master
    assert master.pid == 100 and master.timeout == 30.0 and master.worker_class == "sync"
    m.feed(SourceState("psutil", "degraded", "num_fds: access denied"), T0)
    assert state(m, "psutil", T0) == ("degraded", "num_fds: access denied")


def test_a_new_workers_first_datagrams_wait_for_the_tick_that_shows_it() -> None:
    m = model()
    m.feed(tick(T0, [proc(7, T0)]), T0)
    m.feed(done(8, T0 + 0.5, [req("/first", 0.01, T0 + 0.4, tid=8)]), T0 + 0.5)
    m.feed(flying(8, T0 + 0.6, [("/second", 8, T0 + 0.55)]), T0 + 0.6)
    m.feed(tick(T0 + 1, [proc(7, T0 + 1), proc(8, T0 + 1, created=T0 + 0.3)]), T0 + 1)
    snap = m.snapshot(T0 + 1)
    w8 = next(w for w in snap.workers if w.pid == 8)
    assert w8.requests_served == 1 and w8.in_flight.route == "/second"
    assert [r.route for r in snap.routes] == ["/first"] and snap.beacon.ignored == 0
    assert abs(snap.beacon.last_heard_s - 0.4) < 1e-6


def test_held_datagrams_are_bounded() -> None:
    m = model(max_held_datagrams=10)
    m.feed(tick(T0, [proc(7, T0)]), T0)
    for i in range(100):
        m.feed(done(1000 + i, T0 + 0.5, [req("/x", 0.01, T0 + 0.4)]), T0 + 0.5)
    assert m.sizes()["held_datagrams"] == 10 and m.snapshot(T0 + 0.5).beacon.ignored == 90
    m.feed(tick(T0 + 1, [proc(7, T0 + 1)]), T0 + 1)
    assert m.sizes()["held_datagrams"] == 0 and m.snapshot(T0 + 1).beacon.ignored == 100


def test_datagrams_flasktop_dropped_itself_have_their_own_field() -> None:
    m = model()
    m.feed(tick(T0, [proc(7, T0)]), T0)
    m.feed(flying(7, T0, []), T0)
    m.feed(ListenerStats(T0 + 1, "127.0.0.1:9711", 10, 10, 10, dropped_backlog=7, lost=2), T0 + 1)
    snap = m.snapshot(T0 + 1)
    assert snap.beacon.dropped_backlog == 7 and snap.beacon.lost == 2
    assert snap.to_dict()["sources"]["beacon"]["dropped_backlog"] == 7
    st, detail = state(m, "beacon", T0 + 1)
    assert st == "degraded" and "lost 9" in detail and "7 dropped by flasktop itself" in detail
