"""What the UI costs over ssh: time to first frame, bytes/s written, and its own CPU.

Runs the real ``flasktop --pid`` in a pseudo-terminal of a given size against a real
gunicorn (2 sync workers, the beacon on), reads everything it writes for ``--seconds``,
and reports: time from start to the first frame with data (the header's req/s), bytes per
second written after that (the redraw bandwidth an ssh link carries), and flasktop's CPU
(% of one core, with its py-spy children) while it watches. Two phases per size: the app
idle (idle-watching), and the app under a light bounded load (2 req/s per route).

    .venv/bin/python bench/ui_cost.py [--seconds 15] [--sizes 80x24,160x45]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import Gunicorn, free_port  # noqa: E402


def drive(g: Gunicorn, stop: threading.Event) -> None:
    while not stop.is_set():
        for path in ("/fast/1", "/slow"):
            try:
                g.get(path, timeout=5)
            except OSError:
                pass
        stop.wait(0.5)


def run(pid: int, udp: int, cols: int, rows: int, seconds: float) -> dict:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    env.pop("NO_COLOR", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "flasktop", "--pid", str(pid), "--beacon",
                             f"127.0.0.1:{udp}"], stdin=slave, stdout=slave, stderr=slave,
                            env=env, cwd=str(ROOT), start_new_session=True)
    os.close(slave)
    out = bytearray()
    first = None
    marker = b"req/s"  # in the header of the first frame with data, not the "attaching" text
    ps = psutil.Process(proc.pid)
    cpu0 = None
    t_first = None
    deadline = t0 + seconds + 10
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                out += chunk
                if first is None and marker in out:
                    first = time.monotonic() - t0
                    t_first = time.monotonic()
                    n_first = len(out)
                    ct = ps.cpu_times()
                    cpu0 = ct.user + ct.system
            if t_first is not None and time.monotonic() - t_first >= seconds:
                break
        ct = ps.cpu_times()
        cpu1 = ct.user + ct.system + ct.children_user + ct.children_system
        kids = sum((c.cpu_times().user + c.cpu_times().system)
                   for c in ps.children(recursive=True) if c.is_running())
        elapsed = time.monotonic() - (t_first or t0)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        while True:  # drain, so the child's last writes don't block its exit
            r, _, _ = select.select([master], [], [], 0.05)
            if not r:
                break
            try:
                if not os.read(master, 65536):
                    break
            except OSError:
                break
        os.close(master)
    if first is None:
        return {"first_frame_s": None, "bytes_per_s": None, "cpu_pct": None}
    return {"first_frame_s": first,
            "bytes_per_s": (len(out) - n_first) / elapsed,
            "cpu_pct": (cpu1 + kids - (cpu0 or 0.0)) / elapsed * 100}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--sizes", default="80x24,160x45")
    args = ap.parse_args()
    udp = free_port(socket.SOCK_DGRAM)
    g = Gunicorn("trouble_app:app", "-w", "2", env={"FLASKTOP_BEACON": f"127.0.0.1:{udp}",
                                                    "PYTHONPATH": str(ROOT)},
                 cwd=ROOT / "tests" / "fixtures")
    g.start(workers_expected=2)
    rows = []
    try:
        for size in args.sizes.split(","):
            cols, lines = (int(x) for x in size.split("x"))
            rows.append((size, "idle app", run(g.pid, udp, cols, lines, args.seconds)))
            stop = threading.Event()
            t = threading.Thread(target=drive, args=(g, stop), daemon=True)
            t.start()
            try:
                rows.append((size, "light load", run(g.pid, udp, cols, lines, args.seconds)))
            finally:
                stop.set()
                t.join(10)
    finally:
        g.stop()
    print(f"flasktop --pid (2 sync workers), {args.seconds:g} s per phase, {os.cpu_count()} cores")
    print(f"{'size':<8} {'phase':<11} {'first frame':>12} {'bytes/s':>9} {'CPU % of a core':>16}")
    for size, phase, r in rows:
        ff = "-" if r["first_frame_s"] is None else f"{r['first_frame_s']:.2f} s"
        bps = "-" if r["bytes_per_s"] is None else f"{r['bytes_per_s']:,.0f}"
        cpu = "-" if r["cpu_pct"] is None else f"{r['cpu_pct']:.1f}"
        print(f"{size:<8} {phase:<11} {ff:>12} {bps:>9} {cpu:>16}")


if __name__ == "__main__":
    main()
