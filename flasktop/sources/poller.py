"""The psutil poller: one honest :class:`TopologyTick` per interval for one gunicorn master.

Each tick lists exactly the live workers (children of the master, minus a USR2
replacement master, which is reported as ``new_master_pid``), with one
:class:`ProcStats` each. ``psutil.Process`` objects are kept between ticks (CPU%
needs two readings) and dropped as soon as their pid leaves, so crash loops
cannot grow our state. A field that cannot be read is None and named in
``missing`` with the reason; a process that vanishes mid-read is simply not live.

Cost per tick: a listing of ``/proc`` and a ``stat`` read of only the pids new
since the last tick to find the master's children (or the kernel's
``children`` file where it exists), then per process one
``oneshot()`` read of stat/statm/status, one readlink pass over its fds
(count, sockets, heartbeat file) and one ``stat`` of its heartbeat file;
USS/PSS (``smaps_rollup``) only every ``uss_interval``. See bench/poller_cost.py.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

import psutil

from flasktop.model.events import GunicornConfig, ProcStats, SourceState, TopologyTick
from flasktop.sources.gunicorn import (
    PROC, cmdline, fd_targets, is_heartbeat_target, looks_like_gunicorn, new_master_verdict,
    read_config, read_stat, socket_inodes,
)

ROLE_SETTLE_S = 2.0  # a child younger than this may not have exec'd yet (USR2): re-check its role
DENIED = "access denied"
HB_STARTING = "several wgunicorn files open (worker starting)"
HB_CLOSED = "heartbeat file closed (worker exiting)"
_BENIGN = ("first reading", HB_STARTING, HB_CLOSED)  # passing states, not a problem to report
_LABELS = {"num_fds": "fds", "num_connections": "sockets", "heartbeat_age_s": "heartbeat",
           "uss": "uss", "pss": "pss", "cpu_percent": "cpu", "num_threads": "threads", "rss": "rss",
           "status": "status"}
_FIELD_ORDER = list(_LABELS)


class _ProcessTable:
    """pid -> ppid for the whole machine, refreshed incrementally.

    A process's parent only changes when it is re-parented to init or a subreaper,
    never *to* a gunicorn master, so only pids that are new since the last listing
    need their ``stat`` read. A reused pid would have to wrap the whole pid space
    between two refreshes to be missed; a full re-read every ``FULL_EVERY_S`` covers that.
    """

    FULL_EVERY_S = 60.0

    def __init__(self) -> None:
        self.ppid: Dict[int, int] = {}
        self._full_at = -1e18

    def refresh(self, mono: float) -> None:
        try:
            pids = {int(n) for n in os.listdir(PROC) if n.isdigit()}
        except OSError:
            return
        if mono - self._full_at >= self.FULL_EVERY_S:
            self._full_at = mono
            self.ppid = {}
        table = self.ppid
        for pid in [p for p in table if p not in pids]:
            del table[pid]
        for pid in pids:
            if pid not in table:
                st = read_stat(pid)
                if st is not None:
                    table[pid] = st[1]

    def children(self, pid: int) -> List[int]:
        return [p for p, pp in self.ppid.items() if pp == pid]


class _Gone(Exception):
    """The process exited (or became a zombie) while we read it."""


class _Tracked:
    """What we keep about one live process between ticks."""

    __slots__ = ("pid", "start", "proc", "create_time", "hb_fd", "next_uss", "uss_missing",
                 "cpu_primed", "role", "role_final")

    def __init__(self, pid: int, start: int, proc: psutil.Process) -> None:
        self.pid = pid
        self.start = start
        self.proc = proc
        self.create_time = proc.create_time()
        self.hb_fd: Optional[int] = None
        self.next_uss = 0.0
        self.uss_missing: Optional[str] = None
        self.cpu_primed = False
        self.role = "worker"
        self.role_final = False


def _field(name: str, fn: Callable[[], object], missing: List[Tuple[str, str]]) -> object:
    try:
        return fn()
    except psutil.NoSuchProcess:  # ZombieProcess included
        raise _Gone() from None
    except psutil.AccessDenied:
        missing.append((name, DENIED))
    except Exception as e:  # noqa: BLE001 - one odd field must not lose the process
        missing.append((name, f"error: {type(e).__name__}"))
    return None


def _kernel_children(pid: int) -> Optional[List[int]]:
    """Children from ``/proc/<pid>/task/*/children`` (CONFIG_PROC_CHILDREN); None if unsupported."""
    try:
        tids = os.listdir(f"{PROC}/{pid}/task")
    except OSError:
        return None
    out: List[int] = []
    for tid in tids:
        try:
            with open(f"{PROC}/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            if tid == str(pid):
                return None
        except (OSError, ValueError):
            continue
    return out


def heartbeat_age(st: os.stat_result, mono: float, wall: float) -> float:
    """Seconds since the worker last notified the master through its ``wgunicorn-*`` file.

    gunicorn >= 22 stamps the file's atime/mtime with ``time.monotonic()`` (os.utime on the
    fd) and the master compares ``time.monotonic() - st_mtime`` against ``--timeout``; we do
    the same. Before the first notify (and in gunicorn <= 21, which flipped the mode with
    fchmod) the mtime is a wall-clock time, and the inode change time, which both kinds of
    notify update, is the one to read.
    """
    if 0 < st.st_mtime < 1e9 and st.st_mtime <= mono + 1.0:
        return max(0.0, mono - st.st_mtime)
    return max(0.0, wall - st.st_ctime)


class Poller:
    """Polls one gunicorn master and its workers; ``sink`` gets TopologyTick and SourceState."""

    def __init__(self, master_pid: int, sink: Callable[[object], None], interval: float = 1.0,
                 uss_interval: float = 10.0) -> None:
        self.master_pid = master_pid
        self.sink = sink
        self.interval = max(0.05, float(interval))
        self.uss_interval = max(self.interval, float(uss_interval))
        self.state: Optional[SourceState] = None
        self.sink_errors = 0
        self._master: Optional[_Tracked] = None
        self._master_dead = False
        self._procs: Dict[int, _Tracked] = {}
        self._new_master: Optional[Tuple[int, int]] = None  # (pid, start ticks)
        self._config: Optional[GunicornConfig] = None
        self._config_path: Optional[str] = None
        self._config_mtime: Optional[float] = None
        self._kernel_children: Optional[bool] = None
        self._table = _ProcessTable()
        self._table_fresh = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._emitted: Optional[Tuple[str, str]] = None

    @property
    def tracked(self) -> int:
        """Processes we keep state for (the live workers and a new master): bounded by design."""
        return len(self._procs)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- thread ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="flasktop-psutil", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread promptly (it wakes at once) and join it."""
        self._stop.set()
        th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(timeout)
        self._thread = None

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                tick = self.poll_once()
            except Exception as e:  # noqa: BLE001 - the poller must outlive any surprise
                line = f"poll failed: {type(e).__name__}: {e}".splitlines()[0][:200]
                self.state = SourceState("psutil", "error", line, t=time.time())
            else:
                self._emit(tick)
            if self.state is not None and (self.state.state, self.state.detail) != self._emitted:
                self._emitted = (self.state.state, self.state.detail)
                self._emit(self.state)
            next_t += self.interval
            now = time.monotonic()
            if next_t <= now:
                next_t = now + self.interval
            self._stop.wait(next_t - now)

    def _emit(self, event: object) -> None:
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a broken sink must not stop polling
            self.sink_errors += 1

    # -- one poll -------------------------------------------------------------------

    def poll_once(self) -> TopologyTick:
        """Read the master and its live workers now; also updates :attr:`state`."""
        with self._lock:
            return self._poll()

    def _poll(self) -> TopologyTick:
        wall, mono = time.time(), time.monotonic()
        master = self._master_alive()
        if self._config is None:
            self._config, self._config_path = read_config(self.master_pid)
            self._config_mtime = self._mtime(self._config_path)
        if master is None:
            return self._dead_tick(wall)
        master_stats: Optional[ProcStats] = None
        master_sockets: Set[int] = set()
        try:
            master_stats, master_sockets = self._read(master, wall, mono, worker=False, shared=set())
        except _Gone:
            self._master_dead = True
            return self._dead_tick(wall)

        self._table_fresh = False
        kids = self._children(self.master_pid)
        seen: Set[int] = set()
        workers: List[ProcStats] = []
        new_master: Optional[int] = None
        grown = False
        for pid in sorted(kids):
            st = read_stat(pid)
            if st is None or st[0] in "ZX" or st[1] != self.master_pid:
                continue
            tr = self._procs.get(pid)
            if tr is None or tr.start != st[2]:
                try:
                    tr = _Tracked(pid, st[2], psutil.Process(pid))
                except psutil.Error:
                    continue
                self._procs[pid] = tr
                grown = True
            seen.add(pid)
            if not tr.role_final:
                self._classify(tr, wall)
            if tr.role == "new_master":
                new_master = pid
                self._new_master = (pid, tr.start)
                continue
            try:
                stats, _ = self._read(tr, wall, mono, worker=True, shared=master_sockets)
            except _Gone:
                seen.discard(pid)
                continue
            workers.append(stats)
        for pid in [p for p in self._procs if p not in seen]:
            del self._procs[pid]
        if new_master is None and self._new_master is not None and not self._alive(*self._new_master):
            self._new_master = None
        if grown:
            self._maybe_reread_config()
        tick = TopologyTick(t=wall, master_pid=self.master_pid, master_alive=True,
                            master=master_stats, workers=tuple(workers), config=self._config,
                            new_master_pid=new_master)
        self.state = self._summarise(tick, wall)
        return tick

    def _dead_tick(self, wall: float) -> TopologyTick:
        self._procs.clear()
        new_master = None
        if self._new_master is not None and self._alive(*self._new_master):
            new_master = self._new_master[0]
        detail = f"gunicorn master {self.master_pid} has exited"
        if new_master is not None:
            detail += f"; its USR2 replacement, master {new_master}, is running"
        self.state = SourceState("psutil", "missing", detail, t=wall)
        return TopologyTick(t=wall, master_pid=self.master_pid, master_alive=False, master=None,
                            workers=(), config=self._config or GunicornConfig(),
                            new_master_pid=new_master)

    # -- topology -------------------------------------------------------------------

    @staticmethod
    def _alive(pid: int, start: int) -> bool:
        st = read_stat(pid)
        return st is not None and st[0] not in "ZX" and st[2] == start

    def _master_alive(self) -> Optional[_Tracked]:
        if self._master_dead:
            return None
        st = read_stat(self.master_pid)
        if self._master is None:
            if st is None or st[0] in "ZX":
                self._master_dead = True
                return None
            try:
                self._master = _Tracked(self.master_pid, st[2], psutil.Process(self.master_pid))
            except psutil.Error:
                self._master_dead = True
                return None
            self._master.role, self._master.role_final = "master", True
            return self._master
        if st is None or st[0] in "ZX" or st[2] != self._master.start:
            self._master_dead = True
            self._master = None
            return None
        return self._master

    def _children(self, pid: int) -> List[int]:
        """Children of ``pid``: the kernel's list if it keeps one, else one /proc pass per tick."""
        if self._kernel_children is not False:
            kids = _kernel_children(pid)
            if self._kernel_children is None:
                self._kernel_children = kids is not None
            if kids is not None:
                return kids
        if not self._table_fresh:
            self._table.refresh(time.monotonic())
            self._table_fresh = True
        return self._table.children(pid)

    def _classify(self, tr: _Tracked, wall: float) -> None:
        """Worker or USR2 replacement master (final once the child is old enough to have exec'd)."""
        verdict = new_master_verdict(tr.pid, self.master_pid)
        if verdict is None:  # environment unreadable: a master has gunicorn children of its own
            verdict = False
            for k in self._children(tr.pid)[:8]:
                st = read_stat(k)
                if st is None or st[0] in "ZX":
                    continue
                argv = cmdline(k)
                if argv is not None and looks_like_gunicorn(argv):
                    verdict = True
                    break
            tr.role = "new_master" if verdict else "worker"
            tr.role_final = False
            return
        tr.role = "new_master" if verdict else "worker"
        tr.role_final = verdict or wall - tr.create_time > ROLE_SETTLE_S

    # -- one process ----------------------------------------------------------------

    def _read(self, tr: _Tracked, wall: float, mono: float, worker: bool,
              shared: Set[int]) -> Tuple[ProcStats, Set[int]]:
        """ProcStats of one process and its socket inodes; raises _Gone if it exited."""
        missing: List[Tuple[str, str]] = []
        p = tr.proc
        rss = uss = pss = None
        with p.oneshot():
            status = _field("status", p.status, missing)
            if status == psutil.STATUS_ZOMBIE:
                raise _Gone()
            if tr.next_uss <= mono:
                tr.next_uss = mono + self.uss_interval
                tr.uss_missing = None
                try:
                    full = p.memory_full_info()
                    rss, uss, pss = full.rss, full.uss, getattr(full, "pss", None)
                except psutil.NoSuchProcess:
                    raise _Gone() from None
                except psutil.AccessDenied:
                    tr.uss_missing = DENIED
                except Exception as e:  # noqa: BLE001
                    tr.uss_missing = f"error: {type(e).__name__}"
            if tr.uss_missing:
                missing += [("uss", tr.uss_missing), ("pss", tr.uss_missing)]
            if rss is None:
                mem = _field("rss", p.memory_info, missing)
                rss = getattr(mem, "rss", None)
            cpu = _field("cpu_percent", lambda: p.cpu_percent(None), missing)
            if cpu is not None and not tr.cpu_primed:
                tr.cpu_primed = True
                cpu = None
                missing.append(("cpu_percent", "first reading"))
            threads = _field("num_threads", p.num_threads, missing)
        num_fds = conns = hb = None
        sockets: Set[int] = set()
        try:
            targets = fd_targets(tr.pid)
        except PermissionError:
            missing += [("num_fds", DENIED), ("num_connections", DENIED)]
            if worker:
                missing.append(("heartbeat_age_s", DENIED))
        except FileNotFoundError:
            raise _Gone() from None
        except OSError as e:
            reason = f"error: {e.strerror or type(e).__name__}"
            missing += [("num_fds", reason), ("num_connections", reason)]
        else:
            num_fds = len(targets)
            sockets = socket_inodes(targets.values())
            conns = len(sockets - shared)
            if worker:
                hb = self._heartbeat(tr, targets, mono, wall, missing)
        stats = ProcStats(
            pid=tr.pid, create_time=tr.create_time, t=wall, rss=rss, uss=uss, pss=pss,
            cpu_percent=cpu, num_threads=threads, num_fds=num_fds, num_connections=conns,
            heartbeat_age_s=hb, status=status if isinstance(status, str) else "",
            missing=tuple(missing))
        return stats, sockets

    @staticmethod
    def _heartbeat(tr: _Tracked, targets: Dict[int, str], mono: float, wall: float,
                   missing: List[Tuple[str, str]]) -> Optional[float]:
        files = [fd for fd, t in targets.items() if is_heartbeat_target(t)]
        if tr.hb_fd not in files:
            tr.hb_fd = files[0] if len(files) == 1 else None
        if tr.hb_fd is None:
            missing.append(("heartbeat_age_s", HB_STARTING if files
                            else "no wgunicorn heartbeat file open"))
            return None
        try:
            st = os.stat(f"{PROC}/{tr.pid}/fd/{tr.hb_fd}")
        except PermissionError:
            missing.append(("heartbeat_age_s", DENIED))
            return None
        except OSError:
            tr.hb_fd = None
            missing.append(("heartbeat_age_s", HB_CLOSED))
            return None
        return heartbeat_age(st, mono, wall)

    # -- config and state -----------------------------------------------------------

    @staticmethod
    def _mtime(path: Optional[str]) -> Optional[float]:
        if path is None:
            return None
        try:
            return os.stat(path).st_mtime
        except OSError:
            return None

    def _maybe_reread_config(self) -> None:
        """New workers after an edit of the config file: gunicorn reloaded it (HUP); so do we."""
        if self._config_path is not None and self._mtime(self._config_path) != self._config_mtime:
            self._config, self._config_path = read_config(self.master_pid)
            self._config_mtime = self._mtime(self._config_path)

    def _summarise(self, tick: TopologyTick, wall: float) -> SourceState:
        by_reason: Dict[str, Tuple[Set[str], int, bool]] = {}
        procs = [(s, False) for s in tick.workers] + ([(tick.master, True)] if tick.master else [])
        for stats, is_master in procs:
            reasons: Dict[str, Set[str]] = {}
            for field, reason in stats.missing:
                if reason not in _BENIGN:
                    reasons.setdefault(reason, set()).add(field)
            for reason, fields in reasons.items():
                f0, n0, m0 = by_reason.get(reason, (set(), 0, False))
                by_reason[reason] = (f0 | fields, n0 + (0 if is_master else 1), m0 or is_master)
        if not by_reason:
            return SourceState("psutil", "ok", f"polling master {self.master_pid} every "
                               f"{self.interval:g} s", t=wall)
        parts = []
        for reason in sorted(by_reason, key=lambda r: (r != DENIED, r)):
            fields, n, with_master = by_reason[reason]
            names = ", ".join(_LABELS.get(f, f) for f in sorted(
                fields, key=lambda f: _FIELD_ORDER.index(f) if f in _FIELD_ORDER else 99))
            who = f"{n} worker{'s' if n != 1 else ''}" if n else ""
            if with_master:
                who = f"{who} and the master" if who else "the master"
            hint = " (run as the workers' user or root)" if reason == DENIED else ""
            parts.append(f"{names} unreadable for {who}: {reason}{hint}")
        return SourceState("psutil", "degraded", "; ".join(parts), t=wall)


__all__ = ["Poller", "heartbeat_age"]
