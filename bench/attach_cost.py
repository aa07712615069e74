"""What attaching costs: flasktop's own CPU, py-spy top's, and the throughput a worker loses.

Starts a real gunicorn (4 sync workers, the beacon on) serving a CPU-bound route, keeps
them busy from a separate load process on 127.0.0.1, and measures in alternating phases:

- ``none``: nobody watching (baseline throughput);
- ``flasktop``: the engine attached at its default rates (psutil poller, py-spy sampler,
  UDP listener, model, a snapshot a second): flasktop's CPU = this process + its py-spy
  children, as % of one core;
- ``py-spy top``: ``py-spy top --pid MASTER --subprocesses`` watching the same workers
  (its CPU as % of one core, its output thrown away).

Throughput is requests/s completed by the load process in each phase; the loss is
relative to the mean of the ``none`` phases. Bounded: every phase is ``--phase`` seconds.

    .venv/bin/python bench/attach_cost.py [--phase 10] [--rounds 2] [--workers 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pty
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flasktop.engine import Engine  # noqa: E402
from tests.support import Gunicorn, free_port, wait_until  # noqa: E402


def load(port: int, stop_at: float, counter, clients: int) -> None:
    """Closed-loop clients: each sends the next request when the last one finishes."""
    import http.client
    import threading

    def client() -> None:
        n = 0
        while time.time() < stop_at:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/fast/1")
                conn.getresponse().read()
                n += 1
            except OSError:
                pass
            finally:
                conn.close()
        with counter.get_lock():
            counter.value += n

    ts = [threading.Thread(target=client) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def run_load(port: int, seconds: float, clients: int, during=None) -> float:
    """Drive load for ``seconds``; ``during()`` runs meanwhile (before the load process is
    reaped, so its CPU never lands in this process's RUSAGE_CHILDREN)."""
    counter = mp.Value("l", 0)
    p = mp.Process(target=load, args=(port, time.time() + seconds, counter, clients))
    p.start()
    if during is not None:
        during(seconds)
    p.join(seconds + 30)
    if p.is_alive():
        p.kill()
    return counter.value / seconds


def measure_self(box: list):
    """A ``during`` that records this process's CPU (threads + reaped py-spy children)."""
    def during(seconds: float) -> None:
        c0, t0 = cpu_self(), time.monotonic()
        time.sleep(seconds)
        box.append((cpu_self() - c0) / (time.monotonic() - t0) * 100)
    return during


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    except OSError:
        pass


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phase", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    udp = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "PYTHONPATH": str(ROOT)}
    g = Gunicorn("trouble_app:app", "-w", str(args.workers), env=env,
                 cwd=ROOT / "tests" / "fixtures")
    g.start(workers_expected=args.workers)
    pyspy = str(Path(sys.executable).with_name("py-spy"))
    rows = []
    try:
        wait_until(lambda: len(g.worker_pids()) == args.workers, timeout=20)
        run_load(g.port, 2.0, args.clients)  # warm up
        for rnd in range(args.rounds):
            # nobody watching
            rows.append(("none", run_load(g.port, args.phase, args.clients), None))
            # flasktop attached at default rates
            engine = Engine(g.pid, beacon=("127.0.0.1", udp))
            engine.start(lambda snap: None)
            time.sleep(1.0)
            box: list = []
            rate = run_load(g.port, args.phase, args.clients, during=measure_self(box))
            engine.stop()
            rows.append(("flasktop", rate, box[0]))
            # py-spy top on the same workers
            # py-spy top needs a terminal (it exits at once without one): give it a pty and
            # drain what it draws
            master_fd, slave_fd = pty.openpty()
            top = subprocess.Popen([pyspy, "top", "--pid", str(g.pid), "--subprocesses"],
                                   stdout=slave_fd, stderr=slave_fd, stdin=slave_fd,
                                   start_new_session=True)
            os.close(slave_fd)
            drain = threading.Thread(target=_drain, args=(master_fd,), daemon=True)
            drain.start()
            try:
                ps = psutil.Process(top.pid)
                time.sleep(1.0)
                ct0 = ps.cpu_times()
                t0 = time.monotonic()
                rate = run_load(g.port, args.phase, args.clients)
                ct1 = ps.cpu_times()
                cpu = ((ct1.user + ct1.system + ct1.children_user + ct1.children_system)
                       - (ct0.user + ct0.system + ct0.children_user + ct0.children_system)) \
                    / (time.monotonic() - t0) * 100
                assert top.poll() is None, "py-spy top exited: it did not watch"
            finally:
                top.kill()
                top.wait()
                os.close(master_fd)
            rows.append(("py-spy top", rate, cpu))
    finally:
        g.stop()

    base = [r for _, r, _ in [x for x in rows if x[0] == "none"]]
    base_rate = sum(base) / len(base)
    print(f"gunicorn {args.workers} sync workers, {args.clients} closed-loop clients, "
          f"{args.rounds} rounds of {args.phase:g} s phases, machine: {os.cpu_count()} cores")
    print(f"{'phase':<12} {'req/s':>9} {'vs none':>9} {'watcher CPU % of a core':>24}")
    for name in ("none", "flasktop", "py-spy top"):
        sel = [x for x in rows if x[0] == name]
        rate = sum(r for _, r, _ in sel) / len(sel)
        cpus = [c for _, _, c in sel if c is not None]
        cpu = f"{sum(cpus) / len(cpus):.1f}" if cpus else "-"
        print(f"{name:<12} {rate:>9.0f} {100 * (rate / base_rate - 1):>+8.1f}% {cpu:>24}")


if __name__ == "__main__":
    main()
