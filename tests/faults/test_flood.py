"""Issue 5, scenario 9: floods of beacon datagrams against flasktop's engine.

A real gunicorn (``-w 4 -c hostile_flood_conf.py``): its first three workers are flood
senders using the real ``Encoder`` under their own pids (see the config's docstring), the
fourth serves the app with its real beacon. The engine runs in a process of its own
(``tests/fixtures/hostile_engine.py``, ``Engine.start`` as the CLI runs it) and reports
every snapshot, so its memory can be read and its threads can be stopped.

Phase 1, a million distinct route names (from three senders) while the test makes real
requests. Phase 2, far above what the listener can take: the engine process is stopped
(SIGSTOP: a starved or suspended flasktop) while the senders burst, so the kernel's
receive buffer overflows; then it continues.

The bounds asserted are structural, not timings: at every snapshot the routes shown are at
most ``max_routes + 1`` (the ``<other>`` bucket), the listener's backlog and the engine's
inbox never pass their caps, every model store stays under its bound; every datagram the
senders sent is either received or counted as dropped by the kernel; the real route's
count equals the requests made unless a loss counter says datagrams were lost; losses are
shown (``lost``, ``kernel_drops``, a degraded beacon state); the engine keeps snapshotting.
Memory figures (RSS before and after) come from ``bench/flood_memory.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional


from tests.support import free_port, gunicorn, kill_tree, wait_until

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "fixtures" / "hostile_engine.py"
SENDERS = 3
REAL = "/fast/<int:n>"
MARK = "/boom"
MAX_EVENTS_PER_DATAGRAM = 256  # protocol: at most 256 events in one datagram


class Driver:
    """The engine process and the snapshot lines it prints."""

    def __init__(self, master: int, udp: int, refresh: float, seconds: float,
                 backlog_events: int = 0) -> None:
        self.refresh = refresh
        # The markers count since attach, so they must keep their rows for the whole run. With
        # the table full of flood names, a route idle for a whole window gives its row to a new
        # one (tests/model/test_routes.py), and /boom is idle through each phase: the window is
        # set longer than the run (``seconds`` bounds it) so that no row changes hands.
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), "--pid", str(master), "--beacon", f"127.0.0.1:{udp}",
             "--refresh", str(refresh), "--seconds", str(seconds), "--watch", REAL, "--watch", MARK,
             "--backlog-events", str(backlog_events), "--window", str(2 * seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: List[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(json.loads(raw))

    @property
    def last(self) -> dict:
        assert self.lines, "no snapshot yet"
        return self.lines[-1]

    def until(self, cond, timeout: float, message: str) -> dict:
        def check():
            if self.proc.poll() is not None:
                raise AssertionError(f"engine process exited: {self.proc.stderr.read()[-2000:]}")
            return self.lines and cond(self.lines[-1])
        wait_until(check, timeout=timeout, interval=0.05, message=message)
        return self.lines[-1]

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - killed below in any case
            pass
        kill_tree(self.proc.pid)
        self._reader.join(5)


def _count(line: dict, route: str) -> int:
    return line["counts"].get(route, 0)


def _losses(line: dict) -> int:
    ls = line["listener"]
    return ls["lost"] + (ls["kernel_drops"] or 0) + ls["dropped_backlog"]


def _mark(g, driver: Driver, message: str, timeout: float = 60.0) -> dict:
    """Make a marker request and wait until a marker is counted. One worker's datagrams
    arrive in the order sent, so once it is counted, every request made before it was
    handled, or lost on the way (which the loss counters show). Its own datagram can be lost
    too, when the flood has filled the kernel's buffer: then, and only once a loss counter
    has moved since it was sent, another marker is sent."""
    base = _count(driver.last, MARK)
    deadline = time.monotonic() + timeout
    sent = 0
    while True:
        losses = _losses(driver.last)
        assert g.get(MARK).status == 500
        sent += 1
        sent_at = time.monotonic()
        while True:
            if driver.proc.poll() is not None:
                raise AssertionError(f"engine process exited: {driver.proc.stderr.read()[-2000:]}")
            if _count(driver.last, MARK) > base:
                return driver.last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {message} "
                                     f"({sent} markers sent)")
            if _losses(driver.last) > losses and time.monotonic() - sent_at > 5:
                break  # it may be among the lost: send another
            time.sleep(0.05)


def _done(folder: Path, phase: int) -> Optional[List[dict]]:
    files = [folder / f"done{phase}-{age}.json" for age in range(1, SENDERS + 1)]
    if not all(f.exists() for f in files):
        return None
    return [json.loads(f.read_text()) for f in files]


def run_flood(folder: Path, events: int = 1_000_000, burst: int = 20_000, rate: float = 0,
              refresh: float = 0.5, seconds: float = 45.0, backlog_events: int = 0) -> Dict[str, object]:
    """Run both phases; return what was sent, made, and every snapshot line."""
    udp = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "PYTHONPATH": str(ROOT),
           "TROUBLE_RELEASE": str(folder / "release"), "FLOOD_DIR": str(folder),
           "FLOOD_PORT": str(udp), "FLOOD_SENDERS": str(SENDERS),
           "FLOOD_EVENTS": str(-(-events // SENDERS)), "FLOOD_RATE": str(rate / SENDERS),
           "FLOOD_SECONDS": str(seconds), "FLOOD_BURST": str(-(-burst // SENDERS))}
    out: Dict[str, object] = {}
    with gunicorn("trouble_app:app", "-w", str(SENDERS + 1), "-c", "hostile_flood_conf.py",
                  env=env, workers_expected=SENDERS + 1) as g:
        wait_until(lambda: all((folder / f"ready-{a}").exists() for a in range(1, SENDERS + 1)),
                   timeout=20, message="the flood senders")
        workers = g.worker_pids()
        driver = Driver(g.pid, udp, refresh, seconds * 3, backlog_events)
        try:
            driver.until(lambda s: s["workers"] == workers, 20, "the engine to see the four workers")
            # the real routes exist before the flood: the first max_routes names seen keep a
            # row of their own, later ones fold into <other> (no row is idle for a window here)
            made = 0
            for i in range(10):
                assert g.get(f"/fast/{i}").status == 200
                made += 1
            assert g.get(MARK).status == 500
            driver.until(lambda s: _count(s, REAL) == made and _count(s, MARK) == 1, 20,
                         "the first real requests")
            out["before"] = driver.last
            # Phase 1: a million distinct names; real requests all along
            (folder / "go").touch()
            t1 = time.monotonic()
            while _done(folder, 1) is None:
                assert time.monotonic() - t1 < seconds + 30, "phase 1 did not end"
                assert g.get(f"/fast/{made}").status == 200
                made += 1
            out["sent1"] = _done(folder, 1)
            out["phase1_s"] = time.monotonic() - t1
            out["phase1_t"] = (t1, time.monotonic())
            # a marker after the last real request: once it is counted, all before it were handled
            _mark(g, driver, "the marker after phase 1")
            out["after1"] = driver.last
            out["made1"] = made
            # Phase 2: the engine is stopped while the senders burst
            if burst:
                os.kill(driver.proc.pid, signal.SIGSTOP)
                stopped = time.monotonic()
                try:
                    (folder / "burst").touch()
                    wait_until(lambda: _done(folder, 2) is not None, timeout=seconds + 30,
                               message="the burst")
                finally:
                    os.kill(driver.proc.pid, signal.SIGCONT)
                out["stopped"] = (stopped, time.monotonic())
                out["sent2"] = _done(folder, 2)
                # the kernel's buffer is still full of the burst: send the marker once the
                # listener has read (or the kernel dropped) every datagram of the floods
                sent = sum(d["datagrams"] for k in ("sent1", "sent2") for d in out[k])
                driver.until(lambda s: s["listener"]["received"] + (s["listener"]["kernel_drops"] or 0)
                             >= sent, 30, "every datagram of the floods accounted for")
                # one datagram more from each sender: its sequence number shows what of the
                # burst's tail the kernel dropped (no later datagram, no gap to count)
                (folder / "tail").touch()
                wait_until(lambda: _done(folder, 3) is not None, timeout=30, message="the tails")
                out["sent3"] = _done(folder, 3)
                _mark(g, driver, "the marker after the burst")
                assert g.get("/fast/0").status == 200
                made += 1
                driver.until(lambda s: _count(s, REAL) >= out["after1"]["counts"][REAL] + 1, 30,
                             "a real request after the burst")
            # settle: every datagram sent is received or dropped, and one more snapshot
            sent = sum(d["datagrams"] for k in ("sent1", "sent2", "sent3") for d in out.get(k) or [])
            driver.until(lambda s: s["listener"]["received"] + (s["listener"]["kernel_drops"] or 0)
                         >= sent, 30, "every datagram sent accounted for")
            n = len(driver.lines)
            driver.until(lambda s: len(driver.lines) > n + 1, 10, "two more snapshots")
            out["made"] = made
            out["final"] = driver.last
            out["workers"] = workers
        except AssertionError as e:
            tail = [{k: v for k, v in line.items() if k != "sizes"} for line in driver.lines[-3:]]
            raise AssertionError(f"{e}; last snapshots: {json.dumps(tail)}") from None
        finally:
            (folder / "stop").touch()
            driver.stop()
        out["lines"] = driver.lines
        out["refresh"] = refresh
    return out


def test_flood_of_distinct_routes_and_far_above_capacity_stays_bounded(tmp_path):
    r = run_flood(tmp_path, events=1_000_000, burst=15_000)
    lines: List[dict] = r["lines"]  # type: ignore[assignment]
    final, after1, before = r["final"], r["after1"], r["before"]
    sent1 = sum(d["datagrams"] for d in r["sent1"])
    events1 = sum(d["events"] for d in r["sent1"])
    sent2 = sum(d["datagrams"] for d in r["sent2"])
    sent3 = sum(d["datagrams"] for d in r["sent3"])
    assert events1 >= 1_000_000 and not any(d["send_errors"] for d in r["sent1"])

    # Structural bounds, at every snapshot of the run
    for s in lines:
        assert s["routes"] <= s["max_routes"] + 1, s["routes"]
        assert s["backlog_max"] <= s["backlog_cap"] and s["backlog_events_max"] <= s["backlog_events_cap"]
        assert s["inbox_max"] <= s["inbox_cap"]
        sz = s["sizes"]
        assert sz["routes"] <= s["max_routes"] + 1 and sz["held_datagrams"] <= 512
        assert sz["distinct_dropped"] <= 1024 and sz["workers"] <= 8
        assert sz["hot_frames"] == 0 and sz["recent_requests"] <= 50 * 8

    # The overflow is shown: the names past the cap folded into <other> and their number
    # estimated (within 15 %: the estimator's error is ~3 %) once every datagram was folded
    assert final["routes"] == final["max_routes"] + 1
    overflow = events1 - final["max_routes"] + 2  # the two real routes came first
    l1 = after1["listener"]
    if l1["lost"] == l1["kernel_drops"] == l1["dropped_backlog"] == 0:
        assert abs(after1["routes_dropped"] - overflow) <= 0.15 * overflow, after1["routes_dropped"]
    else:
        assert 0 < after1["routes_dropped"] <= 1.15 * overflow, (after1["routes_dropped"], l1)

    # Received-accounted: every datagram the senders sent was received or dropped by the kernel;
    # the rest of what was received is the real beacon's (requests and in-flight reports).
    lst = final["listener"]
    assert lst["received"] == final["beacon"]["received"] == final["beacon"]["accepted"]
    extra = lst["received"] + (lst["kernel_drops"] or 0) - sent1 - sent2 - sent3
    assert 0 <= extra <= r["made"] + 10 * len(lines), extra

    # Losses flasktop caused itself are shown apart from losses on the way
    assert final["beacon"]["dropped_backlog"] == lst["dropped_backlog"]
    assert final["beacon"]["kernel_drops"] == lst["kernel_drops"]

    # Phase 2 was far above capacity: the kernel dropped, and it shows
    assert lst["kernel_drops"] and lst["kernel_drops"] > 0.5 * sent2
    assert sent3 == SENDERS and final["beacon"]["lost"] > 0
    post = [s for s in lines if s["mono"] > r["stopped"][1]]
    assert any(s["beacon"]["state"] == "degraded" and "lost" in s["beacon"]["detail"] for s in post)

    # The real route: every request counted, unless the counters say datagrams were lost
    made1 = r["made1"]
    counted1 = after1["counts"][REAL]
    losses1 = after1["listener"]["lost"] + after1["listener"]["dropped_backlog"]
    if losses1 == 0 and not after1["listener"]["kernel_drops"]:
        assert counted1 == made1
    else:
        assert made1 - MAX_EVENTS_PER_DATAGRAM * losses1 <= counted1 <= made1
    # the route kept its own row through both floods, and counts again afterwards
    assert final["counts"][REAL] == counted1 + 1
    assert final["workers"] == r["workers"]

    # The engine kept snapshotting: no gap between snapshots (outside the stop) much above refresh
    stop0, stop1 = r["stopped"]
    gaps = [b["mono"] - a["mono"] for a, b in zip(lines, lines[1:])
            if not (a["mono"] <= stop1 and b["mono"] >= stop0)]
    assert max(gaps) <= 10 * r["refresh"], max(gaps)
    assert before["counts"][REAL] == 10


def test_backlog_drops_have_their_own_field_in_the_snapshot():
    """flasktop falling behind (dropped_backlog) is told apart from loss on the way."""
    from flasktop.model import Model, ModelConfig
    from flasktop.model.events import ListenerStats

    t = 1_700_000_000.0
    model = Model(ModelConfig(), start=t)
    model.feed(ListenerStats(t=t, address="127.0.0.1:9711", received=10, accepted=10, events=10,
                             dropped_backlog=7), t)
    snap = model.snapshot(t + 1)
    assert snap.to_dict()["sources"]["beacon"].get("dropped_backlog") == 7
    from flasktop.report import render

    beacon_line = next(ln for ln in render(snap).splitlines() if ln.startswith("beacon "))
    assert "7 dropped by flasktop (it fell behind)" in beacon_line
