"""Fault injection against real gunicorn, real py-spy and real UDP (issue 5).

Shared pieces: a gunicorn started by its console script (a USR2 re-exec needs it), an Engine
run on its own collector thread exactly as the TUI runs it with every snapshot recorded, and
readers of /proc for "is this process stopped or traced" and "which py-spy are running".
Every process is killed by pid in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import (Callable, ContextManager, Dict, Iterable, List, NamedTuple, Optional, Set,
                    Tuple)

import psutil

from flasktop.engine import Engine
from flasktop.model import ModelConfig
from flasktop.model.events import StackSample, TopologyTick
from flasktop.model.snapshot import Snapshot
from tests.support import FIXTURES, Gunicorn, free_port, gunicorn, kill_tree, wait_until

ROOT = Path(__file__).resolve().parents[2]
GUNICORN_SCRIPT = Path(sys.executable).parent / "gunicorn"
STOPPED_STATES = ("T", "t")  # /proc State: stopped (signal) and tracing stop (ptrace)


class Finding(AssertionError):
    """A defect found in code this suite may not edit. Its test is marked
    ``xfail(strict=True, raises=Finding)``: any other failure of that test still fails the run,
    and once the defect is fixed the strict xfail fails until the mark is removed."""


def app_env(tmp_path: Path, udp: int, **extra: str) -> Dict[str, str]:
    """Environment for the fixture apps: where the beacon sends, where the hang's files live."""
    return {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "TROUBLE_RELEASE": str(tmp_path / "release"),
            "PYTHONPATH": str(ROOT), **extra}


def udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


class Fanout:
    """Copies every datagram sent to one loopback UDP port to several others, so that two
    monitors (the real CLI and an in-process engine) both hear one app's beacon."""

    def __init__(self, targets: Iterable[int]) -> None:
        self.targets = [("127.0.0.1", p) for p in targets]
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.copied = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fanout", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except OSError:
                continue
            for t in self.targets:
                with contextlib.suppress(OSError):
                    self.sock.sendto(data, t)
            self.copied += 1

    def __enter__(self) -> "Fanout":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class ScriptGunicorn(Gunicorn):
    """Started by ``.venv/bin/gunicorn``: ``python -m gunicorn`` cannot survive a USR2 re-exec
    (its ``__main__`` shadows the stdlib ``http``), the console script can."""

    def launcher(self) -> List[str]:
        return [str(GUNICORN_SCRIPT)]


def script_gunicorn(app: str, *args: str, workers_expected: Optional[int] = None,
                    env: Optional[dict] = None) -> ContextManager[ScriptGunicorn]:
    return gunicorn(app, *args, workers_expected=workers_expected, env=env, cwd=FIXTURES,
                    cls=ScriptGunicorn)  # type: ignore[return-value]


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL each pid and its descendants (orphans a dead master left behind, a new master)."""
    for pid in pids:
        kill_tree(pid)


# --------------------------------------------------------------------------- /proc readers

def proc_state(pid: int) -> Tuple[str, int]:
    """(State letter, TracerPid) of ``pid``; ("", 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return "", 0
    return fields.get("State", " ").strip()[:1], int(fields.get("TracerPid", "0").strip() or 0)


def frozen(pids: Iterable[int]) -> Dict[int, Tuple[str, int]]:
    """The pids among ``pids`` that are stopped, in tracing stop, or traced by anyone."""
    out = {}
    for pid in pids:
        state, tracer = proc_state(pid)
        if state in STOPPED_STATES or tracer:
            out[pid] = (state, tracer)
    return out


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its stopped or dead parent has not reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kernel_children(pid: int) -> List[int]:
    """Children of ``pid`` from ``/proc/<pid>/task/*/children``: a few small reads, cheap
    enough to poll every few milliseconds (psutil's children() reads every process)."""
    out: List[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    return out


def pyspy_children(pid: int) -> List[int]:
    """py-spy processes that ``pid`` started and that are still running (not zombies)."""
    out = []
    for kid in kernel_children(pid):
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() != "py-spy":
                    continue
        except OSError:
            continue
        if proc_state(kid)[0] not in ("", "Z", "X"):
            out.append(kid)
    return out


def pyspy_on(targets: Iterable[int]) -> List[int]:
    """Any running py-spy on this machine whose ``--pid`` is one of ``targets``."""
    want = {str(t) for t in targets}
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if "py-spy" in (p.info["name"] or "") or any("py-spy" in a for a in cmd[:1]):
                if any(cmd[i] == "--pid" and cmd[i + 1] in want for i in range(len(cmd) - 1)) \
                        and running(p.pid):
                    out.append(p.pid)
        except (psutil.Error, IndexError):
            continue
    return out


# --------------------------------------------------------------------------- the engine, watched

class Record(NamedTuple):
    mono: float  # time.monotonic() when the collector handed the snapshot out
    snap: Snapshot
    sizes: Dict[str, int]  # Model.sizes(), read on the collector thread
    tracked: int  # processes the poller keeps state for
    targets: int  # pids the sampler's schedule holds


class Watch:
    """An :class:`Engine` on its own collector thread, as ``flasktop --pid`` runs it.

    Every snapshot is recorded with the model's store sizes (read on the collector thread, the
    only one allowed to touch the model), every TopologyTick the poller posts with the time it
    was posted, and every StackSample with its dump time.
    """

    def __init__(self, master_pid: int, udp: Optional[int], refresh: float = 1.0,
                 sample_interval: float = 0.5, pyspy: bool = True,
                 config: Optional[ModelConfig] = None) -> None:
        self.engine = Engine(master_pid, beacon=("127.0.0.1", udp) if udp else None,
                             refresh=refresh, sample_interval=sample_interval, pyspy=pyspy,
                             config=config)
        self.refresh = refresh
        self.records: List[Record] = []
        # (monotonic time it was posted, its workers, its new master)
        self.ticks: List[Tuple[float, Tuple[int, ...], Optional[int]]] = []
        self.samples: List[StackSample] = []
        self.errors: List[str] = []
        self._lock = threading.Lock()
        post_tick = self.engine.poller.sink

        def tick_tap(event: object) -> None:
            if isinstance(event, TopologyTick):
                with self._lock:
                    self.ticks.append((time.monotonic(), tuple(w.pid for w in event.workers),
                                       event.new_master_pid))
            post_tick(event)
        self.engine.poller.sink = tick_tap
        if self.engine.sampler is not None:
            post_sample = self.engine.sampler.sink

            def sample_tap(event: object) -> None:
                if isinstance(event, StackSample):
                    with self._lock:
                        self.samples.append(event)
                post_sample(event)
            self.engine.sampler.sink = sample_tap

    def _on(self, snap: Snapshot) -> None:
        e = self.engine
        try:
            rec = Record(time.monotonic(), snap, e.model.sizes(), e.poller.tracked,
                         len(e.sampler.schedule.targets) if e.sampler is not None else 0)
        except Exception as exc:  # noqa: BLE001 - reported by the test, never swallowed silently
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            self.records.append(rec)

    def start(self) -> "Watch":
        self.engine.start(self._on)
        return self

    def stop(self) -> None:
        self.engine.stop()

    def __enter__(self) -> "Watch":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading

    def mark(self) -> int:
        """An index into :attr:`records`: wait for snapshots after this point."""
        with self._lock:
            return len(self.records)

    def latest(self) -> Optional[Record]:
        with self._lock:
            return self.records[-1] if self.records else None

    def wait(self, cond: Callable[[Snapshot], object], timeout: float = 15.0,
             message: str = "a snapshot", since: int = 0) -> Record:
        """The first recorded snapshot (from index ``since``) for which ``cond`` holds."""
        def find() -> Optional[Record]:
            with self._lock:
                recs = self.records[since:]
            return next((r for r in recs if cond(r.snap)), None)
        return wait_until(find, timeout=timeout, interval=0.05, message=message)

    def gaps(self, since: int = 0) -> List[float]:
        """Seconds between successive snapshots, each divided by the refresh."""
        with self._lock:
            monos = [r.mono for r in self.records[since:]]
        return [(b - a) / self.refresh for a, b in zip(monos, monos[1:])]

    def ticks_since(self, mono: float) -> List[Tuple[float, Tuple[int, ...], Optional[int]]]:
        with self._lock:
            return [t for t in self.ticks if t[0] >= mono]

    def records_since(self, mono: float) -> List[Record]:
        with self._lock:
            return [r for r in self.records if r.mono >= mono]


def worker_pids(snap: Snapshot) -> Set[int]:
    return {w.pid for w in snap.workers}


def events_of(snap: Snapshot, kind: str) -> list:
    return [e for e in snap.events if e.kind == kind]


def cli(*args: str) -> List[str]:
    """The command line of ``python -m flasktop ...`` with this interpreter."""
    return [sys.executable, "-m", "flasktop", *args]


def cli_env(**extra: str) -> Dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("FLASKTOP_DEBUG", None)
    return env
