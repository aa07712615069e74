"""What the beacon's flusher costs per request, in a tight loop: one busy lane, one flush.

A lane of ended requests (the Flask fast path's start, group, size, duration quads) is
sent by ``Reporter._send_lane`` to a real UDP socket on 127.0.0.1 that is drained between
passes. Two shapes: one route (the busy common case, counted in as few passes as can be)
and four routes with one request in fifty slow (the exact path). CPU per request, best of
five; the same code next to a serving thread costs more (see beacon_overhead.py's "other
threads" column), since it then reads what another core wrote.

    .venv/bin/python bench/beacon_flusher.py [--requests 7000] [--passes 50]
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flasktop.beacon._address import resolve  # noqa: E402
from flasktop.beacon._reporter import BUDGET, Reporter  # noqa: E402


class Rule:
    def __init__(self, rule: str, endpoint: str) -> None:
        self.rule, self.endpoint = rule, endpoint


def lane(rep: Reporter, n: int, routes: int, slow_every: int) -> array:
    gks = []
    for i in range(routes):
        rep.group_info.append((200, Rule(f"/r{i}/<int:x>", f"r{i}"), "GET", ""))
        gks.append(float(len(rep.group_info) - 1))
    rng = random.Random(7)
    quads = array("d")
    t = 1000.0
    for i in range(n):
        d = 0.006 if slow_every and i % slow_every == 0 else 30e-6 + rng.random() * 20e-6
        quads.extend((t, gks[i % routes], 13.0, d))
        t += 45e-6
    return quads


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--requests", type=int, default=7000, help="per flush (about 0.3 s at 23k req/s)")
    p.add_argument("--passes", type=int, default=50)
    args = p.parse_args()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        for name, routes, slow in (("one route, all fast", 1, 0), ("4 routes, 1 in 50 slow", 4, 50)):
            rep = Reporter(resolve(f"127.0.0.1:{rx.getsockname()[1]}"))  # type: ignore[arg-type]
            quads = lane(rep, args.requests, routes, slow)
            best = float("inf")
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(args.passes):
                    rep._send_lane(4242, quads, BUDGET)
                    try:
                        while True:
                            rx.recv(65536)
                    except BlockingIOError:
                        pass
                best = min(best, (time.process_time() - t0) / args.passes / args.requests)
            print(f"{name:<26} {best * 1e9:6.0f} ns per request "
                  f"({args.requests} requests a flush, the first {BUDGET} one by one)")


if __name__ == "__main__":
    main()
