"""What gunicorn does to its workers and itself, against real gunicorn, py-spy and UDP (issue 5).

1. A request outlives --timeout: the kill is recorded with its route and stack, the
   replacement shows at the next snapshot after the poll that sees it, nothing raises.
2. HUP, TTIN/TTOU, --max-requests recycling, crash loops (fast spin, slower loop, boot
   failure that halts the master): exactly the live workers, bounded history and state,
   snapshots on schedule.
3. The master exits (SIGKILL) or is replaced (USR2): flasktop says so, keeps its data, names
   the new master, and never counts a master as a worker.

Model windows (settle_s, max_batch_s) are shortened in some tests with ModelConfig so that a
classification lands within seconds; the code paths are the default ones.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Set

import psutil

from flasktop.model import ModelConfig
from flasktop.report import render
from tests.faults import (
    ROOT, Fanout, Watch, app_env, cli, cli_env, events_of, kill_pids, script_gunicorn,
    udp_port, worker_pids,
)
from tests.support import Gunicorn, gunicorn, kill_tree, wait_until

# Every snapshot must follow the previous one within this many refreshes: the collector
# wakes every 0.25 s and snapshots once a refresh has passed, so 1.25 is the design figure;
# 2.0 leaves room for a loaded 2-core box and still catches a collector blocked by a source.
MAX_GAP_REFRESHES = 2.0
# A small event cap, so that a few reloads overflow it and the cap is exercised, not assumed.
CHURN_CHECKS = ModelConfig(settle_s=1.0, max_batch_s=4.0, max_events=5)


def _hang(g: Gunicorn) -> threading.Thread:
    def run() -> None:
        try:
            g.get("/hang", timeout=60)
        except OSError:
            pass  # the worker is killed under it: that is the point
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _hit(g: Gunicorn, path: str, n: int) -> None:
    for _ in range(n):
        assert g.get(path, timeout=20).status == 200


def _booted(g: Gunicorn) -> Set[int]:
    """Every worker pid gunicorn ever booted, from its log (a fast crash loop outruns psutil)."""
    try:
        text = g.log_path.read_text(errors="replace")
    except OSError:
        return set()
    return {int(m) for m in re.findall(r"Booting worker with pid: (\d+)", text)}


def _assert_bounded(w: Watch, max_workers: int) -> None:
    """Per snapshot: at most ``max_workers`` shown and held, history within its cap."""
    cfg = w.engine.model.cfg
    assert not w.errors, w.errors
    for r in w.records:
        assert len(r.snap.workers) <= max_workers, [x.pid for x in r.snap.workers]
        assert r.sizes["workers"] <= max_workers, r.sizes
        # read while a poll may be half-way: the live workers, those it is about to drop,
        # and a USR2 new master
        assert r.tracked <= 2 * max_workers + 1, r.tracked
        assert r.targets <= max_workers, r.targets
        assert len(r.snap.events) <= cfg.max_events
        assert r.sizes["pending_exits"] <= cfg.max_pending_exits + max_workers, r.sizes
        assert r.sizes["source_states"] <= 3 + 3 * max_workers, r.sizes
        assert r.sizes["held_datagrams"] <= cfg.max_held_datagrams, r.sizes
    gaps = w.gaps()
    assert gaps and max(gaps) <= MAX_GAP_REFRESHES, gaps


def _live_equal(w: Watch, g: Gunicorn, message: str, timeout: float = 15.0):
    """Wait for a snapshot (the latest or a later one) that shows exactly gunicorn's live
    workers, read before and after it."""
    def same(s) -> bool:
        live = set(g.worker_pids())
        return bool(live) and worker_pids(s) == live and set(g.worker_pids()) == live
    return w.wait(same, timeout=timeout, message=message, since=max(0, w.mark() - 1))


# --------------------------------------------------------------------------- 1. timeout kill

def test_timeout_kill_has_route_and_stack_and_the_replacement_shows_at_once(
        tmp_path: Path) -> None:
    """Two monitors at once on one kill, each hearing the beacon through a fan-out: the real
    CLI (which also samples with py-spy: the route and the stack in its JSON) and an
    in-process engine on its collector thread (the route from the beacon; the replacement's
    latency, counted in polls and snapshots, not seconds)."""
    udp_cli, udp_engine = udp_port(), udp_port()
    with Fanout([udp_cli, udp_engine]) as fan, \
            gunicorn("trouble_app:app", "-w", "2", "--timeout", "3",
                     env=app_env(tmp_path, fan.port), workers_expected=2) as g:
        before = set(g.worker_pids())
        proc = subprocess.Popen(
            cli("snapshot", "--pid", str(g.pid), "--beacon", f"127.0.0.1:{udp_cli}",
                "--seconds", "8", "--sample-interval", "0.5", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT),
            env=cli_env(), start_new_session=True)
        try:
            with Watch(g.pid, udp_engine, refresh=1.0, pyspy=False) as w:
                w.wait(lambda s: len(s.workers) == 2, message="two workers")
                wait_until(lambda: any(c.laddr.port == udp_cli for c in
                                       psutil.Process(proc.pid).net_connections(kind="udp4")),
                           timeout=15, message="flasktop snapshot to listen for the beacon")
                _hang(g)

                def replaced() -> Set[int]:
                    live = set(g.worker_pids())
                    return (live - before) if len(live) == 2 and live != before else set()
                (fresh,) = wait_until(replaced, timeout=15, interval=0.02,
                                      message="gunicorn to kill the hung worker and replace it")
                seen = time.monotonic()
                (victim,) = before - set(g.worker_pids())

                rec = w.wait(lambda s: fresh in worker_pids(s), message="the replacement worker")
                # The bound: the first poll after the fork lists it (a poll may be half-way
                # when the fork happens, hence at most one poll before), and the first snapshot
                # after that poll shows it (the collector may be half-way through a snapshot,
                # hence at most one before). With the 1 s poll and refresh=1: within ~2 s.
                first_tick = next(t for t in w.ticks if fresh in t[1])
                polls_before = [t for t in w.ticks if seen <= t[0] < first_tick[0]]
                assert len(polls_before) <= 1, (seen, first_tick, polls_before)
                snaps_before = [r for r in w.records if first_tick[0] <= r.mono < rec.mono]
                assert len(snaps_before) <= 1, [r.mono - first_tick[0] for r in snaps_before]
                assert victim not in worker_pids(rec.snap)

                rec = w.wait(lambda s: events_of(s, "timeout_killed"), timeout=10,
                             message="the timeout kill event")
                [kill] = events_of(rec.snap, "timeout_killed")
                assert kill.pid == victim and kill.route == "/hang", kill
                assert not [e for e in rec.snap.events if e.pid == victim
                            and e.kind != "timeout_killed"]
                assert not [s for s in rec.snap.sources if s.state == "error"], rec.snap.sources
                _live_equal(w, g, "exactly the live workers after the kill")
                _assert_bounded(w, 3)  # for a moment the replacement and the victim's last poll
            out, err = proc.communicate(timeout=40)
        finally:
            kill_tree(proc.pid)
        live = set(g.worker_pids())
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    doc = json.loads(out)
    kills = [e for e in doc["events"] if e["kind"] == "timeout_killed"]
    assert [k["pid"] for k in kills] == [victim], doc["events"]
    kill = kills[0]
    # The model must name the route although gunicorn's SIGABRT ends the request (SystemExit,
    # reported by the beacon) about a second before the worker vanishes.
    assert kill["route"] == "/hang", kill
    assert any("wait_for_lock" in f for f in kill["stack"] or ()), kill
    assert "/hang" in kill["summary"] and "\n" not in kill["summary"]
    assert {x["pid"] for x in doc["workers"]} == live and victim not in live
    [problem] = [p for p in doc["problems"] if p["kind"] == "worker_timeout"]
    assert problem["pid"] == victim and problem["route"] == "/hang"


# --------------------------------------------------------------------------- 2. churn

def test_recycling_reload_ttin_ttou_show_exactly_the_live_workers(tmp_path: Path) -> None:
    udp = udp_port()
    with gunicorn("trouble_app:app", "-w", "2", "--max-requests", "20", "--timeout", "10",
                  env=app_env(tmp_path, udp), workers_expected=2) as g:
        with Watch(g.pid, udp, refresh=1.0, config=CHURN_CHECKS) as w:
            w.wait(lambda s: len(s.workers) == 2, message="two workers")
            first = set(g.worker_pids())
            # 50 requests on 2 workers of --max-requests 20: at least one recycles.
            _hit(g, "/fast/1", 50)
            rec = w.wait(lambda s: events_of(s, "recycled"), timeout=15, message="a recycle")
            assert {e.pid for e in events_of(rec.snap, "recycled")} <= first
            _live_equal(w, g, "the live workers after recycling")

            mark = w.mark()
            before = set(g.worker_pids())
            g.signal(signal.SIGHUP)
            rec = w.wait(lambda s: events_of(s, "reloaded"), timeout=15, since=mark,
                         message="a reloaded event")
            snap = _live_equal(w, g, "the reloaded workers only").snap
            assert not worker_pids(snap) & before

            g.signal(signal.SIGTTIN)
            w.wait(lambda s: events_of(s, "added"), timeout=15, message="an added event")
            snap = _live_equal(w, g, "three workers").snap
            assert len(snap.workers) == 3
            g.signal(signal.SIGTTOU)
            w.wait(lambda s: events_of(s, "removed"), timeout=15, message="a removed event")
            snap = _live_equal(w, g, "back to two").snap
            assert len(snap.workers) == 2

            kinds = {e.kind for r in w.records for e in r.snap.events}
            for wrong in ("exited", "timeout_killed", "crash_loop", "master_exited"):
                assert wrong not in kinds, kinds
            # more events happened than the cap holds: the newest are kept, in time order
            cap = CHURN_CHECKS.max_events
            assert max(len(r.snap.events) for r in w.records) == cap
            last = w.latest().snap.events
            assert last[-1].kind == "removed" and [e.t for e in last] == sorted(e.t for e in last)
            booted = _booted(g)
            for r in w.records:
                assert worker_pids(r.snap) <= booted and g.pid not in worker_pids(r.snap)
            # the HUP overlap (old and new workers both alive) is the widest moment
            _assert_bounded(w, 4)
            assert w.latest().sizes["workers"] == 2




def test_a_crash_loop_faster_than_the_poll_stays_bounded_and_ends_with_the_live_workers(
        tmp_path: Path) -> None:
    udp = udp_port()
    stop = tmp_path / "stop"
    env = app_env(tmp_path, udp, FAULTS_POSTFORK_EXIT="1", FAULTS_STOP=str(stop))
    cfg = ModelConfig(settle_s=1.5, max_batch_s=4.0, max_events=20, starting_grace_s=2.0)
    with gunicorn("faults_app:app", "-c", "faults_conf.py", "-w", "2", "--timeout", "10",
                  env=env) as g:
        with Watch(g.pid, udp, refresh=1.0, config=cfg) as w:
            # gunicorn respawns as fast as its workers die
            during = w.wait(lambda s: s.attached_s >= 2 * cfg.starting_grace_s, timeout=20,
                            message="the loop to go on for twice the starting grace")
            wait_until(lambda: len(_booted(g)) >= 40, timeout=20, interval=0.1,
                       message="gunicorn to spin through 40 workers")
            spun = len(_booted(g))
            stop.touch()
            snap = _live_equal(w, g, "the two workers that survive once the loop ends",
                               timeout=20).snap
            assert len(snap.workers) == 2
            booted = _booted(g)
            for r in w.records:
                assert worker_pids(r.snap) <= booted and g.pid not in worker_pids(r.snap)
            _assert_bounded(w, 2)
            assert w.latest().snap.master.alive
    print(f"\ncrash loop (post_fork exit): {spun} pids spun; model held at most "
          f"{max(r.sizes['workers'] for r in w.records)} workers, "
          f"{max(len(r.snap.events) for r in w.records)} events (cap {cfg.max_events}); "
          f"events: {[e.kind for e in w.latest().snap.events]}; problems during the loop: "
          f"{[p.kind for p in during.snap.problems]}")
    assert during.snap.master.alive and len(during.snap.workers) < 2
    kinds = {p.kind for p in during.snap.problems}
    assert kinds & {"workers_down", "crash_loop"}, (
        f"{len(during.snap.workers)}/2 workers for {during.snap.attached_s:.0f} s while {spun} "
        f"pids spun, and problems {sorted(kinds)}: {render(during.snap)}")


def test_a_crash_loop_of_booted_workers_is_named_and_stays_bounded(tmp_path: Path) -> None:
    udp = udp_port()
    stop = tmp_path / "stop"
    env = app_env(tmp_path, udp, FAULTS_DIE_AFTER="0.6", FAULTS_STOP=str(stop))
    cfg = ModelConfig(settle_s=1.5, max_batch_s=4.0, max_events=20)
    with gunicorn("faults_app:app", "-c", "faults_conf.py", "-w", "2", "--timeout", "10",
                  env=env) as g:
        with Watch(g.pid, udp, refresh=1.0, config=cfg) as w:
            rec = w.wait(lambda s: events_of(s, "crash_loop"), timeout=25,
                         message="a crash_loop event")
            assert any(p.kind == "crash_loop" for p in rec.snap.problems), rec.snap.problems
            [loop] = events_of(rec.snap, "crash_loop")
            assert "crash loop" in loop.summary
            stop.touch()
            # the two workers booted after the stop file live on; the loop's last victims die
            snap = _live_equal(w, g, "the two surviving workers", timeout=20).snap
            assert len(snap.workers) == 2
            booted = _booted(g)
            for r in w.records:
                assert worker_pids(r.snap) <= booted and g.pid not in worker_pids(r.snap)
            _assert_bounded(w, 2)
            # while it crashed, each replacement was not news: no flood of "started"
            started = len(events_of(w.latest().snap, "started"))
            assert started <= 4, [e.kind for e in w.latest().snap.events]
    print(f"\ncrash loop (die after boot): {len(booted)} pids; events "
          f"{[e.kind for e in w.latest().snap.events]}")


def test_workers_failing_to_boot_halt_the_master_and_flasktop_says_so(tmp_path: Path) -> None:
    udp = udp_port()
    gate = tmp_path / "gate"
    env = app_env(tmp_path, udp, FAULTS_BOOT_GATE=str(gate))
    with gunicorn("faults_app:app", "-w", "2", "--timeout", "10", env=env,
                  workers_expected=2) as g:
        with Watch(g.pid, udp, refresh=1.0) as w:
            w.wait(lambda s: len(s.workers) == 2, message="two booting workers")
            gate.touch()
            rec = w.wait(lambda s: events_of(s, "master_exited"), timeout=20,
                         message="a master_exited event")
            assert g.proc is not None
            code = g.proc.wait(timeout=10)
            # 3 (WORKER_BOOT_ERROR); 1 when gunicorn 27 raises HaltServer again while halting,
            # as the second worker fails too
            assert code != 0 and "Worker failed to boot" in g.log(), (code, g.log())
            snap = rec.snap
            assert snap.master is not None and not snap.master.alive
            assert snap.workers == ()
            psutil_src = next(s for s in snap.sources if s.name == "psutil")
            assert psutil_src.state == "missing"
            assert f"master {g.pid} has exited" in psutil_src.detail
            assert any(p.kind == "master_exited" for p in snap.problems)
            # the collector keeps going after the master is gone
            w.wait(lambda s: True, since=w.mark(), message="one more snapshot")
            _assert_bounded(w, 2)
            assert "MASTER EXITED" in render(w.latest().snap)


# --------------------------------------------------------------------------- 3. the master

def test_master_killed_keeps_the_last_data_and_says_it_exited(tmp_path: Path) -> None:
    udp = udp_port()
    with gunicorn("trouble_app:app", "-w", "2", "--timeout", "10", env=app_env(tmp_path, udp),
                  workers_expected=2) as g:
        orphans = g.worker_pids()
        try:
            with Watch(g.pid, udp, refresh=1.0) as w:
                _hit(g, "/fast/1", 10)
                w.wait(lambda s: any(r.route == "/fast/<int:n>" and r.count == 10
                                     for r in s.routes), message="ten requests counted")
                g.signal(signal.SIGKILL)  # the workers live on a moment as orphans
                rec = w.wait(lambda s: events_of(s, "master_exited"), timeout=10,
                             message="a master_exited event")
                snap = rec.snap
                assert snap.master is not None and snap.master.pid == g.pid
                assert not snap.master.alive and snap.master.new_master_pid is None
                assert snap.workers == ()  # orphans are not this master's workers
                assert [r.count for r in snap.routes if r.route == "/fast/<int:n>"] == [10]
                psutil_src = next(s for s in snap.sources if s.name == "psutil")
                assert psutil_src.state == "missing", psutil_src
                assert f"gunicorn master {g.pid} has exited" in psutil_src.detail
                assert not events_of(snap, "timeout_killed") and not events_of(snap, "crash_loop")
                w.wait(lambda s: True, since=w.mark(), message="one more snapshot")
                _assert_bounded(w, 2)
                report = render(w.latest().snap)
                assert "MASTER EXITED" in report and "run flasktop --pid" not in report
        finally:
            kill_pids(orphans)


def test_usr2_upgrade_names_the_new_master_and_never_counts_it_as_a_worker(
        tmp_path: Path) -> None:
    udp = udp_port()
    new_master: List[int] = []
    with script_gunicorn("trouble_app:app", "-w", "2", "--timeout", "10",
                         env=app_env(tmp_path, udp), workers_expected=2) as g:
        try:
            old_workers = set(g.worker_pids())
            with Watch(g.pid, udp, refresh=1.0) as w:
                _hit(g, "/fast/1", 10)
                w.wait(lambda s: any(r.route == "/fast/<int:n>" and r.count == 10
                                     for r in s.routes), message="ten requests counted")
                g.signal(signal.SIGUSR2)

                def upgraded() -> List[int]:
                    # the new master: a child of the old one with (booted) children of its own
                    return [c.pid for c in psutil.Process(g.pid).children()
                            if c.pid not in old_workers and len(c.children()) >= 2]
                new_master[:] = wait_until(upgraded, timeout=20,
                                           message="the USR2 master and its workers")
                (nm,) = new_master
                new_workers = {c.pid for c in psutil.Process(nm).children()}
                rec = w.wait(lambda s: s.master is not None and s.master.new_master_pid == nm
                             and events_of(s, "master_replaced"), timeout=10,
                             message="the new master named")
                assert [e.pid for e in events_of(rec.snap, "master_replaced")] == [nm]
                assert rec.snap.master.alive
                assert worker_pids(rec.snap) == old_workers
                report = subprocess.run(
                    cli("snapshot", "--pid", str(g.pid), "--beacon", "off", "--no-pyspy",
                        "--seconds", "1.5"),
                    capture_output=True, text=True, timeout=30, cwd=str(ROOT), env=cli_env())
                assert report.returncode == 0, report.stderr
                assert "Traceback" not in report.stderr
                assert f"run flasktop --pid {nm}" in report.stdout, report.stdout

                # finish the upgrade: the old master goes, the new one serves
                g.signal(signal.SIGTERM)
                rec = w.wait(lambda s: events_of(s, "master_exited"), timeout=15,
                             message="the old master's exit")
                snap = rec.snap
                assert not snap.master.alive and snap.master.new_master_pid == nm
                assert snap.workers == ()
                assert [r.count for r in snap.routes if r.route == "/fast/<int:n>"] == [10]
                text = render(snap)
                assert f"run flasktop --pid {nm}" in text and "MASTER EXITED" in text
                psutil_src = next(s for s in snap.sources if s.name == "psutil")
                assert psutil_src.state == "missing" and f"master {nm}" in psutil_src.detail
                w.wait(lambda s: True, since=w.mark(), message="one more snapshot")
                for r in w.records:
                    shown = worker_pids(r.snap)
                    assert nm not in shown and g.pid not in shown and not shown & new_workers
                    assert shown <= old_workers
                _assert_bounded(w, 2)
                assert g.get("/fast/2").status == 200  # the new master serves the same port
        finally:
            kill_pids(new_master)
