"""End to end: real gunicorn, real beacon over real UDP, real py-spy, the real engine and CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import socket
from pathlib import Path

import pytest

from flasktop.engine import Engine
from flasktop.model.snapshot import Snapshot
from flasktop.sources.gunicorn import cmdline, is_process_title
from tests.support import Gunicorn, free_port, gunicorn, snapshot_until, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, udp: int) -> dict:
    return {"FLASKTOP_BEACON": f"127.0.0.1:{udp}",
            "TROUBLE_RELEASE": str(tmp_path / "release"),
            "PYTHONPATH": str(ROOT)}


def _hit(g: Gunicorn, path: str, n: int, threads: int = 2) -> None:
    """Send ``n`` requests to ``path`` from ``threads`` client threads; bounded."""
    def run(k: int) -> None:
        for _ in range(k):
            g.get(path, timeout=20)
    ts = [threading.Thread(target=run, args=(n // threads,)) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)


def _hang(g: Gunicorn) -> threading.Thread:
    def run() -> None:
        try:
            g.get("/hang", timeout=60)
        except OSError:
            pass  # the worker may be killed by the timeout: that is what some tests want
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


_until = snapshot_until  # collect until the condition holds on a snapshot


def _route(snap: Snapshot, route: str):
    return next((r for r in snap.routes if r.route == route), None)


@pytest.mark.parametrize("worker_args", [["-w", "2"], ["-w", "1", "-k", "gthread", "--threads", "4"]],
                         ids=["sync", "gthread"])
def test_names_the_slow_route_and_the_hang_and_no_false_ones(tmp_path, engine_for, worker_args):
    udp = free_port(socket.SOCK_DGRAM)
    with gunicorn("trouble_app:app", *worker_args, "--timeout", "60",
                  env=_env(tmp_path, udp), workers_expected=int(worker_args[1])) as g:
        # The hang starts BEFORE flasktop attaches: its true age must still come through.
        _hang(g)
        wait_until((tmp_path / "release.started").exists, timeout=10, message="the hang to begin")
        engine = engine_for(g, udp)
        _hit(g, "/fast/1", 60)
        _hit(g, "/slow", 8)
        snap = _until(engine, lambda s: _route(s, "/slow") and _route(s, "/slow").count >= 8
                      and _route(s, "/fast/<int:n>") and _route(s, "/fast/<int:n>").count >= 60
                      and any(w.in_flight and w.in_flight.route == "/hang" for w in s.workers),
                      message="both routes counted and the in-flight hang")
        slow, fast = _route(snap, "/slow"), _route(snap, "/fast/<int:n>")
        assert slow.count == 8 and fast.count == 60
        assert slow.p50_ms >= 200 and fast.p95_ms < 100
        hanging = next(w for w in snap.workers if w.in_flight and w.in_flight.route == "/hang")
        assert hanging.in_flight.source == "beacon"
        # stack sampled while it hangs: the frame it sits in
        snap = _until(engine, lambda s: any(w.pid == hanging.pid and w.stack and
                                            any("wait_for_lock" in f for f in w.stack)
                                            for w in s.workers), message="the hang's stack")
        slow_problems = [p for p in snap.problems if p.kind == "slow_route"]
        assert all(p.route != "/fast/<int:n>" for p in slow_problems)
        (tmp_path / "release").touch()


def test_attach_after_hang_began_reports_true_age_and_stuck(tmp_path, engine_for):
    udp = free_port(socket.SOCK_DGRAM)
    with gunicorn("trouble_app:app", "-w", "2", "--timeout", "12",
                  env=_env(tmp_path, udp), workers_expected=2) as g:
        _hang(g)
        # let the hang age before anyone listens: the beacon's in-flight report must carry its start
        wait_until((tmp_path / "release.started").exists, timeout=10, message="the hang to begin")
        t_began = time.time()
        wait_until(lambda: time.time() - t_began > 6.5, timeout=10, interval=0.2,
                   message="the hang to age")
        engine = engine_for(g, udp)
        snap = _until(engine, lambda s: any(w.state == "stuck" for w in s.workers),
                      message="a stuck worker")
        w = next(w for w in snap.workers if w.state == "stuck")
        assert w.in_flight.route == "/hang"
        assert w.in_flight.elapsed_s >= 6.0
        assert any(p.kind == "stuck_worker" and p.pid == w.pid for p in snap.problems)
        (tmp_path / "release").touch()


@pytest.mark.parametrize("titled", [False, True], ids=["command_line", "process_title"])
def test_timeout_kill_shows_up_with_route_and_stack(tmp_path, engine_for, titled):
    """``process_title``: setproctitle (installed with the test extra) overwrites the
    master's command line and environment, so the 4 s timeout can only come from the
    beacon inside the workers, as gunicorn's own config object says."""
    udp = free_port(socket.SOCK_DGRAM)
    with gunicorn("trouble_app:app", "-w", "2", "--timeout", "4",
                  env=_env(tmp_path, udp), workers_expected=2, titled=titled) as g:
        assert is_process_title(cmdline(g.pid) or []) == titled
        engine = engine_for(g, udp)
        _hit(g, "/fast/1", 4)  # a worker's beacon starts reporting with its first request
        snap = _until(engine, lambda s: len(s.workers) == 2 and s.master.timeout == 4.0,
                      message="two workers and gunicorn's timeout")
        assert not snap.master.timeout_assumed and snap.master.workers == 2
        assert snap.master.app == "trouble_app:app"
        assert snap.master.bind == (f"127.0.0.1:{g.port}",)
        _hang(g)
        snap = _until(engine, lambda s: any(e.kind == "timeout_killed" for e in s.events),
                      timeout=30, message="a timeout kill event")
        ev = next(e for e in snap.events if e.kind == "timeout_killed")
        assert ev.route == "/hang" and "killed by the timeout (4.0 s)" in ev.summary
        assert ev.stack and any("wait_for_lock" in f for f in ev.stack)
        snap = _until(engine, lambda s: sorted(w.pid for w in s.workers) == g.worker_pids()
                      and len(s.workers) == 2, message="the replacement worker")
        assert ev.pid not in [w.pid for w in snap.workers]


def test_hup_and_ttin_ttou_leave_exactly_the_live_workers(tmp_path, engine_for):
    udp = free_port(socket.SOCK_DGRAM)
    with gunicorn("trouble_app:app", "-w", "2", "--timeout", "10",
                  env=_env(tmp_path, udp), workers_expected=2) as g:
        engine = engine_for(g, udp)
        _until(engine, lambda s: len(s.workers) == 2, message="two workers")
        before = set(g.worker_pids())
        g.signal(signal.SIGHUP)
        _until(engine, lambda s: {w.pid for w in s.workers} == set(g.worker_pids())
                      and not ({w.pid for w in s.workers} & before) and len(s.workers) == 2,
                      message="the reloaded workers only")
        # churn is classified once it settles (a reload is many exits and starts in a burst)
        _until(engine, lambda s: any(e.kind == "reloaded" for e in s.events), timeout=15,
               message="a reloaded event")
        g.signal(signal.SIGTTIN)
        _until(engine, lambda s: len(s.workers) == 3 and
               {w.pid for w in s.workers} == set(g.worker_pids()), message="three workers")
        g.signal(signal.SIGTTOU)
        _until(engine, lambda s: len(s.workers) == 2 and
               {w.pid for w in s.workers} == set(g.worker_pids()), message="back to two")


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flasktop", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_snapshot_json_has_the_documented_keys(tmp_path):
    udp = free_port(socket.SOCK_DGRAM)
    with gunicorn("trouble_app:app", "-w", "2", "--timeout", "30",
                  env=_env(tmp_path, udp), workers_expected=2) as g:
        worker = g.worker_pids()[0]
        done = threading.Event()

        def traffic() -> None:
            while not done.is_set():
                g.get("/fast/2")
                g.get("/boom")
                done.wait(0.05)
        t = threading.Thread(target=traffic, daemon=True)
        t.start()
        try:
            r = _cli("snapshot", "--pid", str(worker), "--beacon", f"127.0.0.1:{udp}",
                     "--seconds", "3", "--json")
        finally:
            done.set()
            t.join(10)
    assert r.returncode == 0, r.stderr
    assert "worker of gunicorn master" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["master"]["pid"] == g.pid
    for key in ("pid", "worker_class", "timeout", "workers"):
        assert key in doc["master"]
    assert {w["pid"] for w in doc["workers"]} == set(g.worker_pids()) or len(doc["workers"]) == 2
    for w in doc["workers"]:
        for key in ("pid", "state", "rss_bytes", "leak_suspected", "in_flight", "stack"):
            assert key in w
    routes = {(r["route"], r["method"]): r for r in doc["routes"]}
    boom = routes[("/boom", "GET")]
    assert boom["errors"] == boom["count"] > 0
    for key in ("count", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms", "hot_frames"):
        assert key in boom
    for key in ("problems", "events"):
        assert isinstance(doc[key], list)
    for source in ("psutil", "pyspy", "beacon"):
        assert "state" in doc["sources"][source]
    beacon = doc["sources"]["beacon"]
    for key in ("received", "rejected", "lost"):
        assert key in beacon
    assert beacon["received"] > 0


def test_snapshot_human_report(tmp_path):
    udp = free_port(socket.SOCK_DGRAM)
    with gunicorn("trouble_app:app", "-w", "1", env=_env(tmp_path, udp), workers_expected=1) as g:
        g.get("/slow")
        r = _cli("snapshot", "--pid", str(g.pid), "--beacon", f"127.0.0.1:{udp}", "--seconds", "2")
    assert r.returncode == 0, r.stderr
    assert f"gunicorn master {g.pid}" in r.stdout
    assert "WORKERS" in r.stdout
    assert "\x1b" not in r.stdout


def test_not_gunicorn_is_one_line_and_exit_2():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        r = _cli("snapshot", "--pid", str(sleeper.pid), "--seconds", "1")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a gunicorn" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--pid", "abc"], ["--pid", "-3"], ["--beacon", "nohost"],
                                  ["--beacon", "127.0.0.1:99999"], ["--seconds", "nan"]])
def test_bad_arguments_exit_2_without_traceback(args):
    r = _cli("snapshot", *(["--pid", "1"] if "--pid" not in args else []), *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip()


@pytest.mark.parametrize("args, says", [
    (["--workers", "0"], "argument --workers: 0 is out of range (1 to 16 workers)"),
    (["--timeout", "-5"], "argument --timeout: -5 is out of range (5 to 300 seconds)"),
    (["--timeout", "2.5"], "argument --timeout: not a whole number of seconds: '2.5'"),
])
def test_bad_demo_arguments_are_one_line(args, says):
    r = _cli("demo", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"flasktop demo: error: {says}"


def test_a_leaking_route_is_named_and_steady_traffic_is_not(tmp_path):
    """The leak verdict on a real worker, with the fit's windows shortened to seconds (the
    default needs a minute of data): steady fast traffic first (no verdict), then a route
    that keeps memory alive on every request (a verdict naming it)."""
    from flasktop.model import ModelConfig

    udp = free_port(socket.SOCK_DGRAM)
    cfg = ModelConfig(leak_warmup_s=2.0, leak_min_span_s=6.0, leak_min_points=6,
                      leak_window_s=60.0, leak_route_delay_s=1.0)
    with gunicorn("trouble_app:app", "-w", "1", env={**_env(tmp_path, udp),
                                                     "TROUBLE_LEAK_CHUNK": str(128 * 1024)},
                  workers_expected=1) as g:
        engine = Engine(g.pid, beacon=("127.0.0.1", udp), refresh=0.5, pyspy=False, config=cfg)
        engine.open()
        try:
            stop = threading.Event()

            def steady(path: str) -> None:
                while not stop.is_set():
                    g.get(path.format(n=1))
                    stop.wait(0.02)

            t = threading.Thread(target=steady, args=("/fast/{n}",), daemon=True)
            t.start()
            t_end = time.monotonic() + 10
            while time.monotonic() < t_end:
                engine.collect()
                snap = engine.take_snapshot()
                assert not any(w.leak_suspected for w in snap.workers), snap.workers
                time.sleep(0.5)
            stop.set()
            t.join(10)
            stop.clear()
            t = threading.Thread(target=steady, args=("/leak",), daemon=True)
            t.start()
            snap = _until(engine, lambda s: any(w.leak_suspected for w in s.workers), timeout=40,
                          message="a leak verdict")
            stop.set()
            t.join(10)
            [w] = snap.workers
            assert w.growth_mb_per_min is not None and w.growth_mb_per_min > 10
            assert any(p.kind == "memory_leak" and p.pid == w.pid for p in snap.problems)
            snap = _until(engine, lambda s: s.workers[0].leak_routes, timeout=15,
                          message="the routes that ran while memory grew")
            assert snap.workers[0].leak_routes[0][0] == "/leak", snap.workers[0].leak_routes
        finally:
            engine.stop()


def test_a_route_first_seen_when_the_table_is_full_takes_an_idle_route_s_row(tmp_path, engine_for):
    """The route cap end to end (real beacon, real UDP, the engine's own clock), with room
    for two routes and a 6 s window: a third route folds into <other> while both are in
    use, and gets a row of its own once one of them has been idle for a whole window.
    The routes still add up to every request made."""
    from flasktop.model import ModelConfig
    udp = free_port(socket.SOCK_DGRAM)
    config = ModelConfig(max_routes=2, window_s=6.0, window_slots=3)
    with gunicorn("trouble_app:app", "-w", "1", "--timeout", "60",
                  env=_env(tmp_path, udp), workers_expected=1) as g:
        engine = engine_for(g, udp, config=config, pyspy=False)
        made = {"fast": 0, "boom": 0, "slow": 0}

        def get(name: str, path: str, status: int) -> None:
            assert g.get(path, timeout=20).status == status
            made[name] += 1

        def counts(s: Snapshot) -> dict:
            return {r.route: r.count for r in s.routes}

        get("fast", "/fast/1", 200)
        get("boom", "/boom", 500)
        _until(engine, lambda s: counts(s) == {"/fast/<int:n>": 1, "/boom": 1}, message="two rows")
        # /boom kept in use: /slow has no row to take, so it folds
        deadline = time.monotonic() + 30
        while True:
            get("boom", "/boom", 500)
            get("slow", "/slow", 200)
            snap = _until(engine, lambda s: sum(counts(s).values()) == sum(made.values()),
                          message="every request counted")
            if "<other>" in counts(snap):
                break
            assert time.monotonic() < deadline, counts(snap)
        assert "/slow" not in counts(snap) and counts(snap)["<other>"] == made["slow"]
        # /boom no longer requested: once idle for a whole window its row goes to /slow
        deadline = time.monotonic() + 40
        while "/slow" not in counts(snap):
            assert time.monotonic() < deadline, counts(snap)
            get("fast", "/fast/2", 200)
            get("slow", "/slow", 200)
            snap = _until(engine, lambda s: sum(counts(s).values()) == sum(made.values()),
                          message="every request counted")
        c = counts(snap)
        assert set(c) == {"/fast/<int:n>", "/slow", "<other>"}, c
        assert c["/fast/<int:n>"] == made["fast"]  # in use all along: never evicted
        assert c["<other>"] + c["/slow"] == made["boom"] + made["slow"]
        other = _route(snap, "<other>")
        assert other.errors == made["boom"]  # /boom's 500s went to <other> with its counts
        assert snap.routes_dropped == 2 and engine.model.sizes()["routes_evicted"] == 1
