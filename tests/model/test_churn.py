from __future__ import annotations

from typing import List, Sequence

from flasktop.model.events import Frame
from tests.model.helpers import (
    T0, app_frames, done, flying, gconf, model, proc, req, sample, tick,
)


def run(m, t: float, pids: Sequence[int], born: dict, config=None, **kw) -> None:
    m.feed(tick(t, [proc(p, t, created=born.get(p, T0 - 3600), **kw) for p in pids], config), t)


def kinds(m, now: float) -> List[str]:
    return [e.kind for e in m.snapshot(now).events]


def problems(m, now: float, kind: str) -> list:
    """The snapshot's problems of ``kind`` at ``now``."""
    return [p for p in m.snapshot(now).problems if p.kind == kind]


def test_workers_present_at_attach_are_not_started_events() -> None:
    m = model()
    for i in range(10):
        run(m, T0 + i, [7, 8, 9], {})
    assert kinds(m, T0 + 10) == []


def test_timeout_kill_carries_the_route_and_the_last_stack() -> None:
    m = model()
    born = {9: T0 + 31}
    run(m, T0, [7, 8], born)
    m.feed(flying(7, T0 + 0.5, [("/hang", 7, T0)]), T0 + 0.5)
    for i in range(1, 31):
        run(m, T0 + i, [7, 8], born)
        m.feed(sample(7, T0 + i, [(7, app_frames("wait_for_lock", "hang"))]), T0 + i)
    for i in range(31, 36):
        run(m, T0 + i, [8, 9], born)
    events = m.snapshot(T0 + 36).events
    assert [e.kind for e in events] == ["timeout_killed", "started"]
    kill = events[0]
    assert kill.pid == 7 and kill.route == "/hang"
    assert kill.stack == tuple(str(f) for f in app_frames("wait_for_lock", "hang"))
    assert "wait_for_lock (app.py:10)" in kill.summary and "GET /hang" in kill.summary
    [p] = problems(m, T0 + 36, "worker_timeout")
    assert p.pid == 7 and p.route == "/hang" and "wait_for_lock (app.py:10)" in p.summary
    assert m.sizes()["workers"] == 2  # the dead worker's state is gone
    assert not problems(m, T0 + 36 + 301, "worker_timeout")


def test_stale_heartbeat_without_beacon_is_a_timeout_kill() -> None:
    m = model()
    born = {9: T0 + 30}
    for i in range(30):
        run(m, T0 + i, [7], born, heartbeat_age_s=float(i))
    for i in range(30, 35):
        run(m, T0 + i, [9], born)
    assert kinds(m, T0 + 35) == ["timeout_killed", "started"]


def test_short_timeout_kill_without_beacon_ages_the_last_heartbeat() -> None:
    """--timeout 3: the last poll read the heartbeat at 2 s (under 0.8 x 3); the worker was
    killed past 3 s and found gone 1.2 s after that poll: still a timeout kill."""
    m = model()
    conf = gconf(timeout=3.0)
    born = {9: T0 + 3}
    for i in range(3):
        run(m, T0 + i, [7], born, conf, heartbeat_age_s=float(i))
    for t in (T0 + 3.2, T0 + 4.2, T0 + 5.2, T0 + 6.2, T0 + 7.2):
        run(m, t, [9], born, conf)
    assert kinds(m, T0 + 8) == ["timeout_killed", "started"]


def test_hup_reload_is_one_event() -> None:
    m = model()
    old, new = [1, 2, 3, 4], [11, 12, 13, 14]
    born = {p: T0 + 10 for p in new}
    for i in range(10):
        run(m, T0 + i, old, born)
    run(m, T0 + 10, old + new, born)  # gunicorn starts the new ones first
    run(m, T0 + 11, [1, 2] + new, born)
    for i in range(12, 20):
        run(m, T0 + i, new, born)
    events = m.snapshot(T0 + 20).events
    assert [e.kind for e in events] == ["reloaded"]
    assert "4 workers replaced" in events[0].summary


def test_ttin_adds_and_ttou_removes() -> None:
    m = model()
    born = {5: T0 + 10}
    for i in range(10):
        run(m, T0 + i, [1, 2, 3, 4], born)
    for i in range(10, 20):
        run(m, T0 + i, [1, 2, 3, 4, 5], born)
    assert kinds(m, T0 + 20) == ["added"]
    for i in range(20, 30):
        run(m, T0 + i, [2, 3, 4, 5], born)  # TTOU kills the oldest
    events = m.snapshot(T0 + 30).events
    assert [e.kind for e in events] == ["added", "removed"] and events[1].pid == 1


def test_max_requests_recycling_and_a_plain_exit() -> None:
    m = model()
    born = {7: T0 + 1, 8: T0 + 40, 9: T0 + 60}
    cfg = gconf(max_requests=100, workers=1)
    run(m, T0, [], born, cfg)
    for i in range(1, 40):
        run(m, T0 + i, [7], born, cfg)
        if i > 1:
            m.feed(done(7, T0 + i, [req("/a", 0.01, T0 + i - 0.1 * j, tid=7) for j in range(3)]),
                   T0 + i)
    assert worker_served(m, 7) == 114
    for i in range(40, 60):
        run(m, T0 + i, [8], born, cfg)  # 7 went idle after ~max_requests
    m.feed(flying(8, T0 + 55, [("/a", 8, T0 + 54)]), T0 + 55)
    for i in range(60, 70):
        run(m, T0 + i, [9], born, cfg)  # 8 died young, in the middle of a request
    assert kinds(m, T0 + 70) == ["started", "recycled", "started", "exited", "started"]
    exited = m.snapshot(T0 + 70).events[3]
    assert exited.pid == 8 and exited.route == "/a"


def worker_served(m, pid: int) -> int:
    return next(w.requests_served for w in m.snapshot(T0).workers if w.pid == pid)


def test_crash_loop_is_detected_and_ten_thousand_pids_stay_bounded() -> None:
    m = model()
    run(m, T0, [1, 2], {})
    pid = 1000
    sizes = []
    for i in range(1, 5001):
        t = T0 + i
        pids = [1, pid, pid + 1]  # two fresh workers every second, each dead a second later
        born = {pid: t, pid + 1: t}
        run(m, t, pids, born)
        pid += 2
        if i % 1000 == 0:
            sizes.append(m.sizes())
    snap = m.snapshot(T0 + 5001)
    assert pid - 1000 == 10_000
    assert any(p.kind == "crash_loop" for p in snap.problems)
    assert "crash_loop" in [e.kind for e in snap.events]
    assert len(snap.events) <= 500 and len(snap.workers) == 3
    for s in sizes:
        assert s["workers"] <= 3 and s["events"] <= 500 and s["pending_exits"] <= 512
        assert s["series_points"] <= 3 * 3 * 2 * 3600


def test_master_exit_and_usr2_replacement() -> None:
    m = model()
    run(m, T0, [1, 2], {})
    m.feed(tick(T0 + 1, [proc(1, T0 + 1), proc(2, T0 + 1)], new_master=555), T0 + 1)
    m.feed(tick(T0 + 2, [], alive=False), T0 + 2)
    m.feed(tick(T0 + 3, [], alive=False), T0 + 3)
    snap = m.snapshot(T0 + 3)
    assert [e.kind for e in snap.events] == ["master_replaced", "master_exited"]
    assert snap.events[0].pid == 555 and snap.master.new_master_pid is None
    assert snap.problems[0].kind == "master_exited"
    assert not snap.master.alive and snap.workers == ()


def test_timeout_kill_when_the_request_unwound_as_the_worker_died() -> None:
    """gunicorn's SIGABRT unwinds the request: the beacon reports it complete, then the pid goes."""
    m = model()
    cfg = gconf(timeout=4)
    born = {9: T0 + 6}
    run(m, T0, [7, 8], born, cfg)
    m.feed(flying(7, T0 + 0.5, [("/hang", 7, T0 + 0.2)]), T0 + 0.5)
    for i in range(1, 5):
        run(m, T0 + i, [7, 8], born, cfg)
        m.feed(sample(7, T0 + i, [(7, app_frames("wait_for_lock", "hang"))]), T0 + i)
    # ... and as the request context is gone by then, it may come back without its route.
    m.feed(done(7, T0 + 4.6, [req("<unmatched>", 4.3, T0 + 4.5, tid=7, exc="SystemExit")]),
           T0 + 4.6)
    exiting = (Frame("_exit", "/venv/gunicorn/workers/base.py", 200, "gunicorn/workers/base.py"),)
    m.feed(sample(7, T0 + 4.7, [(7, exiting)]), T0 + 4.7)
    assert [w.state for w in m.snapshot(T0 + 4.7).workers if w.pid == 7] == ["idle"]
    for i in range(5, 7):
        run(m, T0 + i, [8, 9], born, cfg)
    [kill] = [e for e in m.snapshot(T0 + 7).events if e.kind == "timeout_killed"]
    assert kill.pid == 7 and kill.route == "/hang"
    assert kill.stack is not None and kill.stack[0] == "wait_for_lock (app.py:10)"
    assert [r.route for r in m.snapshot(T0 + 7).routes] == ["/hang"]


def test_started_is_news_at_once_and_a_reload_rewrites_it() -> None:
    m = model()
    born = {p: T0 + 10 for p in (11, 12)}
    for i in range(10):
        run(m, T0 + i, [1, 2], born)
    run(m, T0 + 10, [1, 2, 11, 12], born)
    assert kinds(m, T0 + 10) == ["started", "started"]  # before anything has settled
    run(m, T0 + 11, [11, 12], born)
    assert kinds(m, T0 + 11) == ["started", "started"]
    for i in range(12, 16):
        run(m, T0 + i, [11, 12], born)
    assert kinds(m, T0 + 16) == ["reloaded"]


def test_workers_recycled_together_are_not_a_reload() -> None:
    m = model()
    cfg = gconf(max_requests=20)
    born = {11: T0 + 5, 12: T0 + 5}
    run(m, T0, [1, 2], born, cfg)
    for pid in (1, 2):
        m.feed(done(pid, T0 + 2, [req("/a", 0.01, T0 + 1 + 0.01 * j, tid=pid) for j in range(20)]),
               T0 + 2)
    for i in range(1, 5):
        run(m, T0 + i, [1, 2], born, cfg)
    for i in range(5, 12):
        run(m, T0 + i, [11, 12], born, cfg)
    assert kinds(m, T0 + 12) == ["recycled", "recycled", "started", "started"]
    assert "after 20 requests" in m.snapshot(T0 + 12).events[0].summary


def test_young_workers_recycled_reloaded_and_removed_are_no_crash_loop() -> None:
    """Right after gunicorn starts every worker is young; deliberate exits are not crashes."""
    m = model()
    cfg = gconf(max_requests=20, workers=2)
    gen = {1: T0 - 2, 2: T0 - 2, 11: T0 + 3, 12: T0 + 3, 21: T0 + 8, 22: T0 + 8, 23: T0 + 14}
    timeline = [[1, 2]] * 3 + [[11, 12]] * 5 + [[11, 12, 21, 22], [21, 22]] + [[21, 22]] * 4 \
        + [[21, 22, 23]] * 5 + [[22, 23]] * 5
    run(m, T0, [1, 2], gen, cfg)
    for pid in (1, 2):
        m.feed(done(pid, T0 + 1, [req("/a", 0.01, T0 + 0.5, tid=pid)] * 20), T0 + 1)
    for i, pids in enumerate(timeline, start=1):
        run(m, T0 + i, pids, gen, cfg)
    assert kinds(m, T0 + 30) == ["recycled", "recycled", "started", "started", "reloaded",
                                 "added", "removed"]
    assert not problems(m, T0 + 30, "crash_loop")


def test_workers_that_die_faster_than_the_poll_are_a_problem() -> None:
    """gunicorn respawns workers that exit in post_fork: the poll never sees one alive."""
    m = model(starting_grace_s=5.0)
    cfg = gconf(workers=2)
    run(m, T0, [1, 2], {}, cfg)
    run(m, T0 + 1, [], {}, cfg)
    for i in range(2, 5):
        run(m, T0 + i, [], {}, cfg)
    assert not problems(m, T0 + 4, "workers_down")
    for i in range(5, 8):
        run(m, T0 + i, [], {}, cfg)
    [p] = problems(m, T0 + 7, "workers_down")
    assert p.severity > 90 and "0 of 2 workers alive for 6.0 s" in p.summary
    run(m, T0 + 8, [11, 12], {11: T0 + 8, 12: T0 + 8}, cfg)
    assert not problems(m, T0 + 8, "workers_down")


def test_no_worker_alive_is_a_problem_when_the_worker_count_is_unknown() -> None:
    """A process title hides --workers, and flasktop attached during a crash loop: no count
    was ever seen. A master with no worker alive is short all the same."""
    m = model(starting_grace_s=5.0)
    cfg = gconf(workers=None)
    for i in range(0, 5):
        run(m, T0 + i, [], {}, cfg)
    assert not problems(m, T0 + 4, "workers_down")
    for i in range(5, 8):
        run(m, T0 + i, [], {}, cfg)
    [p] = problems(m, T0 + 7, "workers_down")
    assert p.severity > 90 and "no worker alive for 6.0 s" in p.summary
    run(m, T0 + 8, [11], {11: T0 + 8}, cfg)
    assert not problems(m, T0 + 8, "workers_down")


def test_fewer_workers_after_ttou_are_not_a_problem() -> None:
    m = model(starting_grace_s=5.0)
    for i in range(5):
        run(m, T0 + i, [1, 2, 3], {}, gconf(workers=3))
    for i in range(5, 30):
        run(m, T0 + i, [2, 3], {}, gconf(workers=3))
    snap = m.snapshot(T0 + 30)
    assert [e.kind for e in snap.events] == ["removed"]
    assert not [p for p in snap.problems if p.kind == "workers_down"]
