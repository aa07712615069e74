from __future__ import annotations

from flasktop.model.events import Frame
from flasktop.protocol import GunicornSettings
from flasktop.model.snapshot import BUSY, IDLE, STARTING, STOPPED, STUCK, UNKNOWN
from tests.model.helpers import (
    IDLE_FRAMES, REQUEST_FRAMES, T0, app_frames, done, flying, gconf, model, proc, req, sample, tick,
)


def attached(pids=(7,), config=None, **kw):
    m = model(**kw)
    m.feed(tick(T0, [proc(p, T0) for p in pids], config), T0)
    return m


def worker(m, pid, now):
    return next(w for w in m.snapshot(now).workers if w.pid == pid)


def history(m, route, durations, pid=7, t=T0 + 1):
    m.feed(done(pid, t, [req(route, d, t - 0.01 * i, tid=pid) for i, d in enumerate(durations)]), t)


def test_always_slow_route_within_its_normal_range_is_busy_not_stuck() -> None:
    m = attached()
    history(m, "/report", [7.0 + 0.05 * i for i in range(40)])  # p95 ~ 9 s
    m.feed(flying(7, T0 + 2, [("/report", 7, T0 + 2)]), T0 + 2)
    w = worker(m, 7, T0 + 12)
    assert w.state == BUSY and w.stuck_for_s is None
    assert w.in_flight is not None and w.in_flight.route == "/report"
    assert abs(w.in_flight.elapsed_s - 10.0) < 1e-6
    assert not [p for p in m.snapshot(T0 + 12).problems if p.kind == "stuck_worker"]


def test_a_hang_on_a_fast_route_is_stuck_and_says_where() -> None:
    m = attached()
    history(m, "/orders/<int:oid>", [0.01] * 40)
    m.feed(flying(7, T0 + 2, [("/orders/<int:oid>", 7, T0 + 2)]), T0 + 2)
    m.feed(sample(7, T0 + 3, [(7, app_frames("wait_for_lock", "get_order"))]), T0 + 3)
    assert worker(m, 7, T0 + 4).state == BUSY  # 2 s: below the floor (3 s with timeout 30)
    w = worker(m, 7, T0 + 7)
    assert w.state == STUCK and abs(w.stuck_for_s - 5.0) < 1e-6
    assert w.stack is not None and w.stack[0] == "wait_for_lock (app.py:10)"
    [p] = [p for p in m.snapshot(T0 + 7).problems if p.kind == "stuck_worker"]
    assert p.pid == 7 and p.route == "/orders/<int:oid>"
    assert "GET /orders/<int:oid>" in p.summary and "wait_for_lock (app.py:10)" in p.summary


def test_without_route_history_only_half_the_timeout_makes_stuck() -> None:
    m = attached(config=gconf(timeout=60))
    m.feed(flying(7, T0 + 1, [("/export", 7, T0 + 1)]), T0 + 1)
    assert worker(m, 7, T0 + 29).state == BUSY
    assert worker(m, 7, T0 + 31).state == STUCK


def test_the_beacons_gunicorn_settings_beat_a_process_title() -> None:
    """setproctitle hid the master's arguments: flasktop assumed gunicorn's default timeout
    (30 s). A worker's beacon reports the 10 s gunicorn really runs with: the judgement and
    the header use it, no longer marked assumed."""
    titled = gconf(timeout=None, args_hidden=True, cmdline=("gunicorn: master [app]",))
    m = attached(config=titled)
    assert m.snapshot(T0).master.timeout_assumed
    report = flying(7, T0 + 1, [("/export", 7, T0 + 1)])
    m.feed(report._replace(gunicorn=GunicornSettings(10.0, 3, 4, 500, "gthread")), T0 + 1)
    assert worker(m, 7, T0 + 5).state == BUSY
    assert worker(m, 7, T0 + 7).state == STUCK  # half of 10 s, not of an assumed 30 s
    master = m.snapshot(T0 + 7).master
    assert (master.timeout, master.timeout_assumed, master.workers, master.threads,
            master.worker_class, master.max_requests) == (10.0, False, 3, 4, "gthread", 500)
    m.feed(tick(T0 + 8, [proc(7, T0 + 8)], titled), T0 + 8)  # the poller's next reading
    assert m.snapshot(T0 + 8).master.timeout == 10.0


def test_timeout_0_is_no_timeout_not_an_instant_one() -> None:
    """gunicorn --timeout 0 never kills a silent worker. A long request is busy, never
    "past half the timeout"; a hang far past its route's usual time is still stuck; and a
    worker that exits mid-request was not killed by a timeout."""
    m = attached(config=gconf(timeout=0))
    m.feed(flying(7, T0 + 1, [("/export", 7, T0 + 1)]), T0 + 1)
    assert worker(m, 7, T0 + 600).state == BUSY  # no history: nothing to call it stuck by
    history(m, "/orders/<int:oid>", [0.01] * 40, pid=8, t=T0 + 1)
    m.feed(tick(T0 + 1, [proc(7, T0 + 1), proc(8, T0 + 1)], gconf(timeout=0)), T0 + 1)
    m.feed(flying(8, T0 + 2, [("/orders/<int:oid>", 8, T0 + 2)]), T0 + 2)
    assert worker(m, 8, T0 + 3).state == BUSY
    snap = m.snapshot(T0 + 5)
    assert next(w for w in snap.workers if w.pid == 8).state == STUCK  # 3 s: the 2 s floor
    [p] = [p for p in snap.problems if p.kind == "stuck_worker"]
    assert p.pid == 8 and "(no timeout)" in p.summary
    assert snap.master.timeout == 0.0 and not snap.master.timeout_assumed
    for i in range(6, 12):  # worker 7 vanishes 600 s into its request
        m.feed(tick(T0 + 600 + i, [proc(8, T0 + 600 + i)], gconf(timeout=0)), T0 + 600 + i)
    kinds = [e.kind for e in m.snapshot(T0 + 612).events]
    assert "exited" in kinds and "timeout_killed" not in kinds


def test_request_that_began_before_attach_is_stuck_with_its_true_age() -> None:
    m = model()
    m.feed(flying(7, T0 + 0.5, [("/export", 7, T0 - 100)]), T0 + 0.5)  # before any tick
    m.feed(tick(T0 + 1, [proc(7, T0 + 1)]), T0 + 1)
    w = worker(m, 7, T0 + 2)
    assert w.state == STUCK
    assert w.in_flight.start == T0 - 100 and abs(w.stuck_for_s - 102.0) < 1e-6
    assert w.in_flight.source == "beacon"


def test_no_beacon_unchanged_stack_is_a_lower_bound_on_the_age() -> None:
    m = attached()
    hang = app_frames("wait_for_lock", "export")
    for i in range(21):
        m.feed(sample(7, T0 + i, [(7, hang)]), T0 + i)
    w = worker(m, 7, T0 + 20.5)
    assert w.in_flight is not None and w.in_flight.source == "stack"
    assert w.in_flight.elapsed_s == 20.0 and w.in_flight.start == T0
    assert w.state == STUCK  # at least 20 s: over half the 30 s timeout
    [p] = [p for p in m.snapshot(T0 + 20.5).problems if p.kind == "stuck_worker"]
    assert "at least 20 s" in p.summary and "wait_for_lock" in p.summary


def test_no_beacon_changing_stack_restarts_the_lower_bound() -> None:
    m = attached()
    for i in range(21):
        frames = app_frames("crunch", line=10 + (i == 12))  # one sample at another line
        m.feed(sample(7, T0 + i, [(7, frames)]), T0 + i)
    w = worker(m, 7, T0 + 20)
    assert w.in_flight.elapsed_s == 7.0 and w.state == BUSY  # samples 13..20 match
    m.feed(sample(7, T0 + 21, [(7, IDLE_FRAMES)]), T0 + 21)
    assert worker(m, 7, T0 + 21).state == IDLE


def test_stopped_starting_unknown_and_idle() -> None:
    m = attached(pids=(7, 8))
    t = T0 + 1
    m.feed(tick(t, [proc(7, t, status="stopped"), proc(8, t), proc(9, t, created=t)]), t)
    m.feed(flying(8, t, []), t)
    states = {w.pid: w.state for w in m.snapshot(t).workers}
    assert states == {7: STOPPED, 8: IDLE, 9: STARTING}
    assert {w.pid: w.state for w in m.snapshot(t + 60).workers}[9] == UNKNOWN


def test_tracing_stop_needs_two_readings() -> None:
    m = attached()
    m.feed(tick(T0 + 1, [proc(7, T0 + 1, status="tracing-stop")]), T0 + 1)
    assert worker(m, 7, T0 + 1).state != STOPPED  # py-spy pauses workers for a moment
    m.feed(tick(T0 + 2, [proc(7, T0 + 2, status="tracing-stop")]), T0 + 2)
    assert worker(m, 7, T0 + 2).state == STOPPED


def test_stack_is_the_serving_thread_and_threads_carry_their_requests() -> None:
    m = attached(config=gconf(threads=4))
    m.feed(flying(7, T0 + 1, [("/slow", 8, T0 + 0.5)]), T0 + 1)
    m.feed(sample(7, T0 + 1, [(7, IDLE_FRAMES), (8, app_frames("crunch", "slow"))]), T0 + 1)
    w = worker(m, 7, T0 + 2)
    assert w.stack == tuple(str(f) for f in app_frames("crunch", "slow"))
    by_tid = {th.tid: th for th in w.threads}
    assert by_tid[8].in_flight is not None and by_tid[8].in_flight.route == "/slow"
    assert by_tid[7].in_flight is None and by_tid[7].name == "MainThread"
    m.feed(done(7, T0 + 3, [req("/slow", 2.0, T0 + 2.5, tid=8)]), T0 + 3)
    w = worker(m, 7, T0 + 3)
    assert w.state == IDLE and w.stack == tuple(str(f) for f in IDLE_FRAMES)


def test_completion_ends_the_request_and_a_stale_report_does_not_revive_it() -> None:
    m = attached()
    m.feed(flying(7, T0 + 1, [("/a", 7, T0 + 0.5)]), T0 + 1)
    m.feed(done(7, T0 + 2, [req("/a", 1.2, T0 + 1.7, tid=7)]), T0 + 2)
    assert worker(m, 7, T0 + 2).state == IDLE
    m.feed(flying(7, T0 + 1.5, [("/a", 7, T0 + 0.5)]), T0 + 2.1)  # sent before it completed
    assert worker(m, 7, T0 + 2.2).state == IDLE
    m.feed(flying(7, T0 + 3, [("/b", 7, T0 + 2.8)]), T0 + 3)  # a new one on the same thread
    assert worker(m, 7, T0 + 3).in_flight.route == "/b"


def test_recent_requests_are_bounded_and_newest_first() -> None:
    m = attached(recent_requests=5)
    m.feed(done(7, T0 + 1, [req(f"/r{i}", 0.01, T0 + 0.01 * i, tid=7) for i in range(20)]), T0 + 1)
    w = worker(m, 7, T0 + 1)
    assert [r.route for r in w.recent_requests] == ["/r19", "/r18", "/r17", "/r16", "/r15"]
    assert w.requests_served == 20 and w.recent_requests[0].pid == 7


def test_heartbeat_far_past_the_timeout_without_beacon_is_stuck() -> None:
    m = attached()
    m.feed(tick(T0 + 1, [proc(7, T0 + 1, heartbeat_age_s=25.0)]), T0 + 1)
    w = worker(m, 7, T0 + 1)
    assert w.state == STUCK and w.stuck_for_s == 25.0
    m.feed(tick(T0 + 2, [proc(7, T0 + 2, heartbeat_age_s=1.0)]), T0 + 2)
    assert worker(m, 7, T0 + 2).state != STUCK


def test_gevent_greenlets_share_a_thread_and_the_oldest_request_still_counts() -> None:
    m = attached(config=gconf(worker_class="gevent"))
    m.feed(flying(7, T0 + 20, [("/export", 7, T0 + 1), ("/a", 7, T0 + 19.5), ("/b", 7, T0 + 19.8)]),
           T0 + 20)
    w = worker(m, 7, T0 + 20)
    assert [v.route for v in w.in_flight_all] == ["/export", "/a", "/b"]
    # /a and /b complete; a completion only ends the request it belongs to
    m.feed(done(7, T0 + 20.5, [req("/a", 0.8, T0 + 20.3, tid=7), req("/b", 0.6, T0 + 20.4, tid=7)]),
           T0 + 20.5)
    w = worker(m, 7, T0 + 21)
    assert [v.route for v in w.in_flight_all] == ["/export"]
    assert w.state == STUCK and w.in_flight.elapsed_s == 20.0
    assert m.snapshot(T0 + 21).utilization is None  # async workers have no fixed capacity


def test_stacks_show_a_request_the_beacon_has_not_reported_yet() -> None:
    m = attached()
    m.feed(flying(7, T0 + 1, []), T0 + 1)  # nothing running at T0 + 1
    m.feed(sample(7, T0 + 1.5, [(7, app_frames("wait_for_lock", "export"))]), T0 + 1.5)
    w = worker(m, 7, T0 + 1.6)
    assert w.state == BUSY and w.in_flight.source == "stack" and w.in_flight.tid == 7
    m.feed(flying(7, T0 + 2, [("/export", 7, T0 + 1.2)]), T0 + 2)  # the beacon catches up
    w = worker(m, 7, T0 + 2)
    assert [(v.route, v.source) for v in w.in_flight_all] == [("/export", "beacon")]
    m.feed(sample(7, T0 + 3, [(7, app_frames("quick"))]), T0 + 3)
    m.feed(done(7, T0 + 3.2, [req("/export", 1.9, T0 + 3.1, tid=7), req("/quick", 0.1, T0 + 3.15, tid=7)]),
           T0 + 3.2)
    assert worker(m, 7, T0 + 3.3).state == IDLE  # the sampled request has completed


def test_a_fast_request_just_before_a_hang_does_not_hide_it() -> None:
    m = attached()
    m.feed(done(7, T0 + 1.1, [req("/fast", 0.003, T0 + 1.012, tid=7)]), T0 + 1.1)  # began 1.009
    m.feed(flying(7, T0 + 1.15, [("/hang", 7, T0 + 1.013)]), T0 + 1.15)
    m.feed(flying(7, T0 + 2.15, [("/hang", 7, T0 + 1.013)]), T0 + 2.15)
    w = worker(m, 7, T0 + 2.2)
    assert w.state == BUSY and w.in_flight.route == "/hang"
    m.feed(done(7, T0 + 2.3, [req("/late", 0.002, T0 + 1.011, tid=7)]), T0 + 2.3)  # reordered
    assert worker(m, 7, T0 + 2.3).in_flight.route == "/hang"
    m.feed(done(7, T0 + 3.1, [req("/hang", 2.0, T0 + 3.013, tid=7)]), T0 + 3.1)
    assert worker(m, 7, T0 + 3.1).state == IDLE


def test_qualified_frame_names_of_python_311_are_request_frames_too() -> None:
    m = attached()
    qualified = tuple(Frame(("Flask." if f.name != "handle_request" else "SyncWorker.") + f.name,
                            f.filename, f.line, f.short_filename) for f in REQUEST_FRAMES[:4])
    frames = (Frame("wait_for_lock", "/srv/app.py", 3, "app.py"),) + qualified
    for i in range(20):
        m.feed(sample(7, T0 + i, [(7, frames)]), T0 + i)
    w = worker(m, 7, T0 + 19)
    assert w.state == STUCK and w.in_flight.source == "stack" and w.in_flight.elapsed_s == 19.0
