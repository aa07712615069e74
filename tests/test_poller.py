"""The psutil poller against real gunicorn: exact topology, heartbeat, memory, permissions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import psutil
import pytest

from flasktop.model.events import ProcStats, SourceState, TopologyTick
from flasktop.sources.gunicorn import find_masters, resolve_master
from flasktop.sources.poller import Poller
from tests.support import Gunicorn, gunicorn, kill_tree, wait_until

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


def _pids(tick: TopologyTick) -> List[int]:
    return sorted(w.pid for w in tick.workers)


def _live_children(pid: int) -> List[int]:
    """Children of ``pid`` that have not exited (gunicorn may not have reaped one yet)."""
    try:
        return sorted(c.pid for c in psutil.Process(pid).children()
                      if c.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return []


def _worker(tick: TopologyTick, pid: int) -> Optional[ProcStats]:
    return next((w for w in tick.workers if w.pid == pid), None)


def _exact(poller: Poller, g: Gunicorn, n: int) -> TopologyTick:
    """Wait for a tick that lists exactly the ``n`` live workers gunicorn has now."""
    def check() -> Optional[TopologyTick]:
        tick = poller.poll_once()
        live = _live_children(g.pid)
        return tick if len(live) == n and _pids(tick) == live == _live_children(g.pid) else None
    return wait_until(check, timeout=20, interval=0.1, message=f"a tick with exactly {n} workers")


class ScriptGunicorn(Gunicorn):
    """gunicorn run by its console script (``python .../bin/gunicorn``).

    ``python -m gunicorn`` cannot survive USR2: the re-exec runs ``.../gunicorn/__main__.py``,
    which puts gunicorn's package directory first on sys.path and shadows the stdlib ``http``.
    """

    def start(self, workers_expected: Optional[int] = None, timeout: float = 30.0) -> "Gunicorn":
        script = str(Path(sys.executable).parent / "gunicorn")
        cmd = [sys.executable, script, "--bind", f"127.0.0.1:{self.port}", *self.args, self.app]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.cwd), env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        n = workers_expected
        wait_until(lambda: self._serving() and (n is None or len(self.worker_pids()) >= n),
                   timeout=timeout, message=f"gunicorn {self.app} to serve (log: {self.log_path})")
        return self


# ----------------------------------------------------------------------------- topology

def test_tick_lists_exactly_the_live_workers_through_ttin_ttou_kill_and_hup() -> None:
    with gunicorn("poller_app:app", "-w", "2", "-t", "5", "--graceful-timeout", "2",
                  workers_expected=2) as g:
        poller = Poller(g.pid, lambda e: None)
        tick = _exact(poller, g, 2)
        assert tick.master_alive and tick.master is not None and tick.master.pid == g.pid
        assert tick.new_master_pid is None
        assert tick.config.workers == 2 and tick.config.timeout == 5.0
        for w in tick.workers:
            assert w.rss and w.rss > 0 and w.num_threads and w.num_fds and w.status
            assert w.heartbeat_age_s is not None and w.heartbeat_age_s >= 0
            assert w.create_time == pytest.approx(psutil.Process(w.pid).create_time(), abs=0.02)
            assert not [m for m in w.missing if m[1] != "first reading"]

        g.signal(signal.SIGTTIN)
        assert len(_exact(poller, g, 3).workers) == 3
        g.signal(signal.SIGTTOU)
        tick = _exact(poller, g, 2)

        victim = tick.workers[0].pid
        os.kill(victim, signal.SIGKILL)
        tick = wait_until(lambda: (lambda t: t if victim not in _pids(t) and len(t.workers) == 2
                                   else None)(poller.poll_once()),
                          timeout=20, message="the killed worker to be replaced")
        assert victim not in _pids(_exact(poller, g, 2))

        before = set(_pids(_exact(poller, g, 2)))
        g.signal(signal.SIGHUP)

        def reloaded() -> Optional[TopologyTick]:
            t = poller.poll_once()
            live = _live_children(g.pid)
            return t if len(live) == 2 and not before & set(live) and _pids(t) == live else None
        wait_until(reloaded, timeout=20, interval=0.1, message="a tick with only the reloaded workers")
        # no state is kept for pids that left
        assert poller.tracked == 2


def test_usr2_new_master_is_not_a_worker_and_outlives_the_old_one() -> None:
    g = ScriptGunicorn("poller_app:app", "-w", "2", "-t", "10")
    new_master: Optional[int] = None
    try:
        g.start(workers_expected=2)
        events: List[object] = []
        poller = Poller(g.pid, events.append)
        old_workers = _pids(_exact(poller, g, 2))
        g.signal(signal.SIGUSR2)

        def new_master_seen() -> Optional[TopologyTick]:
            t = poller.poll_once()
            return t if t.new_master_pid is not None and _live_children(t.new_master_pid) else None
        tick = wait_until(new_master_seen, timeout=20, message="the USR2 new master and its workers")
        new_master = tick.new_master_pid
        assert new_master is not None
        assert new_master in _live_children(g.pid)  # a child of the old master ...
        assert new_master not in _pids(tick)  # ... but not one of its workers
        assert _pids(tick) == old_workers

        assert resolve_master(new_master) == (new_master, (
            f"{new_master} is the new gunicorn master of a USR2 upgrade (old master {g.pid}); "
            "attached to it"))
        new_worker = _live_children(new_master)[0]
        assert resolve_master(new_worker)[0] == new_master
        masters = {m.pid: m for m in find_masters()}
        assert masters[new_master].parent_master == g.pid
        assert masters[g.pid].parent_master is None

        g.signal(signal.SIGTERM)  # the old master steps down; the new one carries on
        tick = wait_until(lambda: (lambda t: t if not t.master_alive else None)(poller.poll_once()),
                          timeout=20, message="the old master to be gone")
        assert tick.workers == () and tick.master is None
        assert tick.new_master_pid == new_master
        assert poller.state is not None and poller.state.state == "missing"
        assert str(g.pid) in poller.state.detail and str(new_master) in poller.state.detail
        assert poller.poll_once().master_alive is False  # keeps answering, no exception
        assert poller.tracked == 0
    finally:
        if new_master is not None:
            kill_tree(new_master)
        g.stop()


def test_a_missing_master_gives_dead_ticks_and_the_thread_keeps_going() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(5)
    events: List[object] = []
    poller = Poller(proc.pid, events.append, interval=0.05)
    poller.start()
    try:
        wait_until(lambda: sum(isinstance(e, TopologyTick) for e in events) >= 3, timeout=10,
                   message="three ticks")
    finally:
        poller.stop()
    ticks = [e for e in events if isinstance(e, TopologyTick)]
    assert all(not t.master_alive and t.workers == () and t.master is None for t in ticks)
    states = [e for e in events if isinstance(e, SourceState)]
    assert len(states) == 1 and states[0].source == "psutil" and states[0].state == "missing"
    assert not poller.running


def test_thread_emits_ticks_and_stops_promptly() -> None:
    with gunicorn("poller_app:app", "-w", "1", "-t", "5", workers_expected=1) as g:
        events: List[object] = []
        poller = Poller(g.pid, events.append, interval=0.1)
        poller.start()
        try:
            wait_until(lambda: sum(isinstance(e, TopologyTick) for e in events) >= 3, timeout=10,
                       message="three ticks from the thread")
        finally:
            poller.stop()
        states = [e for e in events if isinstance(e, SourceState)]
        assert [s.state for s in states] == ["ok"]
        ticks = [e for e in events if isinstance(e, TopologyTick)]
        # CPU% is never a meaningless first zero: None, and said so, until a second reading
        first = ticks[0].workers[0]
        assert first.cpu_percent is None and ("cpu_percent", "first reading") in first.missing
        assert ticks[-1].workers[0].cpu_percent is not None
        assert not poller.running  # stop() joined the thread


# ----------------------------------------------------------------------------- per worker

@pytest.fixture()
def hang_gunicorn(tmp_path: Path) -> Iterator[Gunicorn]:
    env = {"POLLER_MARK": str(tmp_path / "mark"), "POLLER_RELEASE": str(tmp_path / "release")}
    with gunicorn("poller_app:app", "-w", "2", "-t", "20", workers_expected=2, env=env) as g:
        g.tmp = tmp_path  # type: ignore[attr-defined]
        try:
            yield g
        finally:
            (tmp_path / "release").touch()


def test_heartbeat_grows_while_a_sync_worker_hangs(hang_gunicorn: Gunicorn) -> None:
    g = hang_gunicorn
    tmp: Path = g.tmp  # type: ignore[attr-defined]
    poller = Poller(g.pid, lambda e: None)
    _exact(poller, g, 2)
    threading.Thread(target=lambda: g.get("/hang", timeout=40), daemon=True).start()
    mark = tmp / "mark"
    hung = int(wait_until(lambda: mark.exists() and mark.read_text(), timeout=15,
                          message="the hang to start"))

    def stale(threshold: float) -> Optional[ProcStats]:
        w = _worker(poller.poll_once(), hung)
        return w if w is not None and w.heartbeat_age_s is not None \
            and w.heartbeat_age_s >= threshold else None
    first = wait_until(lambda: stale(1.0), timeout=15, message="the hung worker's heartbeat to age")
    second = wait_until(lambda: stale(first.heartbeat_age_s + 1.0), timeout=15,  # type: ignore
                        message="the hung worker's heartbeat to keep aging")
    assert second.heartbeat_age_s > first.heartbeat_age_s  # type: ignore[operator]
    # the idle worker notifies at least every timeout/2 (gunicorn's own contract)
    tick = poller.poll_once()
    [idle] = [w for w in tick.workers if w.pid != hung]
    assert idle.heartbeat_age_s is not None and idle.heartbeat_age_s <= 10 + 1.5
    assert idle.status in ("sleeping", "running")

    (tmp / "release").touch()
    wait_until(lambda: (lambda w: w is not None and w.heartbeat_age_s is not None
                        and w.heartbeat_age_s < 1.0)(_worker(poller.poll_once(), hung)),
               timeout=15, message="the released worker to notify again")


def test_rss_of_an_allocating_worker_grows() -> None:
    with gunicorn("poller_app:app", "-w", "1", "-t", "20", workers_expected=1) as g:
        poller = Poller(g.pid, lambda e: None, uss_interval=1.0)
        tick = _exact(poller, g, 1)
        w0 = tick.workers[0]
        assert w0.uss is not None and w0.pss is not None  # root: smaps_rollup readable
        assert w0.rss is not None
        for _ in range(2):
            assert g.get("/alloc/48").body.decode() == str(w0.pid)
        grown = wait_until(lambda: (lambda w: w if w and w.rss and w.rss >= w0.rss + 90 * MB
                                    else None)(_worker(poller.poll_once(), w0.pid)),
                           timeout=10, message="RSS to grow by ~96 MB")
        assert grown.pid == w0.pid
        bigger_uss = wait_until(lambda: (lambda w: w if w and w.uss and w.uss >= w0.uss + 90 * MB
                                         else None)(_worker(poller.poll_once(), w0.pid)),
                                timeout=10, message="USS to grow on its slower cadence")
        assert bigger_uss.uss is not None


UNPRIVILEGED = r"""
import json, sys
from flasktop.sources.poller import Poller
from flasktop.sources.gunicorn import resolve_master
master, worker = int(sys.argv[1]), int(sys.argv[2])
p = Poller(master, lambda e: None)
p.poll_once()
t = p.poll_once()
print(json.dumps({
    "resolved": list(resolve_master(worker)),
    "workers": [{"pid": w.pid, "rss": w.rss, "num_fds": w.num_fds, "cpu": w.cpu_percent,
                 "threads": w.num_threads, "missing": w.missing} for w in t.workers],
    "master_missing": t.master.missing,
    "state": [p.state.state, p.state.detail],
}))
"""


def test_unprivileged_poll_marks_fields_denied_and_keeps_the_rest() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    with gunicorn("poller_app:app", "-w", "2", "-t", "20", workers_expected=2) as g:
        workers = _live_children(g.pid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "HOME": "/nonexistent"}
        out = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", UNPRIVILEGED, str(g.pid), str(workers[0])],
            env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        data: Dict = json.loads(out.stdout)
        assert data["resolved"] == [g.pid, f"{workers[0]} is a worker of gunicorn master {g.pid}; "
                                    "attached to the master"]
        assert sorted(w["pid"] for w in data["workers"]) == workers
        for w in data["workers"]:
            missing = {field: reason for field, reason in w["missing"]}
            assert w["num_fds"] is None
            for field in ("num_fds", "num_connections", "heartbeat_age_s", "uss", "pss"):
                assert missing[field] == "access denied"
            assert w["rss"] > 0 and w["threads"] >= 1 and w["cpu"] is not None
        assert ["num_fds", "access denied"] in data["master_missing"]
        state, detail = data["state"]
        assert state == "degraded"
        assert detail.startswith("fds, sockets, heartbeat, uss, pss unreadable for 2 workers "
                                 "and the master: access denied")
        assert "run as the workers' user or root" in detail and "\n" not in detail
