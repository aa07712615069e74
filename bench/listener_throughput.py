"""How fast the UDP listener decodes beacon traffic, and what it loses at a given rate.

N sender PROCESSES (default 4) each pre-encode their share of request events with
the real ``Encoder`` (pid = their own pid, 512 rows per encode call and an in-flight
report a second, as the beacon's flusher does), wait for "go", then send on
schedule to 127.0.0.1 for a few seconds. This process runs the real ``Listener`` on
its own thread and drains it every 0.25 s, as the engine does. For each offered
rate it prints what was sent, decoded and lost, and the listener thread's own CPU
time, from which "events decoded per CPU-second" (one core) follows.

A second table compares what one ``sendto()`` costs the sender (the app) when the
receiver sleeps on a timer (the Listener) and when a receiver blocks in ``recv()``.
It runs one sender at a low rate so that each datagram finds the receiver idle, as
in an app.

Everything is bounded: sender count, seconds per run, events per run; senders exit
by themselves and are killed by pid in any case. Traffic goes to 127.0.0.1 only.

    .venv/bin/python bench/listener_throughput.py [--senders 4] [--seconds 3]
        [--rates 50000,100000,200000,400000] [--rcvbuf BYTES] [--skip-cost]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flasktop.protocol import Encoder, clip, decode  # noqa: E402
from flasktop.sources.listener import DEFAULT_RCVBUF, Listener  # noqa: E402

CHUNK = 512  # rows per Encoder.requests() call, as flasktop/beacon/_reporter.py
MAX_EVENTS_PER_RUN = 5_000_000
MAX_SECONDS = 30.0
ROUTES = [
    ("/", "index", "GET"), ("/orders/<int:oid>", "orders.show", "GET"),
    ("/orders", "orders.create", "POST"), ("/api/v1/users/<uuid:uid>/profile", "api.profile", "GET"),
    ("/static/<path:filename>", "static", "GET"), ("/export", "reports.export", "POST"),
    ("/search", "search", "GET"), ("/health", "health", "GET"),
]


# ---------------------------------------------------------------------------------------
# The sender process


def _rows(n: int, rng: random.Random) -> List[list]:
    out = []
    for _ in range(n):
        route, endpoint, method = rng.choice(ROUTES)
        status = rng.choice((200, 200, 200, 200, 201, 302, 404, 500))
        exc = "ValueError" if status == 500 else ""
        out.append([clip(route), clip(endpoint), method, status, rng.randint(200, 3_000_000),
                    rng.randint(-1, 80_000), exc, rng.randint(1000, 60_000), rng.randint(0, 150)])
    return out


def sender_main(port: int, rate: float, seconds: float, chunk: int) -> None:
    """Pre-encode, say ready, wait for go, send on schedule, print a JSON summary."""
    rng = random.Random(os.getpid())
    enc = Encoder(os.getpid())
    total = int(min(rate * seconds, MAX_EVENTS_PER_RUN))
    t_ms = int(time.time() * 1000)
    plan: List[Tuple[float, List[bytes]]] = []  # (due, datagrams)
    done = 0
    next_report = 0.0
    while done < total:
        n = min(chunk, total - done)
        due = done / rate
        batch = enc.requests(t_ms + int(due * 1000), _rows(n, rng))
        if due >= next_report:  # the in-flight heartbeat, once a second
            rows = [[r, e, m, rng.randint(1000, 60_000), rng.randint(0, 5_000_000)]
                    for r, e, m in ROUTES[:3]]
            batch += enc.inflight(t_ms + int(due * 1000), rows, total=3, dropped=0, send_errors=0)
            next_report += 1.0
        plan.append((due, batch))
        done += n
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    addr = ("127.0.0.1", port)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    costs: List[int] = []
    errors = 0
    sent = 0
    clock = time.perf_counter
    ns = time.perf_counter_ns
    start = clock()
    cpu0 = time.process_time()
    hard_stop = start + seconds + 5.0
    for due, batch in plan:
        wait = start + due - clock()
        if wait > 0:
            time.sleep(wait)
        if clock() > hard_stop:
            break
        for data in batch:
            t0 = ns()
            try:
                sock.sendto(data, addr)
                sent += 1
            except OSError:
                errors += 1
            costs.append(ns() - t0)
    elapsed = clock() - start
    cpu = time.process_time() - cpu0
    costs.sort()
    print(json.dumps({
        "pid": os.getpid(), "datagrams": sent, "cpu": cpu, "events": total, "errors": errors,
        "seconds": elapsed, "sendto_median_us": costs[len(costs) // 2] / 1000 if costs else 0.0,
        "sendto_mean_us": sum(costs) / len(costs) / 1000 if costs else 0.0,
        "datagrams_planned": sum(len(b) for _, b in plan),
    }), flush=True)


# ---------------------------------------------------------------------------------------
# The receiving side


class BlockingReceiver:
    """The design we did not choose: a thread asleep in recv(), decoding each datagram."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except socket.timeout:
                continue
            decode(data)
            self.received += 1

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def thread_cpu(thread: Optional[threading.Thread]) -> float:
    if thread is None or thread.ident is None:
        return 0.0
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (OSError, AttributeError):
        return float("nan")


def run_senders(port: int, n: int, rate: float, seconds: float, chunk: int,
                on_tick: Optional[Callable[[], object]] = None) -> List[Dict]:
    """Start ``n`` sender processes sharing ``rate`` events/s; return their summaries."""
    procs: List[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--sender", "--port", str(port), "--rate", str(rate / n),
                 "--seconds", str(seconds), "--chunk", str(chunk)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a sender failed to start")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        deadline = time.monotonic() + seconds + 30
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise RuntimeError("senders did not finish in time")
            if on_tick is not None:
                on_tick()
            time.sleep(0.25)
        out = []
        for p in procs:
            assert p.stdout is not None
            out.append(json.loads(p.stdout.read().strip().splitlines()[-1]))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(5)


def loss_run(n: int, rate: float, seconds: float, rcvbuf: int) -> Dict:
    lst = Listener(port=0, rcvbuf=rcvbuf)
    lst.start()
    drained = [0]

    def drain() -> None:
        drained[0] += sum(len(d.requests) for d in lst.drain())

    try:
        cpu0 = thread_cpu(lst._thread)
        summaries = run_senders(lst.port, n, rate, seconds, CHUNK, on_tick=drain)
        sent = sum(s["datagrams"] for s in summaries)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until every datagram is read or counted as dropped
            st = lst.stats()
            if st.received + (st.kernel_drops or 0) >= sent:
                break
            time.sleep(0.05)
        cpu = thread_cpu(lst._thread) - cpu0
        drain()
        st = lst.stats()
    finally:
        lst.stop()
    wall = max(s["seconds"] for s in summaries)
    return {
        "offered": rate, "sent_events": sum(s["events"] for s in summaries), "wall": wall,
        "sent_dgrams": sent, "received": st.received, "events": st.events, "requests": drained[0],
        "lost": st.lost, "kernel_drops": st.kernel_drops, "rejected": sum(c for _, c in st.rejected),
        "dropped_backlog": st.dropped_backlog, "cpu": cpu, "rcvbuf": lst.rcvbuf,
        "sendto_us": statistics.median(s["sendto_median_us"] for s in summaries),
    }


def sender_cost(seconds: float, rounds: int = 3) -> List[Tuple[str, float, float, int, int]]:
    """sendto() cost to one sender (one app worker) at ~500 datagrams/s, per kind of receiver.

    Receivers alternate for ``rounds`` rounds; the medians of the rounds are returned.
    """
    results: Dict[str, List[Tuple[float, float, int, int]]] = {"timed drain (Listener)": [],
                                                              "blocked in recv()": []}
    for _ in range(rounds):
        for name in results:
            if name.startswith("timed"):
                lst = Listener(port=0)
                lst.start()
                try:
                    sums = run_senders(lst.port, 1, 2000.0, seconds, 4, on_tick=lst.drain)
                    got = _settle(lambda: lst.stats().received, sums[0]["datagrams"])
                finally:
                    lst.stop()
            else:
                rcv = BlockingReceiver()
                try:
                    sums = run_senders(rcv.port, 1, 2000.0, seconds, 4)
                    got = _settle(lambda: rcv.received, sums[0]["datagrams"])
                finally:
                    rcv.stop()
            s0 = sums[0]
            results[name].append((s0["sendto_median_us"], s0["sendto_mean_us"], s0["datagrams"], got))
    return [(name, statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs),
             sum(r[2] for r in rs), sum(r[3] for r in rs)) for name, rs in results.items()]


def _settle(count: Callable[[], int], target: int, timeout: float = 5.0) -> int:
    """Wait (bounded) until ``count()`` reaches ``target``; return the last count."""
    deadline = time.monotonic() + timeout
    while count() < target and time.monotonic() < deadline:
        time.sleep(0.02)
    return count()


def decode_only(seconds: float = 1.0) -> Tuple[float, float, float]:
    """Events/s of decode() alone (no socket), bytes and events per datagram."""
    enc = Encoder(4242)
    rng = random.Random(1)
    dgrams: List[bytes] = []
    for _ in range(20):
        dgrams += enc.requests(int(time.time() * 1000), _rows(CHUNK, rng))
    events = 0
    n = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        for d in dgrams:
            events += len(decode(d).requests)  # type: ignore[union-attr]
        n += len(dgrams)
    cpu = time.process_time() - start
    return events / cpu, sum(map(len, dgrams)) / len(dgrams), 20 * CHUNK / len(dgrams)


def decode_durations(kind: str, seconds: float = 1.0) -> Tuple[float, float]:
    """Requests/s that decode() buckets from a busy flush's durations, alone, and requests
    per datagram: kind "h" (their high bytes, what the beacon sends) or "d" (their high
    halves, what beacons before "h" sent)."""
    from array import array

    from flasktop.protocol import duration_words, high_bytes
    rng = random.Random(3)
    durs = array("d", (rng.lognormvariate(-9, 0.5) for _ in range(20_000)))
    row = ["/orders/<int:oid>", "orders", "GET", 200, "", 4250, 150]
    t_ms = int(time.time() * 1000)
    if kind == "h":
        dgrams = Encoder(4242).high_bytes(t_ms, [row + [high_bytes(durs)]])
    else:
        dgrams = Encoder(4242).durations(t_ms, [row + [duration_words(durs)]])
    counted = 0
    start = time.process_time()
    while time.process_time() - start < seconds:
        for d in dgrams:
            counted += decode(d).aggregates[0].count  # type: ignore[union-attr]
    cpu = time.process_time() - start
    return counted / cpu, 20_000 / len(dgrams)


def bytes_per_queued_event() -> float:
    enc = Encoder(4242)
    dgrams = enc.requests(int(time.time() * 1000), _rows(20_000, random.Random(2)))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    kept = [decode(d) for d in dgrams]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / sum(len(k.requests) for k in kept)  # type: ignore[union-attr]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--senders", type=int, default=4, choices=range(1, 17), metavar="N")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rates", default="50000,100000,200000,400000",
                    help="offered request events per second, comma separated")
    ap.add_argument("--rcvbuf", type=int, default=DEFAULT_RCVBUF,
                    help="receive buffer to ask for (212992 = an unprivileged default)")
    ap.add_argument("--skip-cost", action="store_true", help="skip the sendto() cost table")
    ap.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=CHUNK, help=argparse.SUPPRESS)
    args = ap.parse_args()
    seconds = min(max(args.seconds, 0.5), MAX_SECONDS)
    if args.sender:
        sender_main(args.port, args.rate, seconds, args.chunk)
        return
    rates = [float(r) for r in args.rates.split(",") if r.strip()]

    print(f"flasktop listener throughput: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{args.senders} sender processes, {seconds:g} s per run, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    per_s, size, per_dgram = decode_only()
    print(f"\ndecode() alone: {per_s:,.0f} request events per CPU-second "
          f"({size:,.0f} bytes and {per_dgram:.1f} events per datagram)")
    for kind in ("h", "d"):
        d_per_s, d_per_dgram = decode_durations(kind)
        print(f"decode() of kind \"{kind}\": {d_per_s:,.0f} requests bucketed per CPU-second "
              f"({d_per_dgram:.0f} durations per datagram)")
    print(f"memory held per decoded request event in the backlog: {bytes_per_queued_event():,.0f} bytes")

    print("\noffered ev/s   sent ev    datagrams  received   decoded ev  lost  kernel drops"
          "  backlog drops  listener CPU  ev per CPU-s  sendto us")
    for rate in rates:
        r = loss_run(args.senders, rate, seconds, args.rcvbuf)
        cpu_pct = 100 * r["cpu"] / r["wall"] if r["wall"] else 0.0
        per_cpu = r["events"] / r["cpu"] if r["cpu"] else 0.0
        print(f"{rate:>12,.0f}  {r['sent_events']:>9,}  {r['sent_dgrams']:>9,}  {r['received']:>9,}"
              f"  {r['requests']:>10,}  {r['lost']:>4}  {r['kernel_drops']!s:>12}"
              f"  {r['dropped_backlog']:>13}  {cpu_pct:>10.0f} %  {per_cpu:>12,.0f}"
              f"  {r['sendto_us']:>9.1f}")
    print(f"(receive buffer granted: {r['rcvbuf']:,} bytes; 'decoded ev' counts request events "
          "drained by the consumer, in-flight entries excluded)")

    if args.skip_cost:
        return
    print("\nwhat one sendto() costs the app: one sender at ~500 datagrams/s, "
          "medians of 3 alternating rounds")
    print("receiver                   median us   mean us   datagrams  received")
    for name, med, mean, sent, got in sender_cost(min(seconds, 2.0)):
        print(f"{name:<25} {med:>10.1f} {mean:>9.1f}   {sent:>9,}  {got:>8,}")

if __name__ == "__main__":
    main()
