"""Issue 5, scenario 8: hostile datagrams against a running Engine attached to a real gunicorn.

The app's real beacon sends real traffic while this test sends, over real UDP to the same
port, every kind of bad datagram the decoder knows (random bytes, truncated, oversized,
deeply nested, huge numbers, NaN/Infinity, wrong versions, bad strings, tables and events)
and valid datagrams that claim pids which are not the master's workers.

What this proves, exactly and not "about": each bad datagram is counted once under its
documented reason (``Snapshot.beacon.rejected`` equals the test's own tally); every request
the test made is counted (route counts equal the requests); forged pids create no worker and
no route and are counted as ``beacon.ignored``; received = accepted + rejected; the listener
thread is alive and the engine still snapshots afterwards.
"""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import threading
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from flasktop.engine import Engine
from flasktop.model.snapshot import Snapshot
from flasktop.protocol import Encoder
from flasktop.report import render
from tests.support import Gunicorn, free_port, gunicorn, wait_until

ROOT = Path(__file__).resolve().parents[2]
T_MS = 1_732_190_000_123
REQUESTS = 40


def _good(pid: int, route: str = "/x") -> bytes:
    """A valid, ASCII-only requests datagram to cut and bend."""
    return Encoder(pid).requests(T_MS, [[route, "x", "GET", 200, 1000, 10, "", 5, 1],
                                        [route, "x", "GET", 500, 2000, 10, "ValueError", 6, 1]])[0]


def _bend(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data, (old, data)
    return data.replace(old, new, 1)


def hostile_datagrams(worker: int, seed: int = 5) -> List[Tuple[bytes, str]]:
    """(datagram, the reason docs/protocol.md says it is rejected for). Some name a real worker:
    a rejected datagram's pid is not trusted, so they must not touch it either."""
    rng = random.Random(seed)
    good = _good(worker)
    out: List[Tuple[bytes, str]] = []
    # random bytes: any first byte but '{' is not JSON; '{' then an 0xff byte is not UTF-8
    for _ in range(30):
        first = rng.choice([b for b in range(256) if b != 0x7B])
        out.append((bytes([first]) + rng.randbytes(rng.randint(0, 1399)), "not_json"))
    for _ in range(15):
        body = bytearray(rng.randbytes(rng.randint(1, 1398)))
        body.insert(rng.randint(0, len(body)), 0xFF)
        out.append((b"{" + bytes(body), "bad_utf8"))
    out.append((b"", "not_json"))
    out.append((b"\xef\xbb\xbf" + good, "not_json"))  # a BOM first
    out.append((b"[1,2,3]", "not_json"))
    # truncated: every proper prefix of a JSON object is a syntax error
    for cut in sorted(rng.sample(range(1, len(good)), 15)):
        out.append((good[:cut], "not_json"))
    # oversized: rejected on the length read with MSG_TRUNC, before any parsing
    out.append((b"{" + b" " * 1400, "oversized"))
    out.append((good + b" " * (1401 - len(good)), "oversized"))
    out.append((rng.randbytes(9000), "oversized"))
    out.append((b"{" + b"[" * 65506, "oversized"))  # the largest UDP payload over IPv4
    # deeply nested
    out.append((b'{"v":1,"x":' + b"[" * 1380, "too_deep"))
    out.append((b'{"v":1,"x":' + b"{\"a\":" * 277, "not_json"))  # depth 277, cut short
    out.append((b'{"v":1,"x":' + b"[" * 600 + b"]" * 600 + b"}", "bad_pid"))  # parsed: no pid
    # huge numbers
    out.append((_bend(good, b'"pid":%d' % worker, b'"pid":' + b"9" * 1250), "bad_pid"))
    out.append((_bend(good, b'"seq":1', b'"seq":-' + b"9" * 1200), "bad_seq"))
    out.append((b'{"v":' + b"9" * 1350 + b"}", "bad_version"))
    out.append((_bend(good, b'"t":%d' % T_MS, b'"t":' + b"9" * 40), "bad_time"))
    out.append((_bend(good, b",1000,", b",%d," % 10 ** 30), "bad_field"))
    out.append((_bend(good, b",200,", b",1000,"), "bad_field"))  # status 1000
    out.append((_bend(good, b",5,1]", b",0,1]"), "bad_field"))  # thread id 0
    out.append((_bend(good, b'"pid":%d' % worker, b'"pid":0'), "bad_pid"))
    out.append((_bend(good, b'"pid":%d' % worker, b'"pid":%d' % ((1 << 22) + 1)), "bad_pid"))
    # NaN, Infinity, floats
    for token in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"1000.5", b"1E3"):
        out.append((_bend(good, b",1000,", b"," + token + b","), "bad_number"))
    out.append((_bend(good, b'"seq":1', b'"seq":NaN'), "bad_number"))
    # wrong versions
    for v in (b"2", b"0", b"-1", b"true", b'"1"', b"null", b"1.0"):
        out.append((_bend(good, b'"v":1', b'"v":' + v), "bad_number" if v == b"1.0" else "bad_version"))
    out.append((_bend(good, b'"v":1,', b""), "bad_version"))
    out.append((good[:-1] + b',"v":2}', "bad_version"))  # a duplicate key: the last one wins
    # strings, tables, events, kinds
    out.append((_bend(good, b'"/x"', b'"/x\\u001b[2J"'), "bad_strings"))  # ESC in a label
    out.append((_bend(good, b'"/x"', b'"/x\\u009b31m"'), "bad_strings"))  # C1 CSI
    out.append((_bend(good, b'"/x"', b'"/x\\ud800"'), "bad_strings"))  # lone surrogate
    out.append((_bend(good, b'"/x"', b'"/' + b"y" * 200 + b'"'), "bad_strings"))  # 201 chars
    out.append((_bend(good, b'"s":[', b'"s":[' + b'"a",' * 257), "bad_strings"))
    out.append((_bend(good, b'"s":[', b'"s":[1,'), "bad_strings"))
    out.append((_bend(good, b'"e":[', b'"e":[' + b"[]," * 257), "bad_events"))
    out.append((_bend(good, b'"e":[[0,1,2,', b'"e":[[0,1,'), "bad_event"))
    out.append((_bend(good, b'"e":[[0,1,2,', b'"e":[[0,1,99,'), "bad_index"))
    out.append((_bend(good, b'"k":"r"', b'"k":"z"'), "bad_kind"))
    out.append((_bend(good, b'"k":"r"', b'"k":"f"'), "bad_field"))  # in-flight without n and x
    return out


def forged_datagrams(pids: List[int]) -> List[bytes]:
    """Valid datagrams (requests and in-flight) claiming pids that are not this master's workers."""
    out: List[bytes] = []
    for pid in pids:
        enc = Encoder(pid)
        out += enc.requests(T_MS, [[f"/forged/{pid}/{i}", "forged", "GET", 200, 7 * 24 * 3600 * 10 ** 6,
                                    1 << 53, "", 1 << 32, 0] for i in range(30)])
        out += enc.inflight(T_MS, [["/forged-inflight", "f", "POST", 9, 10 ** 9]], total=1 << 53,
                            dropped=0, send_errors=0)
    return out


@pytest.fixture
def engine_for() -> Iterator:
    made: List[Engine] = []

    def make(g: Gunicorn, udp: int, **kw: object) -> Engine:
        e = Engine(g.pid, beacon=("127.0.0.1", udp), refresh=0.5, sample_interval=1.0, **kw)
        made.append(e)
        e.open()
        return e
    yield make
    for e in made:
        e.stop()


def _until(engine: Engine, cond, timeout: float = 20.0, message: str = "") -> Snapshot:
    box: List[Snapshot] = []

    def check() -> bool:
        engine.collect()
        box[:] = [engine.take_snapshot()]
        return bool(cond(box[0]))
    wait_until(check, timeout=timeout, interval=0.1, message=message)
    return box[0]


def _count(snap: Snapshot, route: str) -> int:
    return sum(r.count for r in snap.routes if r.route == route)


def test_hostile_datagrams_are_counted_by_reason_and_poison_nothing(tmp_path, engine_for):
    udp = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "PYTHONPATH": str(ROOT),
           "TROUBLE_RELEASE": str(tmp_path / "release")}
    with gunicorn("trouble_app:app", "-w", "2", env=env, workers_expected=2) as g:
        engine = engine_for(g, udp, pyspy=False)
        workers = set(g.worker_pids())
        _until(engine, lambda s: {w.pid for w in s.workers} == workers, message="the two workers")
        hostile = [(d, r) for w in sorted(workers) for d, r in hostile_datagrams(w, seed=w)]
        forged = forged_datagrams([os.getpid(), g.pid, 1, 1 << 22])
        expected = collections.Counter(r for _, r in hostile)
        payloads = [d for d, _ in hostile] + forged
        random.Random(7).shuffle(payloads)

        # Interleave: one thread sends the hostile and forged datagrams, two make real requests.
        errors: List[BaseException] = []

        def send() -> None:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for i, d in enumerate(payloads):
                        s.sendto(d, ("127.0.0.1", udp))
                        if i % 10 == 0:
                            threading.Event().wait(0.002)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        def requests(offset: int) -> None:
            try:
                for i in range(REQUESTS // 2):
                    assert g.get(f"/fast/{offset + i}").status == 200
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=send)] + [threading.Thread(target=requests, args=(k * 100,))
                                                     for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and not any(t.is_alive() for t in threads), errors

        snap = _until(engine, lambda s: _count(s, "/fast/<int:n>") >= REQUESTS
                      and sum(n for _, n in s.beacon.rejected) >= len(hostile)
                      and s.beacon.ignored >= len(forged),
                      message="every request, reject and forged datagram counted")
        b = snap.beacon
        assert dict(b.rejected) == dict(expected)
        assert b.received == b.accepted + sum(n for _, n in b.rejected)
        assert b.ignored == len(forged)
        assert not b.kernel_drops
        # valid traffic interleaved with all of it: every request counted, nothing invented
        assert _count(snap, "/fast/<int:n>") == REQUESTS
        assert {r.route for r in snap.routes} == {"/fast/<int:n>"}
        assert {w.pid for w in snap.workers} == workers
        assert all(w.requests_served <= REQUESTS for w in snap.workers)
        assert sum(w.requests_served for w in snap.workers) == REQUESTS
        assert snap.routes_dropped == 0
        # still answering: the listener thread is alive, a new request is counted
        assert engine.listener is not None and engine.listener.running
        assert g.get("/fast/999").status == 200
        snap = _until(engine, lambda s: _count(s, "/fast/<int:n>") == REQUESTS + 1,
                      message="a request after the attack")
        assert snap.source("beacon").state == "ok"
        assert "not this master's workers" in snap.source("beacon").detail

        # the report says the same, one line, readable
        text = render(snap)
        assert "\x1b" not in text
        beacon_line = next(ln for ln in text.splitlines() if ln.startswith("beacon "))
        assert f"{sum(expected.values())} rejected (" in beacon_line
        for reason, n in expected.items():
            assert f"{reason} {n}" in beacon_line
        assert f"{len(forged)} from pids that are not workers" in beacon_line
        json.loads(snap.to_json())


def test_datagrams_before_the_first_topology_reading_are_not_trusted(tmp_path, engine_for):
    """Anyone on the box can send to the port from the moment flasktop binds it. Until the
    poller's first reading says which pids are workers, nothing decides whether a datagram's
    pid is one: forged datagrams must not become routes then either, and the real workers'
    datagrams received meanwhile must not be lost. The poller's first reading is held back
    (a slow /proc on a loaded box) so that the order is certain."""
    udp = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "PYTHONPATH": str(ROOT),
           "TROUBLE_RELEASE": str(tmp_path / "release")}
    with gunicorn("trouble_app:app", "-w", "1", env=env, workers_expected=1) as g:
        engine = Engine(g.pid, beacon=("127.0.0.1", udp), refresh=0.5, pyspy=False)
        poller_start = engine.poller.start
        engine.poller.start = lambda: None  # type: ignore[method-assign]
        try:
            engine.open()
            forged = forged_datagrams([os.getpid(), g.pid])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for d in forged:
                    s.sendto(d, ("127.0.0.1", udp))
            for i in range(5):
                assert g.get(f"/fast/{i}").status == 200
            assert engine.listener is not None
            wait_until(lambda: engine.listener.stats().accepted >= len(forged) + 1, timeout=10,
                       message="the forged and the real datagrams received")
            engine.collect()
            before = engine.take_snapshot()
            assert not [r.route for r in before.routes if r.route.startswith("/forged")]
            assert not {w.pid for w in before.workers} - set(g.worker_pids())
            poller_start()
            snap = _until(engine, lambda s: _count(s, "/fast/<int:n>") >= 5
                          and s.beacon.ignored >= len(forged),
                          message="the real requests counted and the forged ones ignored")
            assert {r.route for r in snap.routes} == {"/fast/<int:n>"}
            assert _count(snap, "/fast/<int:n>") == 5
            assert {w.pid for w in snap.workers} == set(g.worker_pids())
            assert snap.beacon.ignored == len(forged)
        finally:
            engine.stop()
