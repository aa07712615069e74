"""The py-spy sampler: one ``py-spy dump --json`` per worker at a time, on a CPU budget.

Blocking dumps, not ``--nonblocking``. Measured with ``bench/sampler_cost.py`` (2 cores shared
with other load, 4 busy sync workers, py-spy 0.4.3, CPython 3.11):

- ``--nonblocking`` is no cheaper: 12.5-15 ms of py-spy CPU per dump in both modes, nearly all
  of it py-spy starting and reading the interpreter's symbols before it touches the worker.
- ``--nonblocking`` reads a running interpreter and fails under load: 3-12% of dumps ("Failed
  to copy PyCodeObject/PyFrameObject: Bad address"), blocking 0-2%. On CPython <= 3.10 it also
  cannot give ``os_thread_id``, which is what joins a stack to the beacon's thread id.
- Blocking stops the worker only while its stacks are read: ptrace-stop seen for 2.5-3.2 ms
  per dump on average (p95 10-17 ms on the loaded box), i.e. 0.12-0.16% of a worker's time at
  one dump per 2 s. Side by side, a sampled busy worker's throughput was within the noise
  (+-3%) of its unsampled neighbour, at the default rate and at 1 dump/s.
- The hazard of blocking mode, a py-spy stopped mid-dump leaving the worker in ptrace-stop,
  is removed here: py-spy runs in its own session (a Ctrl-Z of flasktop never reaches it),
  under a hard timeout that SIGKILLs its group, with ``PR_SET_PDEATHSIG`` so it dies with
  flasktop; the kernel detaches ptrace when the tracer dies, and the worker runs on.

The rate adapts (:class:`Schedule`): every dump's wall time feeds an estimate of its cost and
each worker's interval stretches so that all background dumps stay within ``cpu_budget`` of one
core (4%) however many workers there are. With 4 busy workers that measured 1.4-1.8% of a core
for py-spy plus 0.3-0.4% for the sampler's threads, against 13-21% for ``py-spy top``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

from flasktop.model.events import Frame, SourceState, StackSample, ThreadDump

SOURCE = "pyspy"
Sink = Callable[[object], None]

MISSING_DETAIL = "py-spy not found: pip install py-spy"
DENIED_DETAIL = ("py-spy was refused by the kernel (ptrace): run flasktop as the workers' user "
                 "or as root, or grant CAP_SYS_PTRACE")
MAX_THREADS = 256
MAX_FRAMES = 128
MAX_TEXT = 300
MAX_DETAIL = 200

_CHILDREN: Set[int] = set()
_CHILDREN_LOCK = threading.Lock()


def kill_children() -> None:
    """SIGKILL every py-spy this process started and has not reaped (signal-handler safe)."""
    for pid in tuple(_CHILDREN):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


atexit.register(kill_children)


def _load_prctl() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup(parent: int) -> Callable[[], None]:
    """A preexec_fn: die with the forking thread; bail out if the parent is already gone."""
    prctl = _PRCTL

    def setup() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(111)

    return setup


def find_py_spy() -> Optional[str]:
    """Absolute path of py-spy: next to this interpreter (the wheel's script) first, then PATH."""
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "py-spy")
    if os.path.isfile(beside):
        return beside
    found = shutil.which("py-spy")
    return os.path.abspath(found) if found else None


def _resolve(py_spy: Optional[str]) -> Optional[str]:
    if py_spy is None:
        return find_py_spy()
    if os.sep not in py_spy:
        found = shutil.which(py_spy)
        return os.path.abspath(found) if found else os.path.abspath(py_spy)
    return os.path.abspath(py_spy)


def _text(value: object, default: str = "") -> str:
    if value is None:
        return default
    return str(value)[:MAX_TEXT]


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value:
        return int(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value, 0)
    return default


def _bool(value: object, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def _frame(raw: object) -> Optional[Frame]:
    if not isinstance(raw, dict):
        return None
    filename = _text(raw.get("filename"))
    return Frame(name=_text(raw.get("name"), "?"), filename=filename,
                 line=_int(raw.get("line")),
                 short_filename=_text(raw.get("short_filename")) or os.path.basename(filename))


def _thread(raw: object) -> Optional[ThreadDump]:
    if not isinstance(raw, dict):
        return None
    frames_raw = raw.get("frames")
    frames: List[Frame] = []
    if isinstance(frames_raw, list):
        for f in frames_raw[:MAX_FRAMES]:
            frame = _frame(f)
            if frame is not None:
                frames.append(frame)
    # tid 0 means "py-spy could not tell" (e.g. --nonblocking on CPython <= 3.10)
    return ThreadDump(tid=_int(raw.get("os_thread_id")), name=_text(raw.get("thread_name")),
                      active=_bool(raw.get("active"), True),
                      owns_gil=_bool(raw.get("owns_gil"), False),
                      frames=tuple(frames), py_thread_id=_int(raw.get("thread_id")))


def parse_dump(text: str, pid: int, t: float = 0.0, dump_s: float = 0.0) -> StackSample:
    """Parse ``py-spy dump --json`` output; ``ValueError`` with a short reason if it is not that."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON ({type(e).__name__})") from None
    if isinstance(data, dict):  # tolerate a future {"threads": [...]} wrapper
        data = data.get("threads", data.get("traces"))
    if not isinstance(data, list):
        raise ValueError("JSON but not a list of threads")
    threads = [th for th in (_thread(r) for r in data[:MAX_THREADS]) if th is not None]
    return StackSample(t=t, pid=pid, threads=tuple(threads), dump_s=dump_s)


def has_frames(sample: StackSample) -> bool:
    """False for a dump with no Python frame in any thread (an interpreter starting or ending)."""
    return any(th.frames for th in sample.threads)


def _proc_status(pid: int) -> Dict[str, str]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    status = _proc_status(pid)
    return bool(status) and not status.get("State", "").startswith(("Z", "X"))


def _tracer(pid: int) -> Tuple[int, str]:
    tracer = _int(_proc_status(pid).get("TracerPid"))
    if tracer <= 0:
        return 0, ""
    return tracer, _proc_status(tracer).get("Name", "?")


def _one_line(stderr: str) -> str:
    parts: List[str] = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line or line.startswith(("Caused by", "Stack backtrace")):
            continue
        if line[:1].isdigit() and ":" in line:  # "0: EPERM: ..." cause lines
            line = line.split(":", 1)[1].strip()
        if line.startswith("Error:"):
            line = line[6:].strip()
        if line and line not in parts:
            parts.append(line)
    return ": ".join(parts)[:MAX_DETAIL] or "no message"


class Failure(NamedTuple):
    state: str
    detail: str
    transient: bool = False  # may be a one-off under load: reported only if it happens twice


def classify_failure(stderr: str, returncode: int, pid: int) -> Optional[Failure]:
    """Map a failed dump to a state and a one-line detail; None when the worker is simply gone."""
    if not pid_alive(pid):
        return None
    low = stderr.lower()
    if "permission denied" in low or "eperm" in low or "operation not permitted" in low:
        tracer, name = _tracer(pid)
        if tracer and tracer != os.getpid():
            return Failure("degraded", f"pid {pid} is already traced by pid {tracer} ({name}); "
                                       "py-spy cannot attach until it detaches")
        return Failure("denied", DENIED_DETAIL)
    if ("failed to find python version" in low or "failed to get process executable" in low
            or "not a python" in low):
        return Failure("error", f"pid {pid} is not a Python process "
                                "(py-spy found no interpreter in it)")
    if returncode < 0:
        return Failure("error", f"py-spy was killed by signal {-returncode} while dumping "
                                f"pid {pid}", True)
    # e.g. "Failed to find a python interpreter in the .data section", seen once in 60 under load
    return Failure("error", f"py-spy failed on pid {pid}: {_one_line(stderr)}", True)


class Schedule:
    """When to dump which worker: pure, driven by a caller's clock, not thread-safe.

    Background workers are dumped every ``interval``, stretched so that their dumps cost at
    most ``cpu_budget`` (seconds of py-spy per second, i.e. a fraction of one core) whatever
    their number. Priority workers (the focused one, urgent ones) run at ``fast_interval``
    on a separate ``priority_budget``, spent only while someone drills in or a worker is stuck.
    The cost of a dump is an average of measured wall times: under CPU contention it grows
    and sampling backs off, which is what a loaded box needs.
    """

    def __init__(self, interval: float = 2.0, fast_interval: float = 0.5,
                 cpu_budget: float = 0.04, priority_budget: float = 0.06,
                 initial_cost: float = 0.03, max_observed_cost: float = 0.5) -> None:
        self.interval = max(0.05, interval)
        self.fast_interval = max(0.05, min(fast_interval, self.interval))
        self.cpu_budget = max(0.001, cpu_budget)
        self.priority_budget = max(0.001, priority_budget)
        self.cost = initial_cost
        self.max_observed_cost = max_observed_cost
        self._due: Dict[int, float] = {}
        self._running: Set[int] = set()
        self._focus: Optional[int] = None
        self._urgent: Set[int] = set()

    @property
    def targets(self) -> Tuple[int, ...]:
        return tuple(sorted(self._due))

    @property
    def running(self) -> Tuple[int, ...]:
        return tuple(sorted(self._running))

    def _priority(self) -> Set[int]:
        prio = {p for p in self._urgent if p in self._due}
        if self._focus is not None and self._focus in self._due:
            prio.add(self._focus)
        return prio

    def intervals(self) -> Tuple[float, float]:
        """(priority interval, background interval) for the current targets and cost."""
        n_prio = len(self._priority())
        n_bg = len(self._due) - n_prio
        fast = max(self.fast_interval, n_prio * self.cost / self.priority_budget)
        slow = max(self.interval, n_bg * self.cost / self.cpu_budget)
        return fast, slow

    def interval_for(self, pid: int) -> float:
        fast, slow = self.intervals()
        return fast if pid in self._priority() else slow

    def set_targets(self, pids: Iterable[int], now: float) -> None:
        wanted = {int(p) for p in pids if int(p) > 0}
        for pid in list(self._due):
            if pid not in wanted:
                del self._due[pid]
        new = sorted(wanted - set(self._due))
        if not new:
            return
        self._due.update((pid, now) for pid in new)
        _, slow = self.intervals()
        spread = slow * len(new) / len(wanted)  # new pids fill their share of a round
        prio = self._urgent | {self._focus}
        for i, pid in enumerate(new):
            self._due[pid] = now if pid in prio else now + spread * i / len(new)

    def set_focus(self, pid: Optional[int], now: float) -> None:
        self._focus = pid
        if pid is not None and pid in self._due:
            self._due[pid] = min(self._due[pid], now)

    def set_urgent(self, pids: Iterable[int], now: float) -> None:
        new = {int(p) for p in pids} - self._urgent
        self._urgent = {int(p) for p in pids}
        for pid in new:
            if pid in self._due:
                self._due[pid] = min(self._due[pid], now)

    def take_due(self, now: float, limit: int) -> List[int]:
        """Pids to dump now (at most ``limit``), marked running; priority first, then most late."""
        if limit <= 0:
            return []
        prio = self._priority()
        due = [p for p, t in self._due.items() if t <= now and p not in self._running]
        due.sort(key=lambda p: (p not in prio, self._due[p], p))
        chosen = due[:limit]
        for pid in chosen:
            self._running.add(pid)
            self._due[pid] = now + self.interval_for(pid)
        return chosen

    def done(self, pid: int, now: float, cost: Optional[float]) -> None:
        """A dump of ``pid`` ended; ``cost`` is its wall time, None if it is no measure of
        cost (nothing ran, or py-spy hung and was killed): then wait a full interval from now."""
        self._running.discard(pid)
        if cost is not None:
            observed = min(max(cost, 0.001), self.max_observed_cost)
            self.cost += 0.2 * (observed - self.cost)
        if pid in self._due:
            self._due[pid] = max(self._due[pid], now + self.interval_for(pid) - (cost or 0.0))

    def forget(self, pid: int) -> None:
        """Stop dumping ``pid`` until ``set_targets`` names it again (it exited)."""
        self._due.pop(pid, None)
        self._urgent.discard(pid)

    def next_due(self) -> Optional[float]:
        times = [t for p, t in self._due.items() if p not in self._running]
        return min(times) if times else None


class Sampler:
    """Dumps workers' stacks with py-spy in the background and hands events to ``sink``."""

    def __init__(self, sink: Sink, interval: float = 2.0, timeout: float = 3.0,
                 py_spy: Optional[str] = None, max_parallel: int = 2,
                 fast_interval: float = 0.5, cpu_budget: float = 0.04,
                 priority_budget: float = 0.06, nonblocking: bool = False) -> None:
        self.sink = sink
        self.timeout = timeout
        self.max_parallel = max(1, max_parallel)
        self.nonblocking = nonblocking
        self.py_spy = _resolve(py_spy)
        self.schedule = Schedule(interval=interval, fast_interval=fast_interval,
                                 cpu_budget=cpu_budget, priority_budget=priority_budget)
        self._lock = threading.Condition()
        self._states: Dict[Optional[int], Tuple[str, str]] = {}
        self._streak: Dict[Optional[int], int] = {}
        self._procs: Dict[int, subprocess.Popen] = {}
        self._busy: Set[int] = set()
        self._queue: "queue.Queue[Optional[int]]" = queue.Queue()
        self._threads: List[threading.Thread] = []
        self._stopping = False
        self.dumps = 0
        self.failures = 0
        self.last_failure = ""  # the most recent failure's detail, even one not reported yet
        self._env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
        self._env["RUST_BACKTRACE"] = "0"

    # -- control, from any thread

    def set_targets(self, pids: Iterable[int]) -> None:
        with self._lock:
            self.schedule.set_targets(pids, time.monotonic())
            keep = set(self.schedule.targets)
            for table in (self._states, self._streak):
                for pid in [p for p in table if p is not None and p not in keep]:
                    del table[pid]
            self._lock.notify_all()

    def focus(self, pid: Optional[int]) -> None:
        with self._lock:
            self.schedule.set_focus(pid, time.monotonic())
            self._lock.notify_all()

    def set_urgent(self, pids: Iterable[int]) -> None:
        with self._lock:
            self.schedule.set_urgent(list(pids), time.monotonic())
            self._lock.notify_all()

    def start(self) -> None:
        if self._threads:
            return
        self._stopping = False
        while not self._queue.empty():
            self._queue.get_nowait()
        for i in range(self.max_parallel):
            th = threading.Thread(target=self._dumper, name=f"flasktop-pyspy-{i}", daemon=True)
            self._threads.append(th)
        self._threads.append(threading.Thread(target=self._scheduler, name="flasktop-pyspy-sched",
                                              daemon=True))
        for th in self._threads:
            th.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Kill in-flight dumps and stop the threads (returns within about ``timeout``)."""
        with self._lock:
            self._stopping = True
            procs = list(self._procs.values())
            self._lock.notify_all()
        for proc in procs:
            _kill(proc)
        for _ in range(self.max_parallel):
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))
        self._threads = [th for th in self._threads if th.is_alive()]

    # -- one dump

    def sample_once(self, pid: int) -> Optional[StackSample]:
        """Dump ``pid`` now, in this thread; events go to the sink, the sample is also returned."""
        sample, _ = self._sample(pid)
        return sample

    def _sample(self, pid: int) -> Tuple[Optional[StackSample], Optional[float]]:
        """(sample, seconds py-spy ran; None if it did not run or hung)."""
        with self._lock:
            if pid in self._busy:  # one dump per worker at a time: a second would get EPERM
                return None, None
            self._busy.add(pid)
        try:
            return self._dump(pid)
        finally:
            with self._lock:
                self._busy.discard(pid)

    def _dump(self, pid: int) -> Tuple[Optional[StackSample], Optional[float]]:
        if not pid_alive(pid):
            self._forget_state(pid)
            return None, None
        if self.py_spy is None or not os.path.isfile(self.py_spy):
            self._state(None, "missing", MISSING_DETAIL)
            return None, None
        cmd = [self.py_spy, "dump", "--json", "--pid", str(pid)]
        if self.nonblocking:
            cmd.append("--nonblocking")
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self._env, close_fds=True,
                                    start_new_session=True,
                                    preexec_fn=_child_setup(os.getpid()))
        except FileNotFoundError:
            self._state(None, "missing", MISSING_DETAIL)
            return None, None
        except OSError as e:
            self._state(None, "missing", f"py-spy at {self.py_spy} cannot be run "
                        f"({e.strerror or e}): chmod +x it or pip install py-spy")
            return None, None
        self._state(None, "ok", "")
        with _CHILDREN_LOCK:
            _CHILDREN.add(proc.pid)
        with self._lock:
            self._procs[proc.pid] = proc
            stopping = self._stopping
        if stopping:
            _kill(proc)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            out, err = proc.communicate()
        finally:
            with self._lock:
                self._procs.pop(proc.pid, None)
                stopping = self._stopping
                self.dumps += 1
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc.pid)
        wall = time.monotonic() - t0
        if stopping and proc.returncode != 0:
            return None, wall
        if proc.returncode != 0 or timed_out:
            with self._lock:
                self.failures += 1
        if timed_out:
            if pid_alive(pid):
                self._state(pid, "degraded", f"py-spy timed out after {self.timeout:g} s on "
                            f"pid {pid}; killed it")
            return None, None
        stderr = err.decode("utf-8", "replace")
        if proc.returncode != 0:
            verdict = classify_failure(stderr, proc.returncode, pid)
            if verdict is None:
                self._forget_state(pid)
            else:
                self._state(pid, verdict.state, verdict.detail, verdict.transient)
            return None, wall
        try:
            sample = parse_dump(out.decode("utf-8", "replace"), pid, time.time(), wall)
        except ValueError as e:
            with self._lock:
                self.failures += 1
            snippet = out[:60].decode("utf-8", "replace").strip().replace("\n", " ")
            self._state(pid, "error", f"py-spy printed something unreadable for pid {pid} "
                        f"({e}): {snippet!r}", transient=True)
            return None, wall
        if not has_frames(sample):
            # Seen on a worker dying from gunicorn's timeout: its interpreter is tearing down.
            # Such a sample would hide the last real stack; report it only if it persists.
            if pid_alive(pid):
                self._state(pid, "error", f"py-spy found no Python frames in pid {pid}",
                            transient=True)
            return None, wall
        self._state(pid, "ok", "")
        self._emit(sample)
        return sample, wall

    # -- states and events

    def _emit(self, event: object) -> None:
        with contextlib.suppress(Exception):
            self.sink(event)

    def _state(self, pid: Optional[int], state: str, detail: str,
               transient: bool = False) -> None:
        """Emit a state when it changes; a first "ok" is implied and not emitted."""
        with self._lock:
            streak = 0 if state == "ok" else self._streak.get(pid, 0) + 1
            self._streak[pid] = streak
            if state != "ok":
                self.last_failure = detail
            if transient and streak < 2:
                return
            changed = self._states.get(pid, ("ok", "")) != (state, detail)
            self._states[pid] = (state, detail)
        if changed:
            self._emit(SourceState(SOURCE, state, detail, pid, time.time()))

    def _forget_state(self, pid: int) -> None:
        with self._lock:
            self._states.pop(pid, None)
            self._streak.pop(pid, None)

    # -- threads

    def _scheduler(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                now = time.monotonic()
                free = self.max_parallel - len(self.schedule.running)
                for pid in self.schedule.take_due(now, free):
                    self._queue.put(pid)
                wake = self.schedule.next_due()
                wait = 1.0 if wake is None else min(1.0, max(0.01, wake - now))
                self._lock.wait(wait)

    def _dumper(self) -> None:
        while True:
            pid = self._queue.get()
            if pid is None:
                return
            cost: Optional[float] = None
            try:
                sample, cost = self._sample(pid)
                gone = sample is None and not pid_alive(pid)
            except Exception as e:  # noqa: BLE001 - a sampler thread must not die
                gone = False
                detail = f"sampler error on pid {pid}: {type(e).__name__}: {e}"
                self._state(pid, "error", detail[:MAX_DETAIL])
            with self._lock:
                self.schedule.done(pid, time.monotonic(), cost)
                if gone:
                    self.schedule.forget(pid)
                self._lock.notify_all()
                if self._stopping:
                    return


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL py-spy's whole process group (it leads its own session)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
