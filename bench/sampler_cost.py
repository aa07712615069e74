"""What py-spy sampling costs a busy gunicorn worker, blocking vs --nonblocking. Prints figures.

    .venv/bin/python bench/sampler_cost.py [--workers 4] [--round 6] [--dumps 60]

Four sync workers each serve /churn: Flask requests served in-process back to back, so the
stack changes all the time, as in a busy worker. Phases:
  A. dump wall time, py-spy CPU per dump and failure rate, both modes, dumps back to back;
  B. throughput, side by side in one round: half the workers sampled, half not, swapped the
     next round; conditions: none, default rate blocking/nonblocking, 1 dump/s blocking;
  C. CPU of this process's Sampler (its threads + py-spy children) at the default rate on all
     workers, vs `py-spy top --subprocesses` on the same master.
"""

from __future__ import annotations

import argparse
import collections
import os
import pty
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from flasktop.sources.pyspy import Sampler, find_py_spy  # noqa: E402
from tests.support import Gunicorn, kill_tree, wait_until  # noqa: E402


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def churn_all(g: Gunicorn, n: int, seconds: float) -> Dict[int, float]:
    """Make ``n`` workers busy for ``seconds``; return {pid: requests per second}."""
    out: Dict[int, float] = {}
    lock = threading.Lock()

    def one() -> None:
        import json
        r = g.get(f"/churn?s={seconds}", timeout=seconds + 30)
        d = json.loads(r.body)
        with lock:
            out[d["pid"]] = d["n"] / d["s"]

    threads = [threading.Thread(target=one) for _ in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def while_busy(g: Gunicorn, n: int, seconds: float, during) -> Dict[int, float]:
    """Run ``during(pids)`` while all ``n`` workers churn; returns their rates."""
    result: Dict[int, float] = {}
    procs = [psutil.Process(p) for p in g.worker_pids()]
    start = [sum(p.cpu_times()[:2]) for p in procs]
    th = threading.Thread(target=lambda: result.update(churn_all(g, n, seconds)))
    th.start()
    wait_until(lambda: all(sum(p.cpu_times()[:2]) - c > 0.05 for p, c in zip(procs, start)),
               timeout=10, message="every worker busy")
    during(g.worker_pids())
    th.join()
    return result


class PauseWatch:
    """Polls /proc/<pid>/stat and adds up the time the worker spent in ptrace-stop ("t")."""

    def __init__(self, pid: int) -> None:
        self.path = f"/proc/{pid}/stat"
        self.stopped = 0.0
        self._run = True
        self._th = threading.Thread(target=self._loop, daemon=True)
        self._th.start()

    def _loop(self) -> None:
        last = time.perf_counter()
        while self._run:
            try:
                with open(self.path, "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            now = time.perf_counter()
            if state in (b"t", b"T"):
                self.stopped += now - last
            last = now

    def close(self) -> float:
        self._run = False
        self._th.join()
        return self.stopped


def phase_a(g: Gunicorn, n: int, dumps: int) -> None:
    print(f"A. dumps back to back on {n} busy workers ({dumps} per mode)")
    for nonblocking in (False, True):
        walls: List[float] = []
        reasons: collections.Counter = collections.Counter()
        cpu = [0.0]
        box: List[int] = [0]
        pauses: List[float] = []

        def during(pids: List[int]) -> None:
            s = Sampler(lambda e: None, nonblocking=nonblocking)
            c0 = children_cpu()
            for i in range(dumps):
                pid = pids[i % len(pids)]
                t0 = time.perf_counter()
                watch = PauseWatch(pid)
                sample = s.sample_once(pid)
                walls.append(time.perf_counter() - t0)
                pauses.append(watch.close())
                if sample is None:
                    box[0] += 1
                    reasons[s.last_failure.replace(str(pid), "N")[:150]] += 1
                elif any(not th.frames for th in sample.threads):
                    box[0] += 1
                    reasons["a thread with no frames (torn read)"] += 1
            cpu[0] = (children_cpu() - c0) / dumps

        while_busy(g, n, max(8.0, dumps * 0.1), during)
        mode = "--nonblocking" if nonblocking else "blocking"
        walls.sort()
        print(f"  {mode:14} wall median {statistics.median(walls) * 1e3:5.1f} ms, "
              f"p95 {walls[int(len(walls) * 0.95) - 1] * 1e3:5.1f} ms, "
              f"py-spy CPU {cpu[0] * 1e3:5.1f} ms/dump, failed {box[0]}/{dumps} "
              f"({100 * box[0] / dumps:.0f}%)")
        pauses.sort()
        mean = statistics.mean(pauses)
        print(f"  {'':14} worker seen in ptrace-stop per dump: mean {mean * 1e3:4.1f} ms, "
              f"p95 {pauses[int(len(pauses) * 0.95) - 1] * 1e3:4.1f} ms, "
              f"max {pauses[-1] * 1e3:4.1f} ms; at one dump per 2 s that is "
              f"{100 * mean / 2.0:.2f}% of the worker's time")
        for reason, count in reasons.most_common(3):
            print(f"      {count:3} x {reason}")


def phase_b(g: Gunicorn, n: int, seconds: float, repeats: int) -> None:
    print(f"B. throughput of busy workers: {seconds:g} s rounds, half the workers sampled, half "
          f"not, swapped each round; {2 * repeats} rounds per condition, interleaved. The "
          f"'none' row is the noise floor of this comparison on this box.")
    conditions: List[Tuple[str, Optional[float], bool]] = [
        ("none (noise floor)", None, False), ("blocking, default 2 s", 2.0, False),
        ("nonblocking, default 2 s", 2.0, True), ("blocking, 1 dump/s", 1.0, False),
    ]
    ratios: Dict[str, List[float]] = collections.defaultdict(list)
    totals: Dict[str, List[float]] = collections.defaultdict(list)
    dumps: Dict[str, int] = collections.Counter()
    for _ in range(repeats):
        for swap in (0, 1):
            for name, interval, nonblocking in conditions:
                chosen: List[int] = []
                holder: List[Sampler] = []

                def during(pids: List[int]) -> None:
                    chosen.extend(pids[swap::2])
                    if interval is None:
                        return
                    budget = 0.04 if interval >= 2.0 else 1.0  # 1 dump/s: past the budget
                    s = Sampler(lambda e: None, interval=interval, nonblocking=nonblocking,
                                cpu_budget=budget)
                    s.set_targets(chosen)
                    s.start()
                    holder.append(s)

                rates = while_busy(g, n, seconds, during)
                for s in holder:
                    s.stop()
                    dumps[name] += s.dumps
                sampled = [r for p, r in rates.items() if p in chosen]
                other = [r for p, r in rates.items() if p not in chosen]
                ratios[name].append(statistics.mean(sampled) / statistics.mean(other) - 1)
                totals[name].append(sum(rates.values()))
    for name, _, _ in conditions:
        r = [100 * x for x in ratios[name]]
        print(f"  {name:26} sampled vs unsampled neighbour {statistics.mean(r):+5.1f}% "
              f"(rounds: {' '.join(f'{x:+.1f}' for x in r)}), total "
              f"{statistics.mean(totals[name]):7.0f} req/s, {dumps[name]} dumps")


def phase_c(g: Gunicorn, n: int, seconds: float) -> None:
    print(f"C. CPU while watching {n} busy workers for {seconds:g} s (% of one core)")
    figures: Dict[str, float] = {}

    def ours(pids: List[int]) -> None:
        s = Sampler(lambda e: None)
        s.set_targets(pids)
        t0, p0, c0 = time.monotonic(), time.process_time(), children_cpu()
        s.start()
        time.sleep(seconds - 2)
        s.stop()
        dt = time.monotonic() - t0
        figures["flasktop Sampler threads"] = 100 * (time.process_time() - p0) / dt
        figures["its py-spy children"] = 100 * (children_cpu() - c0) / dt
        figures["dumps per second"] = s.dumps / dt
        figures["estimated dump cost (ms)"] = s.schedule.cost * 1e3
        figures["per-worker interval now (s)"] = s.schedule.intervals()[1]

    while_busy(g, n, seconds, ours)
    for k, v in figures.items():
        print(f"  {k:28} {v:6.2f}")

    def top(_: List[int]) -> None:
        master, slave = pty.openpty()
        exe = find_py_spy() or "py-spy"
        p = subprocess.Popen([exe, "top", "--pid", str(g.pid), "--subprocesses"], stdin=slave,
                             stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)

        def drain() -> None:
            with open(master, "rb", buffering=0) as f:
                while True:
                    try:
                        if not f.read(65536):
                            return
                    except OSError:
                        return

        threading.Thread(target=drain, daemon=True).start()
        try:
            time.sleep(1)
            proc = psutil.Process(p.pid)
            c0, t0 = proc.cpu_times(), time.monotonic()
            time.sleep(seconds - 3)
            c1, dt = proc.cpu_times(), time.monotonic() - t0
            figures["py-spy top"] = 100 * (c1.user - c0.user + c1.system - c0.system) / dt
        finally:
            kill_tree(p.pid)

    while_busy(g, n, seconds, top)
    print(f"  {'py-spy top --subprocesses':28} {figures['py-spy top']:6.2f}")


def main() -> None:
    """Run the three phases against a fresh gunicorn and print what they measured."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--round", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dumps", type=int, default=60)
    args = ap.parse_args()
    print(f"py-spy {find_py_spy()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    g = Gunicorn("pyspy_app:app", "-w", str(args.workers), "--timeout", "120",
                 cwd=ROOT / "tests" / "fixtures")
    try:
        g.start(workers_expected=args.workers)
        churn_all(g, args.workers, 1.0)  # warm up: imports done, test_client built
        phase_a(g, args.workers, args.dumps)
        phase_b(g, args.workers, args.round, args.repeats)
        phase_c(g, args.workers, max(8.0, args.round))
    finally:
        g.stop()


if __name__ == "__main__":
    main()
