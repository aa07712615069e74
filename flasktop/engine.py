"""Wiring: three sources feed one model on one collector thread; snapshots go out.

Data flows one way. The poller and the sampler push events into a bounded
inbox from their own threads; the listener keeps its own bounded backlog of
decoded datagrams. The collector thread is the only one that touches the
model: it drains both a few times a second, folds them in, and about once a
second builds an immutable :class:`Snapshot` and hands it to whoever asked
(the Textual app via ``post_message``, or ``flasktop snapshot``). Nothing here
runs on the UI thread.
"""

from __future__ import annotations

import collections
import os
import shutil
import threading
import time
from typing import Callable, Deque, List, Optional, Tuple

from flasktop.model import Model, ModelConfig
from flasktop.model.events import SourceState, TopologyTick
from flasktop.model.snapshot import BUSY, STUCK, Snapshot
from flasktop.sources.listener import Listener
from flasktop.sources.poller import Poller
from flasktop.sources.pyspy import Sampler

INBOX_LIMIT = 20_000  # events from the poller and sampler between two drains; far above their rates
# Folding the whole backlog in one pass held the next snapshot back for as long as that took
# (up to the listener's 250,000-event cap: 7x the refresh was measured on a busy 2-core box
# during a million-route flood, bench/flood_memory.py). Folding is now done in budgeted
# chunks, with a snapshot whenever one is due, and what waits counts against the cap.
FOLD_BUDGET = 0.2  # seconds of beacon folding per collector pass, at most half the refresh
DRAIN_CHUNK = 256  # datagrams taken from the listener at a time within the budget
PY_SPY_ENV = "FLASKTOP_PY_SPY"  # the py-spy binary to run, when not next to Python or on PATH


def py_spy_from_env() -> Optional[str]:
    """The py-spy named by $FLASKTOP_PY_SPY, or None (then: next to this Python, then PATH)."""
    value = os.environ.get(PY_SPY_ENV, "").strip()
    return value or None


class Engine:
    """Owns the sources, the model and the collector thread for one gunicorn master."""

    def __init__(self, master_pid: int, beacon: Optional[Tuple[str, int]] = ("127.0.0.1", 9711),
                 refresh: float = 1.0, sample_interval: float = 2.0, pyspy: bool = True,
                 config: Optional[ModelConfig] = None, clock: Callable[[], float] = time.time,
                 py_spy: Optional[str] = None) -> None:
        self.master_pid = master_pid
        self.refresh = refresh
        self.clock = clock
        self.started = clock()
        self.model = Model(config or ModelConfig(), start=self.started)
        self._inbox: Deque[object] = collections.deque(maxlen=INBOX_LIMIT)
        self._inbox_overflow = 0
        self.listener = Listener(beacon[0], beacon[1]) if beacon else None
        self.poller = Poller(master_pid, self._post)
        self.sampler: Optional[Sampler] = None
        self._pyspy_off: Optional[SourceState] = None
        if pyspy:
            named = py_spy if py_spy is not None else py_spy_from_env()
            origin = "given" if py_spy is not None else PY_SPY_ENV
            found = None if named is None else named if os.sep in named else shutil.which(named)
            if named is not None and (found is None or not os.path.isfile(found)):
                # Say which path was wrong: the sampler's own "not found" would suggest
                # installing py-spy, which may be there already, elsewhere.
                self._pyspy_off = SourceState(
                    "pyspy", "missing", f"py-spy not found at {named!r} ({origin}): fix the "
                    f"path, or unset {PY_SPY_ENV} to use the py-spy next to Python or on PATH")
            else:
                self.sampler = Sampler(self._post, interval=sample_interval, py_spy=named)
        else:
            self._pyspy_off = SourceState("pyspy", "off", "stack sampling disabled (--no-pyspy)")
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._on_snapshot: Optional[Callable[[Snapshot], None]] = None
        self._latest: Optional[Snapshot] = None
        self._lock = threading.Lock()
        self._opened = False
        self._topology = False  # the poller's first TopologyTick has been folded
        self._backlogged = False  # the last budgeted collect() left datagrams waiting

    # -- sources -----------------------------------------------------------------

    def _post(self, event: object) -> None:
        """Sink for the poller and sampler threads: non-blocking, bounded."""
        if len(self._inbox) >= INBOX_LIMIT:
            self._inbox_overflow += 1
        self._inbox.append(event)

    def open(self) -> None:
        """Bind the listener and start the sources. Raises the listener's one-line errors."""
        if self._opened:
            return
        if self.listener is not None:
            self.listener.start()
        else:
            self._post(SourceState("beacon", "off", "beacon listener disabled (--beacon off)",
                                   t=self.clock()))
        self.poller.start()
        if self.sampler is not None:
            self.sampler.start()
        elif self._pyspy_off is not None:
            off = self._pyspy_off
            self._post(SourceState(off.source, off.state, off.detail, t=self.clock()))
        self._opened = True

    # -- the collector -----------------------------------------------------------

    def start(self, on_snapshot: Callable[[Snapshot], None]) -> None:
        """Open the sources (if not yet) and start the collector thread."""
        self._on_snapshot = on_snapshot
        self.open()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flasktop-collector", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        next_snapshot = time.monotonic()
        budget = self._budget()
        while not self._stop.is_set():
            self.collect(budget)
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self.refresh
                snap = self.take_snapshot()
                cb = self._on_snapshot
                if cb is not None:
                    try:
                        cb(snap)
                    except Exception:  # noqa: BLE001 - a closing UI must not kill collection
                        pass
            if self._backlogged:
                continue  # more is waiting: fold on, with a snapshot whenever one is due
            self._stop.wait(min(0.25, self.refresh))

    def collect(self, budget: Optional[float] = None) -> int:
        """Fold everything waiting into the model; returns how many events were folded.

        Beacon datagrams wait in the listener's bounded backlog until the poller's first
        topology tick is folded: only then does the model know which pids are workers.
        Before it, anything on the port (any local user can send there) would be taken
        for a worker and could fill the route table with made-up names.

        With a ``budget`` (seconds), beacon datagrams are folded in chunks until it is
        spent; the rest stay in the listener's bounded backlog (oldest dropped first,
        counted) and :attr:`backlogged` says so. A flood then delays the next snapshot
        by at most the budget, instead of by however long folding it all takes.
        """
        n = 0
        now = self.clock()
        inbox = self._inbox
        while inbox:
            try:
                event = inbox.popleft()
            except IndexError:
                break
            if not self._topology and type(event) is TopologyTick:
                self._topology = True
            self.model.feed(event, now)
            n += 1
        self._backlogged = False
        if self.listener is not None:
            if self._topology:
                feed = self.model.feed
                if budget is None:
                    for dgram in self.listener.drain():
                        feed(dgram, now)
                        n += 1
                else:
                    deadline = time.monotonic() + budget
                    while True:
                        batch = self.listener.drain(DRAIN_CHUNK)
                        for dgram in batch:
                            feed(dgram, now)
                        n += len(batch)
                        if len(batch) < DRAIN_CHUNK:
                            break
                        if time.monotonic() >= deadline:
                            self._backlogged = True
                            break
            self.model.feed(self.listener.stats(), now)
        return n

    @property
    def backlogged(self) -> bool:
        """Whether the last budgeted :meth:`collect` left beacon datagrams waiting."""
        return self._backlogged

    def _budget(self) -> float:
        return min(FOLD_BUDGET, self.refresh / 2)

    def take_snapshot(self) -> Snapshot:
        now = self.clock()
        snap = self.model.snapshot(now)
        with self._lock:
            self._latest = snap
        self._steer_sampler(snap)
        return snap

    def _steer_sampler(self, snap: Snapshot) -> None:
        """Tell the sampler which workers exist and which to watch closely.

        A worker that looks stuck, or has been busy on one request for a while,
        is sampled faster so its stack is in hand before gunicorn's timeout
        kills it; the rest stay at the slow, CPU-budgeted default rate (a blocking
        dump stops the worker for ~3 ms on average, p95 10-17 ms, measured by
        bench/sampler_cost.py).
        """
        if self.sampler is None:
            return
        pids = [w.pid for w in snap.workers]
        self.sampler.set_targets(pids)
        urgent: List[int] = []
        for w in snap.workers:
            if w.state == STUCK:
                urgent.append(w.pid)
            elif w.state == BUSY and w.in_flight is not None and w.in_flight.elapsed_s >= 2.0:
                urgent.append(w.pid)
        self.sampler.set_urgent(urgent)

    def latest(self) -> Optional[Snapshot]:
        with self._lock:
            return self._latest

    def focus(self, pid: Optional[int]) -> None:
        if self.sampler is not None:
            self.sampler.focus(pid)

    def run_for(self, seconds: float, tick: float = 0.25) -> Snapshot:
        """Attach for ``seconds`` (no thread of our own), then return the final snapshot."""
        self.open()
        deadline = time.monotonic() + seconds
        next_snapshot = time.monotonic()
        budget = self._budget()
        while True:
            self.collect(budget)
            if time.monotonic() >= next_snapshot:
                next_snapshot = time.monotonic() + self.refresh
                self.take_snapshot()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self._backlogged:
                time.sleep(min(tick, left))
        self.collect()
        return self.take_snapshot()

    def stop(self) -> None:
        """Stop collection and every source; safe to call twice, returns promptly."""
        self._stop.set()
        for part in (self.sampler, self.poller, self.listener):
            if part is None:
                continue
            try:
                part.stop()
            except Exception:  # noqa: BLE001 - stopping must always finish
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
