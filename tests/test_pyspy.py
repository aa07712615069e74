"""The py-spy sampler against real gunicorn workers and a real py-spy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import psutil
import pytest

from flasktop.model.events import SourceState, StackSample, ThreadDump
from flasktop.sources.pyspy import (
    DENIED_DETAIL, MISSING_DETAIL, Sampler, Schedule, classify_failure, find_py_spy,
    has_frames, parse_dump, pid_alive,
)
from tests.support import FIXTURES, Gunicorn, gunicorn, kill_tree, wait_until

ROOT = Path(__file__).resolve().parent.parent
APP = FIXTURES / "pyspy_app.py"
WAIT_LINE = next(i for i, line in enumerate(APP.read_text().splitlines(), 1)
                 if "# WAIT_LINE" in line)
PY_SPY = find_py_spy()
pytestmark = pytest.mark.skipif(PY_SPY is None or not sys.platform.startswith("linux"),
                                reason="needs py-spy on Linux")


class Events:
    """A thread-safe sink that keeps what it is given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: List[object] = []

    def __call__(self, event: object) -> None:
        with self._lock:
            self.items.append(event)

    def states(self) -> List[SourceState]:
        with self._lock:
            return [e for e in self.items if isinstance(e, SourceState)]

    def samples(self, pid: Optional[int] = None) -> List[StackSample]:
        with self._lock:
            return [e for e in self.items if isinstance(e, StackSample)
                    and (pid is None or e.pid == pid)]


def task_states(pid: int) -> Dict[int, str]:
    """{tid: state letter} for every thread of ``pid``."""
    out: Dict[int, str] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                out[int(tid)] = stat.rsplit(")", 1)[1].split()[0]
    return out


def not_stopped(pid: int) -> bool:
    states = task_states(pid)
    return bool(states) and not any(s in ("t", "T") for s in states.values())


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def py_spies(parent: int, worker: int) -> Iterator[psutil.Process]:
    """The py-spy children ``parent`` is running against ``worker`` (gone ones skipped)."""
    try:
        kids = psutil.Process(parent).children()
    except psutil.Error:
        return
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            if kid.name() == "py-spy" and str(worker) in kid.cmdline():
                yield kid


def catch_py_spy(parent: int, worker: int) -> Optional[int]:
    """SIGSTOP a py-spy that ``parent`` is running against ``worker``; its pid, or None."""
    for kid in py_spies(parent, worker):
        with contextlib.suppress(psutil.Error):
            kid.send_signal(signal.SIGSTOP)
            if kid.status() == psutil.STATUS_STOPPED:
                return kid.pid
            kid.send_signal(signal.SIGCONT)
    return None


@contextlib.contextmanager
def waiting_request(g: Gunicorn, marks: Path, name: str) -> Iterator[Tuple[int, int]]:
    """A request parked in ``wait_for_lock``; yields (worker pid, native thread id)."""
    tid_file, release = marks / f"{name}.tid", marks / f"{name}.release"

    def call() -> None:
        with contextlib.suppress(Exception):
            g.get(f"/wait?s=20&name={name}", timeout=30)

    th = threading.Thread(target=call, daemon=True)
    th.start()
    try:
        text = wait_until(lambda: tid_file.exists() and tid_file.read_text(), timeout=10,
                          message=f"request {name} to reach wait_for_lock")
        pid, tid = (int(x) for x in text.split())
        yield pid, tid
    finally:
        release.write_text("go")
        th.join(5)


def waiting_thread(sample: Optional[StackSample], tid: int) -> Optional[ThreadDump]:
    if sample is None:
        return None
    for th in sample.threads:  # innermost first: time.sleep is C, so wait_for_lock is on top
        if th.tid == tid and th.frames and th.frames[0].name == "wait_for_lock" \
                and th.frames[0].line == WAIT_LINE and th.frames[1].name == "wait":
            return th
    return None


@pytest.fixture(scope="module")
def marks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("marks")


@pytest.fixture(scope="module")
def sync_app(marks: Path) -> Iterator[Gunicorn]:
    with gunicorn("pyspy_app:app", "-w", "2", workers_expected=2,
                  env={"PYSPY_FIXTURE_MARKS": str(marks)}) as g:
        yield g


@pytest.fixture(scope="module")
def gthread_app(marks: Path) -> Iterator[Gunicorn]:
    with gunicorn("pyspy_app:app", "-w", "1", "-k", "gthread", "--threads", "4",
                  workers_expected=1, env={"PYSPY_FIXTURE_MARKS": str(marks)}) as g:
        yield g


def test_sampled_stack_shows_the_waiting_function(sync_app: Gunicorn, marks: Path) -> None:
    events = Events()
    sampler = Sampler(events)
    with waiting_request(sync_app, marks, "req-sync") as (pid, tid):
        assert tid == pid  # a sync worker serves on its main thread
        th = wait_until(lambda: waiting_thread(sampler.sample_once(pid), tid), timeout=10,
                        message="a sample with wait_for_lock")
        frame = th.frames[0]
        assert Path(frame.filename).resolve() == APP.resolve()
        assert frame.short_filename == "pyspy_app.py"
        assert str(frame) == f"wait_for_lock (pyspy_app.py:{WAIT_LINE})"
        assert any("gunicorn" in f.filename for f in th.frames[2:])
        assert th.name == "req-sync"
        sample = events.samples(pid)[-1]
        assert {t.tid for t in sample.threads} <= set(task_states(pid))
        assert sample.dump_s > 0 and sample.t > 0
    assert not [s for s in events.states() if s.state != "ok"]
    assert not_stopped(pid)


def test_gthread_worker_shows_every_thread(gthread_app: Gunicorn, marks: Path) -> None:
    sampler = Sampler(Events())
    with waiting_request(gthread_app, marks, "req-a") as (pid, tid_a), \
            waiting_request(gthread_app, marks, "req-b") as (pid_b, tid_b):
        assert pid == pid_b and len({pid, tid_a, tid_b}) == 3

        def complete() -> Optional[StackSample]:
            sample = sampler.sample_once(pid)
            ok = (sample is not None and {t.tid for t in sample.threads} == set(task_states(pid))
                  and waiting_thread(sample, tid_a) and waiting_thread(sample, tid_b))
            return sample if ok else None

        sample = wait_until(complete, timeout=10, message="a sample with all threads")
        names = {t.tid: t.name for t in sample.threads}
        assert names[tid_a] == "req-a" and names[tid_b] == "req-b"
        assert names[pid] == "MainThread"
        assert all(t.py_thread_id for t in sample.threads)


def test_background_sampling_and_focus(sync_app: Gunicorn) -> None:
    events = Events()
    workers = sync_app.worker_pids()
    sampler = Sampler(events, interval=2.0)
    sampler.set_targets(workers)
    sampler.start()
    try:
        wait_until(lambda: all(events.samples(p) for p in workers), timeout=10,
                   message="a sample of each worker")
        other = [p for p in workers if p != workers[0]]
        before = {p: len(events.samples(p)) for p in workers}
        sampler.focus(workers[0])
        wait_until(lambda: len(events.samples(workers[0])) >= before[workers[0]] + 4, timeout=10,
                   message="focused worker sampled fast")
        assert sum(len(events.samples(p)) - before[p] for p in other) < 4
    finally:
        sampler.stop()
    assert not any(th.is_alive() for th in sampler._threads)
    assert all(not_stopped(p) for p in workers)


def test_non_python_pid_is_an_error_state(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        events = Events()
        assert Sampler(events).sample_once(proc.pid) is None
        states = events.states()
        assert [(s.state, s.pid) for s in states] == [("error", proc.pid)]
        assert "not a Python process" in states[0].detail and "\n" not in states[0].detail
    finally:
        kill_tree(proc.pid)


def test_gone_pids_are_quiet() -> None:
    proc = subprocess.Popen(["true"])
    wait_until(lambda: dead(proc.pid), timeout=5, message="true to exit")
    events = Events()
    sampler = Sampler(events)
    assert sampler.sample_once(proc.pid) is None  # a zombie: it exited between list and dump
    proc.wait()
    assert sampler.sample_once(proc.pid) is None  # reaped: gone
    assert events.items == []
    run = subprocess.run([str(PY_SPY), "dump", "--json", "--pid", str(proc.pid)],
                         capture_output=True, text=True, env={**os.environ, "RUST_BACKTRACE": "0"})
    assert run.returncode != 0 and run.stderr
    assert classify_failure(run.stderr, run.returncode, proc.pid) is None


def test_missing_and_unrunnable_py_spy(sync_app: Gunicorn, tmp_path: Path) -> None:
    pid = sync_app.worker_pids()[0]
    events = Events()
    assert Sampler(events, py_spy=str(tmp_path / "py-spy")).sample_once(pid) is None
    assert [(s.state, s.detail, s.pid) for s in events.states()] == [
        ("missing", MISSING_DETAIL, None)]
    plain = tmp_path / "not-executable"
    plain.write_bytes(Path(str(PY_SPY)).read_bytes()[:4096])
    plain.chmod(0o644)
    events = Events()
    assert Sampler(events, py_spy=str(plain)).sample_once(pid) is None
    [state] = events.states()
    assert state.state == "missing" and state.pid is None
    assert "cannot be run" in state.detail and str(plain) in state.detail


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv")
def test_unprivileged_run_is_denied(sync_app: Gunicorn) -> None:
    pid = sync_app.worker_pids()[0]
    script = (
        "import json, sys\n"
        "from flasktop.sources.pyspy import Sampler\n"
        "seen = []\n"
        "s = Sampler(seen.append, py_spy=sys.argv[2])\n"
        "r = s.sample_once(int(sys.argv[1]))\n"
        "print(json.dumps({'sample': r is not None, 'states': [[e.state, e.detail, e.pid]"
        " for e in seen]}))\n"
    )
    run = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         script, str(pid), str(PY_SPY)],
        capture_output=True, text=True, timeout=30, cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out == {"sample": False, "states": [["denied", DENIED_DETAIL, pid]]}
    assert not_stopped(pid)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_another_tracer_then_ok_again(sync_app: Gunicorn) -> None:
    pid = sync_app.worker_pids()[-1]
    events = Events()
    sampler = Sampler(events)
    tracer = subprocess.Popen(["strace", "-p", str(pid), "-o", os.devnull],
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: f"TracerPid:\t{tracer.pid}" in Path(f"/proc/{pid}/status").read_text(),
                   timeout=10, message="strace to attach")
        assert sampler.sample_once(pid) is None
        [state] = events.states()
        assert state.state == "degraded" and f"traced by pid {tracer.pid} (strace)" in state.detail
    finally:
        kill_tree(tracer.pid)
    wait_until(lambda: "TracerPid:\t0" in Path(f"/proc/{pid}/status").read_text(), timeout=10,
               message="strace to detach")
    assert sampler.sample_once(pid) is not None
    assert [s.state for s in events.states()] == ["degraded", "ok"]


def test_stop_kills_a_dump_in_progress(sync_app: Gunicorn) -> None:
    pid = sync_app.worker_pids()[0]
    sampler = Sampler(Events(), interval=0.05, timeout=60, cpu_budget=1.0)
    sampler.set_targets([pid])
    stuck: List[int] = []
    sampler.start()
    try:
        stuck.append(wait_until(lambda: catch_py_spy(os.getpid(), pid), timeout=15,
                                interval=0.002, message="a py-spy dump to catch"))
        sampler.stop()
        assert dead(stuck[0])
        assert not any(th.is_alive() for th in sampler._threads)
        wait_until(lambda: not_stopped(pid), timeout=5, message="worker running again")
    finally:
        sampler.stop()
        for p in stuck:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


SAMPLER_SCRIPT = (
    "import sys, threading\n"
    "from flasktop.sources.pyspy import Sampler\n"
    "s = Sampler(lambda e: None, interval=0.05, timeout=60, cpu_budget=1.0)\n"
    "s.set_targets([int(sys.argv[1])])\n"
    "s.start()\n"
    "threading.Event().wait()\n"
)


def test_kill_9_of_the_parent_leaves_no_py_spy(sync_app: Gunicorn) -> None:
    pid = sync_app.worker_pids()[0]
    parent = subprocess.Popen([sys.executable, "-c", SAMPLER_SCRIPT, str(pid)],
                              start_new_session=True)
    stuck: List[int] = []
    try:
        stuck.append(wait_until(lambda: catch_py_spy(parent.pid, pid), timeout=15,
                                interval=0.002, message="a py-spy dump to catch"))
        parent.kill()
        parent.wait(5)
        wait_until(lambda: dead(stuck[0]), timeout=5, message="py-spy to die with its parent")
        wait_until(lambda: not_stopped(pid), timeout=5, message="worker running again")
    finally:
        kill_tree(parent.pid)
        for p in stuck:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def running_py_spy(parent: int, worker: int) -> Optional[int]:
    for kid in py_spies(parent, worker):
        with contextlib.suppress(psutil.Error):
            if kid.status() != psutil.STATUS_ZOMBIE:
                return kid.pid
    return None


def test_ctrl_z_of_flasktop_does_not_stop_py_spy(sync_app: Gunicorn) -> None:
    pid = sync_app.worker_pids()[0]
    parent = subprocess.Popen([sys.executable, "-c", SAMPLER_SCRIPT, str(pid)],
                              start_new_session=True)
    spy: List[int] = []
    try:
        spy.append(wait_until(lambda: running_py_spy(parent.pid, pid), timeout=15,
                              interval=0.002, message="a py-spy dump in flight"))
        # Ctrl-Z stops the terminal's foreground group; SIGSTOP stands in for SIGTSTP, which the
        # kernel discards for a group with no terminal like this one.
        os.killpg(parent.pid, signal.SIGSTOP)
        wait_until(lambda: psutil.Process(parent.pid).status() == psutil.STATUS_STOPPED,
                   timeout=5, message="flasktop stopped by Ctrl-Z")
        wait_until(lambda: dead(spy[0]), timeout=5, message="py-spy to finish its dump")
        assert not_stopped(pid)
    finally:
        kill_tree(parent.pid)
        for p in spy:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def test_parse_tolerates_version_differences(sync_app: Gunicorn) -> None:
    pid = sync_app.worker_pids()[0]
    run = subprocess.run([str(PY_SPY), "dump", "--json", "--pid", str(pid)], capture_output=True,
                         text=True, timeout=30, env={**os.environ, "RUST_BACKTRACE": "0"})
    raw = json.loads(run.stdout)
    full = parse_dump(run.stdout, pid)
    assert [t.tid for t in full.threads] == [t["os_thread_id"] for t in raw]
    assert [f.name for f in full.threads[0].frames] == [f["name"] for f in raw[0]["frames"]]
    for t in raw:
        t.pop("os_thread_id")
        t["active"] = None
        t.pop("owns_gil")
        t["new_field"] = {"x": 1}
        for f in t["frames"]:
            f.pop("short_filename")
            f["line"] = None
            f["extra"] = [1, 2]
    t = raw[0]
    t["frames"].append("not a frame")
    raw.append("not a thread")
    old = parse_dump(json.dumps(raw), pid)
    assert len(old.threads) == len(full.threads)
    th = old.threads[0]
    assert th.tid == 0 and th.active is True and th.owns_gil is False
    assert [f.name for f in th.frames] == [f.name for f in full.threads[0].frames]
    assert th.frames[0].short_filename == os.path.basename(th.frames[0].filename)
    assert th.frames[0].line == 0
    for bad in ("", "Error: something", "{\"a\": 1}", "[1, 2", "null"):
        with pytest.raises(ValueError):
            parse_dump(bad, pid)
    assert parse_dump("[]", pid).threads == ()
    assert has_frames(full) and not has_frames(parse_dump("[]", pid))
    dying = [{"thread_id": 1, "thread_name": None, "os_thread_id": pid, "frames": []}]
    assert not has_frames(parse_dump(json.dumps(dying), pid))  # a worker killed mid-dump


def test_pid_alive() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(2 ** 22 + 1)


def simulate(schedule: Schedule, targets: List[int], seconds: float, cost: float,
             max_parallel: int = 2, step: float = 0.01,
             slow: Optional[Dict[int, float]] = None) -> Dict[int, List[float]]:
    """Run ``schedule`` on a fake clock; each dump takes ``cost`` seconds; ``slow`` pids hang
    that long and are killed, as the sampler reports them (no cost measure)."""
    schedule.set_targets(targets, 0.0)
    starts: Dict[int, List[float]] = {p: [] for p in targets}
    running: List[Tuple[float, int, float]] = []
    now = 0.0
    while now < seconds:
        for end, pid, took in [r for r in running if r[0] <= now]:
            running.remove((end, pid, took))
            schedule.done(pid, end, None if pid in (slow or {}) else took)
        for pid in schedule.take_due(now, max_parallel - len(running)):
            took = (slow or {}).get(pid, cost)
            running.append((now + took, pid, took))
            starts[pid].append(now)
        assert len(running) <= max_parallel
        now = round(now + step, 6)
    return starts


def gaps(times: List[float]) -> List[float]:
    return [b - a for a, b in zip(times, times[1:])]


def test_schedule_16_workers_stays_within_budget() -> None:
    budget, cost = 0.04, 0.03
    schedule = Schedule(interval=2.0, cpu_budget=budget, initial_cost=cost)
    starts = simulate(schedule, list(range(100, 116)), 300.0, cost)
    fast, slow = schedule.intervals()
    assert slow == pytest.approx(16 * cost / budget)  # stretched from 2 s to 12 s
    total = sum(len(s) for s in starts.values())
    assert total * cost / 300.0 <= budget * 1.02
    for pid, times in starts.items():
        assert times[0] < slow  # every worker seen within the first round
        assert max(gaps(times)) <= slow + 0.05  # never behind its schedule
    round_starts = sorted(t for times in starts.values() for t in times)
    assert max(gaps(round_starts)) <= slow / 16 + 0.05  # spread, not one burst per round


def test_schedule_4_workers_keep_the_default_rate() -> None:
    schedule = Schedule(interval=2.0, cpu_budget=0.04, initial_cost=0.015)
    starts = simulate(schedule, [1, 2, 3, 4], 60.0, 0.015)
    for times in starts.values():
        assert all(g == pytest.approx(2.0, abs=0.02) for g in gaps(times))


def test_schedule_focus_and_urgent_go_fast_within_budget() -> None:
    budget, prio_budget, cost = 0.04, 0.06, 0.015
    schedule = Schedule(interval=2.0, fast_interval=0.5, cpu_budget=budget,
                        priority_budget=prio_budget, initial_cost=cost)
    targets = list(range(1, 17))
    schedule.set_targets(targets, 0.0)
    schedule.set_focus(5, 0.0)
    schedule.set_urgent([9], 0.0)
    starts = simulate(schedule, targets, 120.0, cost)
    fast, slow = schedule.intervals()
    assert fast == pytest.approx(0.5) and slow == pytest.approx(14 * cost / budget)
    for pid in (5, 9):
        assert starts[pid][0] == 0.0
        assert max(gaps(starts[pid])) <= 0.52
    assert max(gaps(starts[1])) <= slow + 0.05
    background = sum(len(s) for p, s in starts.items() if p not in (5, 9))
    assert background * cost / 120.0 <= budget * 1.02
    assert (len(starts[5]) + len(starts[9])) * cost / 120.0 <= prio_budget * 1.02
    schedule.set_urgent(list(range(1, 17)), 120.0)  # every worker stuck: still bounded
    fast, _ = schedule.intervals()
    assert fast == pytest.approx(16 * cost / prio_budget)


def test_schedule_hung_dumps_do_not_starve_the_rest() -> None:
    schedule = Schedule(interval=2.0, cpu_budget=0.04, initial_cost=0.015)
    targets = list(range(1, 6))
    starts = simulate(schedule, targets, 120.0, 0.015, max_parallel=2, slow={1: 3.0})
    _, slow = schedule.intervals()
    assert slow == pytest.approx(2.0)
    for pid in targets[1:]:
        assert len(starts[pid]) >= 120.0 / slow - 2
        assert max(gaps(starts[pid])) <= slow + 0.1
    assert max(gaps(starts[1])) <= slow + 3.0 + 0.05  # retried, one at a time


def test_schedule_drops_and_adds_targets() -> None:
    schedule = Schedule(interval=2.0)
    schedule.set_targets([1, 2], 0.0)
    assert schedule.take_due(0.0, 10) == [1]
    schedule.done(1, 0.02, 0.02)
    schedule.set_targets([2, 3], 0.5)
    assert schedule.targets == (2, 3)
    due: Set[int] = set()
    t = 0.5
    while t < 5:
        for pid in schedule.take_due(t, 10):
            due.add(pid)
            schedule.done(pid, t, 0.02)
        t += 0.1
    assert due == {2, 3}
    schedule.forget(3)
    assert schedule.targets == (2,)
