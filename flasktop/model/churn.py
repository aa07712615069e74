"""Worker churn: successive topology ticks in, classified WorkerEvents out (bounded)."""

from __future__ import annotations

from collections import deque
from typing import Deque, List, NamedTuple, Optional, Tuple

from flasktop.model.config import ModelConfig
from flasktop.model.snapshot import WorkerEvent


class Departure(NamedTuple):
    """What was known of a worker when it vanished."""

    pid: int
    t: float  # the tick that found it gone
    lifetime: float
    route: Optional[str]  # the route template of its oldest request
    method: str
    stack: Optional[Tuple[str, ...]]  # its last sampled stack (the serving thread's)
    request_age: Optional[float]  # age of its oldest request at ``t`` (lower bound without beacon)
    heartbeat_age: Optional[float]
    served: int  # requests the beacon saw it complete
    busy: bool
    known_served: bool  # the beacon saw its whole life (so ``served`` is its true count)


class Arrival(NamedTuple):
    pid: int
    t: float
    create_time: float


def _s(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


_RANK = {"timeout_killed": 0, "exited": 0, "recycled": 0, "removed": 0, "master_exited": 0,
         "started": 2, "added": 2}  # at the same instant, departures read before arrivals


def _label(d: Departure) -> str:
    return f"{d.method} {d.route}".strip()


class Churn:
    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.events: Deque[WorkerEvent] = deque(maxlen=cfg.max_events)
        self.exits: List[Departure] = []
        self.starts: List[Arrival] = []
        self.count0 = 0
        self.batch_t0: Optional[float] = None
        self.last_change = 0.0
        self.short_exits: Deque[float] = deque(maxlen=max(64, 4 * cfg.crash_min_exits))
        self.crash_t: Optional[float] = None  # last crash_loop event
        self.crash_count = 0
        self.master_exited_t: Optional[float] = None
        self.new_master: Optional[int] = None
        self.timeouts: Deque[WorkerEvent] = deque(maxlen=64)
        self.provisional: List[WorkerEvent] = []  # this batch's "started" events, revisable
        self.expected: Optional[int] = None  # workers gunicorn should have: --workers, TTIN, TTOU
        self.alive = 0
        self.short_since: Optional[float] = None  # since when fewer are alive than expected

    def master(self, t: float, pid: int, alive: bool, new_master: Optional[int]) -> None:
        if not alive and self.master_exited_t is None:
            self.master_exited_t = t
            self.exits.clear()
            self.starts.clear()
            self.provisional = []
            self.batch_t0 = None
            self.events.append(WorkerEvent(t, "master_exited", pid,
                                           f"gunicorn master {pid} exited; its workers go with it"))
        elif alive:
            self.master_exited_t = None
        if new_master is not None and new_master != self.new_master:
            self.events.append(WorkerEvent(t, "master_replaced", new_master,
                                           f"new gunicorn master {new_master} started by {pid} "
                                           "(USR2 upgrade)"))
        self.new_master = new_master

    def observe(self, t: float, count_before: int, count_after: int, starts: List[Arrival],
                exits: List[Departure], timeout: float, max_requests: Optional[int],
                configured: Optional[int] = None) -> None:
        """Fold one tick's arrivals and departures.

        Unambiguous news goes out at once: a timeout kill, and a "started" event per new
        worker (unless a crash loop is on). The rest waits for the batch to settle, since only
        the whole batch tells a reload from exits, and TTIN/TTOU from replacements; then the
        batch's "started" events may be rewritten as one "reloaded", or as "added".
        """
        if self.master_exited_t is not None:
            return
        if self.expected is None:
            self.expected = configured or count_before or None
        self.alive = count_after
        # A master always runs at least one worker: with none alive it is short even when
        # how many it should have is unknown (a process title hides --workers).
        if count_after < (self.expected or 1):
            if self.short_since is None:
                self.short_since = t
        else:
            self.short_since = None
        if starts or exits:
            if self.batch_t0 is None:
                self.batch_t0 = t
                self.count0 = count_before
                self.provisional = []
            self.last_change = t
            self.starts.extend(starts)
            for d in exits:
                if self._timed_out(d, timeout):
                    ev = self._timeout_event(d, timeout)
                    self.events.append(ev)
                    self.timeouts.append(ev)
                else:
                    self.exits.append(d)
            crashing = self.crash_t is not None and t - self.crash_t < self.cfg.crash_window_s
            for a in starts:
                if not crashing:
                    ev = WorkerEvent(a.t, "started", a.pid, f"worker {a.pid} started")
                    self.events.append(ev)
                    self.provisional.append(ev)
        if self.batch_t0 is None:
            return
        if (t - self.last_change >= self.cfg.settle_s or t - self.batch_t0 >= self.cfg.max_batch_s
                or len(self.exits) + len(self.starts) >= self.cfg.max_pending_exits):
            self._classify(t, count_after, max_requests, configured)

    def _retract(self, gone: List[WorkerEvent]) -> None:
        """Take provisional events back out of the history (they are being rewritten)."""
        if gone:
            ids = {id(e) for e in gone}
            kept = [e for e in self.events if id(e) not in ids]
            self.events.clear()
            self.events.extend(kept)

    def _classify(self, t: float, count1: int, max_requests: Optional[int],
                  configured: Optional[int]) -> None:
        cfg = self.cfg
        exits = sorted(self.exits, key=lambda d: (d.t, d.pid))
        starts = sorted(self.starts, key=lambda a: (a.create_time, a.pid))
        provisional = {e.pid: e for e in self.provisional}
        count0 = self.count0
        self.exits, self.starts, self.provisional, self.batch_t0 = [], [], [], None
        out: List[WorkerEvent] = []

        # Deliberate departures first: max_requests spent, and TTOU (the count went down;
        # gunicorn retires the oldest). Neither counts towards a crash loop.
        spent = [d for d in exits if self._spent(d, max_requests)]
        out.extend(self._recycle_event(d, max_requests) for d in spent)
        rest = [d for d in exits if not self._spent(d, max_requests)]
        n_removed = max(0, count0 - count1) if count1 else 0  # TTOU never goes below one
        removed = sorted((d for d in rest if not d.busy), key=lambda d: (-d.lifetime, d.pid))
        removed = removed[:n_removed]
        for d in removed:
            out.append(WorkerEvent(d.t, "removed", d.pid,
                                   f"worker {d.pid} removed (TTOU: {count0} -> {count1} "
                                   f"workers) after {_s(d.lifetime)}"))
        rest = [d for d in rest if d not in removed]

        short = [d for d in rest if d.lifetime < cfg.crash_lifetime_s]
        for d in short:
            self.short_exits.append(d.t)
        while self.short_exits and self.short_exits[0] < t - cfg.crash_window_s:
            self.short_exits.popleft()
        crashing = len(self.short_exits) >= cfg.crash_min_exits
        if crashing:
            self.crash_count = len(self.short_exits)
            if self.crash_t is None or t - self.crash_t >= cfg.crash_window_s:
                self.crash_t = t
                out.append(WorkerEvent(t, "crash_loop", None,
                                       f"crash loop: {len(self.short_exits)} workers died within "
                                       f"{_s(cfg.crash_lifetime_s)} of starting in the last "
                                       f"{_s(cfg.crash_window_s)}"))
            rest = [d for d in rest if d.lifetime >= cfg.crash_lifetime_s]
            self._retract(list(provisional.values()))  # replacements of dying workers
            starts = []

        fresh = len(starts) - len(spent)
        if (not crashing and len(rest) >= 2 and len(rest) >= cfg.reload_fraction * max(count0, 1)
                and fresh >= cfg.reload_fraction * len(rest)):
            span = max(d.t for d in rest) - min(min(d.t for d in rest), min(a.t for a in starts))
            self._retract(list(provisional.values()))
            self.expected = configured or max(self.expected or 0, count1) or None
            out.append(WorkerEvent(rest[-1].t, "reloaded", None,
                                   f"reload (HUP): {len(rest)} workers replaced by {fresh} "
                                   f"new ones within {_s(max(span, 0.0))}; master unchanged"))
            self._emit(out)
            return

        for d in rest:
            if self._recycled(d, max_requests):
                out.append(self._recycle_event(d, max_requests))
            else:
                what = f" while serving {_label(d)}" if d.busy and d.route else ""
                out.append(WorkerEvent(d.t, "exited", d.pid,
                                       f"worker {d.pid} exited after {_s(d.lifetime)}{what}",
                                       route=d.route if d.busy else None,
                                       stack=d.stack if d.busy else None))
        added = max(0, count1 - max(count0, configured or 0))  # filling up to --workers: started
        grown = starts[len(starts) - min(added, len(starts)):] if added else []
        if self.expected is not None:
            self.expected = max(1, self.expected + len(grown) - len(removed))
        self._retract([provisional[a.pid] for a in grown if a.pid in provisional])
        for a in grown:
            out.append(WorkerEvent(a.t, "added", a.pid,
                                   f"worker {a.pid} added (TTIN: {count0} -> {count1} workers)"))
        self._emit(out)

    def _emit(self, out: List[WorkerEvent]) -> None:
        """Merge classified events into the history, which stays in time order."""
        if not out:
            return
        merged = sorted(list(self.events) + out, key=lambda e: (e.t, _RANK.get(e.kind, 1)))
        self.events.clear()
        self.events.extend(merged[-self.events.maxlen:] if self.events.maxlen else merged)

    def _timed_out(self, d: Departure, timeout: float) -> bool:
        limit = self.cfg.timeout_kill_fraction * timeout
        return ((d.request_age is not None and d.request_age >= limit)
                or (d.heartbeat_age is not None and d.heartbeat_age >= limit))

    def _spent(self, d: Departure, max_requests: Optional[int]) -> bool:
        """Idle after serving about max_requests (as far as the beacon saw)."""
        return bool(max_requests) and not d.busy \
            and d.served >= self.cfg.recycle_fraction * max_requests  # type: ignore[operator]

    def _recycled(self, d: Departure, max_requests: Optional[int]) -> bool:
        if not max_requests or d.busy:
            return False
        return self._spent(d, max_requests) or not d.known_served

    def _recycle_event(self, d: Departure, max_requests: Optional[int]) -> WorkerEvent:
        if self._spent(d, max_requests):
            text = (f"worker {d.pid} recycled after {d.served} requests "
                    f"(max_requests {max_requests})")
        else:
            text = f"worker {d.pid} exited idle: probably recycled (max_requests {max_requests})"
        return WorkerEvent(d.t, "recycled", d.pid, text)

    def _timeout_event(self, d: Departure, timeout: float) -> WorkerEvent:
        age = d.request_age if d.request_age is not None else d.heartbeat_age
        where = f" in {d.stack[0]}" if d.stack else ""
        on = f" on {_label(d)}" if d.route else ""
        return WorkerEvent(d.t, "timeout_killed", d.pid,
                           f"worker {d.pid} killed by the timeout ({_s(timeout)}) after "
                           f"{_s(age or 0.0)}{on}{where}", route=d.route, stack=d.stack)
