"""What the beacon costs a Flask app, side by side with the alternatives, in one run.

Part 1, in-process. Each variant is a fresh hello-world Flask app called directly as
WSGI: a copy of a prebuilt environ per request, a no-op start_response, the response
iterated and closed. In each round every variant serves ``--requests`` requests, the
variants taking turns in blocks of ``--block`` requests (the order rotates each round), so
a noisy neighbour slows them all alike. Two figures per variant:

- CPU per request: the serving thread's CPU over the variant's turns, plus the CPU its
  own flusher thread used in the whole round (that thread's CPU clock), over its requests.
  It counts everything the beacon costs: the request path, the flusher (which shares the
  GIL with the app), the kernel's sendto(). Reported as the median over rounds of the
  difference to bare Flask in the same round.
- latency: the median over all requests of each request's own wall time; what a
  request waits for, i.e. the request path alone.

A turn is one flush interval of a busy worker: 20,000 requests (about 1 s, the
flusher's period, at this rate), then the flusher is woken and does its flush on its own
thread, cold, as in production; the serving thread waits for it asleep. Long turns put a
round's variants further apart in time, so the per-round differences are noisier on a
shared machine (beacon IQR 7-13 us for turns of 20,000 against 3-10 for 6,000); the
median over rounds, and over processes with ``--procs``, absorbs that. ``--block 1000``
interleaves the variants within a round instead, which charges each beacon more flusher
wake-ups per request than a busy worker has (see ``in_process``): pessimistic.

The beacon is heard by flasktop's own listener (``--receiver flasktop``), in a process of
its own, which reads on a 25 ms timer; ``--receiver recv`` is a receiver asleep in recv(),
which every datagram must wake: what an app pays when whatever listens is built that way.

The variants are made in a random order, each after a random amount of padding
(``--layout random``, see ``layout_draw``): made in a fixed order, each got the same
memory layout in every process, and so a fixed bias of a few tenths of a microsecond that
no number of processes averages out.

Part 2, through gunicorn: the same app under a real gunicorn (sync, one worker), bare
and with the beacon (heard by the same receiver), a bounded number of loopback requests
from a couple of client threads, alternating. Figures are printed, nothing is asserted.

    .venv/bin/python bench/beacon_overhead.py [--rounds 21] [--requests 20000] [--block 0]
                                              [--http 2000] [--receiver flasktop]
                                              [--procs 1] [--layout random] [--seed N]
                                              [--flush-interval S]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask import Flask  # noqa: E402
from werkzeug.test import EnvironBuilder  # noqa: E402

from flasktop.beacon import Beacon  # noqa: E402

BARE = "bare flask"
QUIET = "beacon, nobody listening"
HEARD = "beacon, heard"
PROM = "prometheus_flask_exporter"
CLOCK = "clock-only middleware"

# The receiver, in its own process as flasktop is, until its stdin closes. "flasktop" is
# flasktop's own Listener (it sleeps on a 25 ms timer and reads what waits, so a datagram
# wakes nobody) drained four times a second as the engine does; "recv" is a receiver asleep
# in recv(), which every datagram must wake: the sender's worst case.
RECEIVERS = {
    "flasktop": r"""
import os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from flasktop.sources.listener import Listener
listener = Listener(port=0)
listener.start()
print(listener.port, flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
while True:
    time.sleep(0.25)
    listener.drain()
""",
    "recv": r"""
import os, socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
while True:
    s.recv(65536)
""",
}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hello_app() -> Flask:
    # Each variant's app is of a class of its own, as a worker's one app is alone with its
    # class. On CPython 3.11 a class's instances share one table of attribute names, with
    # room for about 29; a Flask 3.1 app has 27, and Flask's calls on the app stay
    # specialized only while all of its attributes are in that table. One app per class
    # keeps the variants' attributes from crowding each other out of it (the clock-only
    # middleware's wsgi_app would otherwise take a place the beacon's app needs).
    app = type("Flask", (Flask,), {})("hello")

    @app.route("/")
    def index() -> str:
        return "Hello, World!"

    return app


class ClockOnly:
    """The floor: a middleware that reads the clock at entry and at close."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.total = 0.0

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        t0 = time.perf_counter()
        it = self.app(environ, start_response)
        return _ClockClose(it, self, t0)


class _ClockClose:
    __slots__ = ("it", "mw", "t0")

    def __init__(self, it: Any, mw: ClockOnly, t0: float) -> None:
        self.it, self.mw, self.t0 = it, mw, t0

    def __iter__(self) -> Any:
        return iter(self.it)

    def close(self) -> None:
        close = getattr(self.it, "close", None)
        if close is not None:
            close()
        self.mw.total += time.perf_counter() - self.t0


class Drain:
    """The receiver process (see RECEIVERS); always stopped, by pid."""

    def __init__(self, receiver: str = "flasktop") -> None:
        self.receiver = receiver

    def __enter__(self) -> "Drain":
        self.proc = subprocess.Popen([sys.executable, "-c", RECEIVERS[self.receiver], str(ROOT)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


Variant = Tuple[Any, Callable[[], object], Callable[[], Any]]
_PADDING: List[Any] = []  # what layout_draw() allocated, kept alive for the whole run


def layout_draw(rng: random.Random) -> None:
    """Move where the next objects land, and which type version tags the next classes get.

    Where an app's objects sit in memory, and which version tags its classes draw (CPython's
    type attribute cache is indexed by tag and name), moves its request path by a fraction
    of a microsecond. Both follow from the order of allocation, so without this each variant
    got the same draw in every process: the beacon made in the third place instead of the
    fourth was 0.2 us a request slower, in process after process (docs/benchmarks.md). A
    random amount of padding of assorted sizes, and of classes that take a tag, before each
    variant makes each process a fresh draw, which the median over processes averages."""
    _PADDING.append([bytearray(rng.randrange(1, 600)) for _ in range(rng.randrange(200))])
    _PADDING.append([{} for _ in range(rng.randrange(50))])
    _PADDING.append([object() for _ in range(rng.randrange(200))])
    for _ in range(rng.randrange(64)):
        pad = type("Pad", (), {})
        getattr(pad, "__flasktop_pad__", None)  # a lookup assigns the class its tag
        _PADDING.append(pad)


def make_variants(listen_port: int, rng: Optional[random.Random] = None) -> Dict[str, Variant]:
    """name -> (wsgi callable, end-of-round flush run on the serving thread, the variant's
    background thread or None). With ``rng`` the variants are made in a random order, each
    after a ``layout_draw``."""
    none: Callable[[], Any] = lambda: None  # noqa: E731

    def bare() -> Variant:
        return hello_app(), lambda: None, none

    def clock() -> Variant:
        app = hello_app()
        app.wsgi_app = ClockOnly(app.wsgi_app)  # type: ignore[method-assign]
        return app, lambda: None, none

    def beacon(address: str) -> Callable[[], Variant]:
        def make() -> Variant:
            app = hello_app()
            b = Beacon(app, address=address)
            return app, lambda: flush_on_flusher(b), lambda: b.reporter.thread
        return make

    def prom() -> Optional[Variant]:
        try:
            from prometheus_client import CollectorRegistry
            from prometheus_flask_exporter import PrometheusMetrics
        except ImportError:
            print("(prometheus_flask_exporter is not installed: that variant is skipped)")
            return None
        app = hello_app()
        PrometheusMetrics(app, registry=CollectorRegistry(), group_by="url_rule")
        return app, lambda: None, none

    makers: Dict[str, Callable[[], Optional[Variant]]] = {
        BARE: bare, CLOCK: clock, QUIET: beacon(f"127.0.0.1:{free_udp_port()}"),
        HEARD: beacon(f"127.0.0.1:{listen_port}"), PROM: prom}
    order = list(makers)
    if rng is not None:
        rng.shuffle(order)
    made: Dict[str, Optional[Variant]] = {}
    for name in order:
        if rng is not None:
            layout_draw(rng)
        made[name] = makers[name]()
    return {name: made[name] for name in makers if made[name] is not None}


def flush_on_flusher(beacon: Any, timeout: float = 5.0) -> None:
    """End a turn as a busy worker's flush happens: wake the beacon's flusher thread and
    wait, asleep, until it has sent every ended request. The flush's CPU is then that
    thread's (charged to the variant by its CPU clock), spent as in production: by a thread
    that slept, with cold caches, not by the serving thread with its caches warm."""
    rep = beacon.reporter
    rep.wakeup()
    deadline = time.monotonic() + timeout
    while any(len(lane.buf) for lane in list(rep.lanes)) and time.monotonic() < deadline:
        time.sleep(0.0005)
    with rep.lock:  # the flush that took them has finished
        pass


def thread_cpu(thread: Any) -> float:
    """CPU seconds ``thread`` has used so far (0 for none, or one that ended)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except (AttributeError, OSError, TypeError):
        return 0.0


def hello_environ() -> Dict[str, Any]:
    """The environ of a GET / that every variant serves (copied per request)."""
    return EnvironBuilder(path="/", base_url="http://127.0.0.1:8000").get_environ()


def run_block(app: Any, base: Dict[str, Any], n: int, lat: Optional[List[float]] = None) -> float:
    """Serve ``n`` requests on this thread: its CPU seconds; each request's wall time to ``lat``."""
    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    clock = time.perf_counter
    c0 = time.thread_time()
    for _ in range(n):
        t = clock()
        it = app(base.copy(), start_response)
        for _chunk in it:
            pass
        it.close()
        if lat is not None:
            lat.append(clock() - t)
    return time.thread_time() - c0


def in_process(rounds: int, n: int, block: int, receiver: str = "flasktop",
               seed: Optional[int] = None) -> Dict[str, Any]:
    """Each round serves ``n`` requests of every variant, the order rotating each round.

    With ``block`` 0 (or >= n) a variant serves its ``n`` in one turn, at full rate as a busy
    worker does; with a smaller ``block`` the variants take turns of ``block`` requests, so
    that a noisy neighbour slows them all alike. After a variant's last turn of the round its
    flusher is woken and the serving thread waits, asleep, until it has sent them all
    (``flush_on_flusher``). Each variant is charged its serving thread's CPU over its turns,
    plus its flusher thread's CPU over the whole round (that thread's own CPU clock): the
    flushes during its turns and the last one, and also the idle wake-ups (one a second,
    for the in-flight report) during the other variants' turns. Those a busy worker would
    fold into its regular flushes, so the charge is on the beacon's pessimistic side, and
    more so the smaller ``block`` is: interleaved, a flusher's regular wake-ups (every 300
    ms) find a few hundred requests each, where a busy worker's find thousands."""
    block = n if block <= 0 or block >= n else block
    with Drain(receiver) as drain:
        variants = make_variants(drain.port, None if seed is None else random.Random(seed))
        base = hello_environ()
        names = list(variants)
        for name in names:  # warm up, and let the quiet beacon learn nobody listens
            app, end, _thread = variants[name]
            run_block(app, base, min(n, 500))
            end()
        time.sleep(0.5)
        cpu: Dict[str, List[float]] = {name: [] for name in names}
        lat: Dict[str, List[float]] = {name: [] for name in names}
        other: Dict[str, List[float]] = {name: [] for name in names}

        def flusher_cpu(name: str) -> float:
            return thread_cpu(variants[name][2]())

        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            serve = {name: 0.0 for name in names}
            round0 = {name: flusher_cpu(name) for name in names}
            for start in range(0, n, block):
                last = start + block >= n
                for name in order:
                    app, end, _thread = variants[name]
                    serve[name] += run_block(app, base, min(block, n - start), lat[name])
                    if last:
                        c0 = time.thread_time()
                        end()
                        serve[name] += time.thread_time() - c0
            for name in order:
                bg = flusher_cpu(name) - round0[name]
                cpu[name].append((serve[name] + bg) / n)
                other[name].append(bg / n)
    figures = report_in_process(cpu, lat, other, rounds, n, block, receiver)
    figures["seed"] = seed
    return figures


def report_in_process(cpu: Dict[str, List[float]], lat: Dict[str, List[float]],
                      other: Dict[str, List[float]], rounds: int, n: int,
                      block: int, receiver: str = "flasktop") -> Dict[str, Any]:
    bare_cpu = statistics.median(cpu[BARE]) * 1e6
    bare_lat = statistics.median(lat[BARE]) * 1e6
    added: Dict[str, float] = {}
    print(f"\nIn-process WSGI, Flask hello world: {rounds} rounds x {n} requests per variant "
          f"in turns of {block}, heard by the {receiver!r} receiver "
          f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f})")
    print(f"{'variant':<27} {'CPU us/req':>10} {'added':>7} {'added %':>8} {'IQR':>6}"
          f" | {'latency p50':>11} {'added':>7} | {'flusher':>7}")
    for name in cpu:
        diffs = [(c - b) * 1e6 for c, b in zip(cpu[name], cpu[BARE])]
        added[name] = statistics.median(diffs)
        q = statistics.quantiles(diffs, n=4) if len(diffs) >= 4 else [0.0, 0.0, 0.0]
        med_lat = statistics.median(lat[name]) * 1e6
        print(f"{name:<27} {statistics.median(cpu[name]) * 1e6:>10.2f} {added[name]:>+7.2f} "
              f"{added[name] / bare_cpu * 100:>+7.1f}% {q[2] - q[0]:>6.2f}"
              f" | {med_lat:>11.2f} {med_lat - bare_lat:>+7.2f}"
              f" | {statistics.median(other[name]) * 1e6:>7.2f}")
    print("(CPU: median over rounds; 'added' is the median of per-round differences to bare "
          "Flask; IQR of those differences. latency: median of every request's wall time. "
          "flusher: CPU per request of the variant's own flusher thread; part of CPU.)")
    prom = added.get(PROM)
    for name in (QUIET, HEARD):
        line = (f"{name}: adds {added[name]:.2f} us CPU = {added[name] / bare_cpu * 100:.1f}% "
                "of bare Flask (goal <= 5%)")
        if prom:
            line += f", {added[name] / prom * 100:.1f}% of what {PROM} adds (goal <= 10%)"
        print(line)
    lat_added = {name: (statistics.median(lat[name]) - statistics.median(lat[BARE])) * 1e6
                 for name in cpu}
    return {"bare_cpu": bare_cpu, "added": added, "latency": lat_added,
            "flusher": {name: statistics.median(other[name]) * 1e6 for name in cpu}}


JSON_MARK = "FIGURES "


def across_processes(procs: int, args: argparse.Namespace) -> None:
    """The in-process part in ``procs`` fresh processes, one after another.

    Within one process the figures are steady, across processes they are not: where a
    process's objects land in memory moves the same request path by a fraction of a
    microsecond either way (docs/benchmarks.md). With ``--layout random`` (the default)
    each process is a fresh draw of that layout (``layout_draw``); a single process's
    figure is one draw, and the median over processes the cost over layouts. With
    ``--layout fixed`` every process gets nearly the same draw, which is steadier and
    biased by however lucky that draw is for each variant."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rounds", str(args.rounds),
           "--requests", str(args.requests), "--block", str(args.block), "--http", "0",
           "--layout", args.layout,
           "--receiver", args.receiver, "--json"]
    if args.flush_interval is not None:
        cmd += ["--flush-interval", str(args.flush_interval)]
    runs: List[Dict[str, Any]] = []
    seeds: List[Any] = []
    print(f"{procs} processes of {args.rounds} rounds x {args.requests} requests, in turns of "
          f"{args.block or args.requests}, heard by the {args.receiver!r} receiver "
          f"(load {os.getloadavg()[0]:.1f} at the start)")
    head = (f"{'proc':>4} {'bare us':>8} | {'clock-only':>10} | {'quiet CPU':>9} {'lat':>6}"
            f" {'flush':>6} | {'heard CPU':>9} {'lat':>6} {'flush':>6} | {'prom':>7}")
    print(head)
    for i in range(procs):
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600).stdout
        lines = [line for line in out.splitlines() if line.startswith(JSON_MARK)]
        if not lines:
            print(f"{i + 1:>4} (no figures: the process failed)")
            continue
        f = json.loads(lines[-1][len(JSON_MARK):])
        runs.append(f)
        a, lat, fl, bare = f["added"], f["latency"], f["flusher"], f["bare_cpu"]
        seeds.append(f.get("seed"))
        print(f"{i + 1:>4} {bare:>8.2f} | {a[CLOCK] / bare * 100:>+9.1f}% | "
              f"{a[QUIET] / bare * 100:>+8.1f}% {lat[QUIET]:>+6.2f} {fl[QUIET]:>6.2f} | "
              f"{a[HEARD] / bare * 100:>+8.1f}% {lat[HEARD]:>+6.2f} {fl[HEARD]:>6.2f} | "
              f"{a.get(PROM, float('nan')):>+7.2f}", flush=True)
    if not runs:
        return
    print(f"\nAcross {len(runs)} processes (CPU added: each process's median of per-round "
          "differences to bare Flask; composite: latency added + flusher CPU per request)")
    print(f"{'variant':<27} {'CPU added':>16} {'% of bare':>16} {'composite %':>16}"
          f" {'/ prom':>16} {'runs <= 5%':>10}")
    for name in (CLOCK, QUIET, HEARD):
        added = [r["added"][name] for r in runs]
        pct = [r["added"][name] / r["bare_cpu"] * 100 for r in runs]
        comp = [(r["latency"][name] + r["flusher"][name]) / r["bare_cpu"] * 100 for r in runs]
        prom = [r["added"][name] / r["added"][PROM] * 100 for r in runs if PROM in r["added"]]
        met = sum(p <= 5.0 for p in pct)

        def mm(xs: List[float], unit: str = "") -> str:
            return f"{statistics.median(xs):.2f}{unit} ({statistics.mean(xs):.2f})" if xs else "-"

        print(f"{name:<27} {mm(added):>16} {mm(pct):>16} {mm(comp):>16} {mm(prom):>16} "
              f"{met:>4} of {len(runs)}")
    print("(median over processes, mean in brackets"
          + (f"; layout seeds {', '.join(map(str, seeds))})" if any(s is not None for s in seeds)
             else "; layout fixed)"))


# ---------------------------------------------------------------------------
# Through gunicorn

APP = '''
import os
from flask import Flask
app = Flask(__name__)
@app.route("/")
def index():
    return "Hello, World!"
if os.environ.get("BENCH_BEACON") == "1":
    from flasktop.beacon import Beacon
    Beacon(app)
'''


def _serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_gunicorn(workdir: Path, beacon: bool, beacon_port: int) -> Tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENCH_BEACON": "1" if beacon else "0",
           "FLASKTOP_BEACON": f"127.0.0.1:{beacon_port}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "1", "--bind",
                             f"127.0.0.1:{port}", "--log-level", "warning", "bench_app:app"],
                            cwd=str(workdir), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not _serving(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit("gunicorn did not start")
        time.sleep(0.05)
    return proc, port


def worker_of(master: subprocess.Popen) -> int:
    """The pid of the master's one worker, read from /proc (Linux)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{master.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise SystemExit("no gunicorn worker")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its threads: the sum of its tasks' time on a CPU in
    nanoseconds (/proc/<pid>/task/*/schedstat), else user + system from /proc/<pid>/stat,
    whose clock ticks (10 ms) are 2 us a request over a round of 5,000. A thread that ended
    meanwhile drops out of the sum: the worker's threads (its flusher) live as long as it."""
    try:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass
    proc.wait(timeout=10)


def load(port: int, total: int, clients: int, time_limit: float) -> Tuple[float, float, int]:
    """Up to ``total`` GETs from ``clients`` threads within ``time_limit`` s: (req/s, p50 ms, done)."""
    lat: List[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit

    def client() -> None:
        mine = []
        for _ in range(total // clients):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
            finally:
                conn.close()
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return len(lat) / wall, (statistics.median(lat) * 1e3 if lat else 0.0), len(lat)


def through_gunicorn(total: int, rounds: int, clients: int, receiver: str = "flasktop") -> None:
    procs: List[subprocess.Popen] = []
    with Drain(receiver) as drain, tempfile.TemporaryDirectory() as tmp:
        try:
            Path(tmp, "bench_app.py").write_text(APP)
            servers: Dict[str, int] = {}
            for name, on in (("gunicorn, bare", False), ("gunicorn + beacon", True)):
                proc, port = start_gunicorn(Path(tmp), on, drain.port)
                procs.append(proc)
                servers[name] = port
                load(port, 200, clients, 30)  # warm up
            workers = {name: worker_of(proc) for name, proc in zip(servers, procs)}
            rates: Dict[str, List[float]] = {name: [] for name in servers}
            p50s: Dict[str, List[float]] = {name: [] for name in servers}
            cpus: Dict[str, List[float]] = {name: [] for name in servers}
            for r in range(rounds):
                for name in (list(servers) if r % 2 == 0 else list(servers)[::-1]):
                    c0 = cpu_seconds(workers[name])
                    rate, p50, done = load(servers[name], total, clients, 60)
                    cpus[name].append((cpu_seconds(workers[name]) - c0) / max(done, 1) * 1e6)
                    rates[name].append(rate)
                    p50s[name].append(p50)
        finally:
            for proc in procs:
                stop(proc)
    print(f"\nThrough gunicorn (sync, 1 worker, beacon heard by the {receiver!r} receiver): {rounds} "
          f"rounds x {total} GETs from {clients} client threads on loopback, a new connection "
          "per request; medians over rounds")
    print(f"{'variant':<20} {'req/s':>8} {'p50 ms':>8} {'worker CPU us/req':>18}")
    for name in rates:
        print(f"{name:<20} {statistics.median(rates[name]):>8.0f} "
              f"{statistics.median(p50s[name]):>8.3f} {statistics.median(cpus[name]):>18.1f}")


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--requests", type=int, default=20000,
                   help="per variant per round: a turn ends with its flush")
    p.add_argument("--block", type=int, default=0,
                   help="requests a variant serves before the next variant's turn (0: all of the "
                        "round's; see in_process)")
    p.add_argument("--http", type=int, default=2000, help="GETs per gunicorn round (0: skip)")
    p.add_argument("--http-rounds", type=int, default=4)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--receiver", choices=sorted(RECEIVERS), default="flasktop",
                   help="what hears the beacon: flasktop's own listener (default), or a "
                        "receiver asleep in recv() that every datagram wakes (the worst case)")
    p.add_argument("--procs", type=int, default=1,
                   help="run the in-process part in this many fresh processes, one after "
                        "another, and summarise across them (see across_processes)")
    p.add_argument("--layout", choices=("random", "fixed"), default="random",
                   help="random (default): make the variants in a random order, each after "
                        "a random amount of padding, a fresh draw of the memory layout per "
                        "process; fixed: in the listed order, the same draw every time "
                        "(see layout_draw)")
    p.add_argument("--seed", type=int, default=None,
                   help="the random layout's seed (default: a new one, printed)")
    p.add_argument("--flush-interval", type=float, default=None,
                   help="the beacon's flush interval, seconds (default: the beacon's own)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flush_interval is not None:
        from flasktop.beacon import _reporter
        _reporter.FLUSH_INTERVAL = args.flush_interval
    if args.procs > 1:
        across_processes(args.procs, args)
    else:
        seed = None
        if args.layout == "random":
            seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
            print(f"(layout seed {seed})")
        figures = in_process(max(2, args.rounds), max(100, args.requests), max(0, args.block),
                             args.receiver, seed)
        if args.json:
            print(JSON_MARK + json.dumps(figures), flush=True)
    if args.http > 0:
        through_gunicorn(min(args.http, 20000), max(1, args.http_rounds), max(1, args.clients),
                         args.receiver)


if __name__ == "__main__":
    main()
