"""What one psutil poll costs flasktop, for 4 and 16 sync workers of a real gunicorn.

    .venv/bin/python bench/poller_cost.py [--polls 200] [--workers 4 16]

For each worker count it starts gunicorn (tests/fixtures/poller_app.py), then times
``Poller.poll_once()``: the plain tick (no USS), and a tick that also reads USS/PSS
(``smaps_rollup``) for every process. Finding the master's children costs a listing of /proc plus a read of the
pids that are new since the last tick (printed against a full pass over every
/proc/<pid>/stat, what psutil's children() does). The default cadence is one tick a second and
USS every ten, so the amortised cost is ``plain + (with_uss - plain) / 10`` and the
share of one core is that cost times 1 Hz. CPU is this thread's CPU time (user +
system, which is where /proc reads go); wall time is printed alongside.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flasktop.sources.gunicorn import process_table  # noqa: E402
from flasktop.sources.poller import Poller, _ProcessTable  # noqa: E402
from tests.support import gunicorn, wait_until  # noqa: E402


def measure(fn: Callable[[], object], n: int) -> Tuple[float, float, float]:
    """(median wall ms, median cpu ms, p95 cpu ms) of ``fn`` over ``n`` calls."""
    walls: List[float] = []
    cpus: List[float] = []
    for _ in range(n):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpus.append((time.thread_time() - c0) * 1e3)
        walls.append((time.perf_counter() - w0) * 1e3)
    cpus.sort()
    return statistics.median(walls), statistics.median(cpus), cpus[int(len(cpus) * 0.95) - 1]


def bench(workers: int, polls: int) -> None:
    with gunicorn("poller_app:app", "-w", str(workers), "-t", "30",
                  workers_expected=workers, cwd=None) as g:
        plain = Poller(g.pid, lambda e: None, uss_interval=1e9)
        wait_until(lambda: len(plain.poll_once().workers) == workers, timeout=30,
                   message=f"{workers} workers in a tick")
        for _ in range(3):
            g.get("/")
        tick = plain.poll_once()
        fds = sum(w.num_fds or 0 for w in tick.workers) + (tick.master.num_fds or 0 if tick.master else 0)
        p_wall, p_cpu, p_95 = measure(plain.poll_once, polls)
        heavy = Poller(g.pid, lambda e: None)
        heavy.uss_interval = 0.0  # USS on every tick
        heavy.poll_once()
        u_wall, u_cpu, u_95 = measure(heavy.poll_once, max(20, polls // 4))
        scan_wall, scan_cpu, _ = measure(process_table, polls)
        table = _ProcessTable()
        table.refresh(time.monotonic())
        inc_wall, inc_cpu, _ = measure(lambda: table.refresh(time.monotonic()), polls)
        amortised = p_cpu + (u_cpu - p_cpu) / 10
        print(f"{workers:>3} workers ({fds} fds, {len(os.listdir('/proc'))} /proc entries):"
              f" plain tick {p_cpu:.2f} ms cpu (p95 {p_95:.2f}, wall {p_wall:.2f});"
              f" with USS {u_cpu:.2f} ms cpu (p95 {u_95:.2f}, wall {u_wall:.2f});"
              f" finding children: {inc_cpu:.2f} ms (a full /proc/*/stat pass: {scan_cpu:.2f} ms);"
              f" at 1 Hz + USS/10 s: {amortised:.2f} ms/s = {amortised / 10:.2f}% of a core")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    for n in args.workers:
        bench(n, args.polls)


if __name__ == "__main__":
    main()
