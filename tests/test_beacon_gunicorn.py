"""The beacon under a real gunicorn: sync, gthread and gevent workers, --preload, the
config hook, and "off". Real UDP on 127.0.0.1, a plain socket and protocol.decode()."""

from __future__ import annotations

import collections
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import psutil
import pytest

from flasktop.protocol import GunicornSettings
from tests.fixtures.beacon_receiver import Receiver
from tests.support import Gunicorn, free_port, gunicorn, in_background, wait_until

HOOK = "python:flasktop.beacon.gunicorn_conf"


def whoami_all(g: Gunicorn, n: int, clients: int) -> List[Tuple[int, int, int]]:
    """``n`` concurrent GETs of /whoami/<i>; (pid, tid, body length) as each worker answered."""
    def one(i: int) -> Tuple[int, int, int]:
        r = g.get(f"/whoami/{i}", timeout=30)
        assert r.status == 200
        doc = json.loads(r.body)
        return doc["pid"], doc["tid"], len(r.body)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(one, range(n)))


def settled(rx: Receiver, pids: List[int]) -> bool:
    """Each pid has sent an in-flight report after its last requests datagram, and had
    nothing in flight then: UDP on loopback keeps a socket's order, so all is in."""
    for pid in pids:
        mine = [d for d in rx.datagrams() if d.pid == pid]
        last_r = max((d.seq for d in mine if d.kind == "r"), default=0)
        if not any(d.kind == "f" and d.seq > last_r and d.inflight_total == 0 for d in mine):
            return False
    return True


def check_each_request_reported_once(g: Gunicorn, rx: Receiver, n: int, clients: int) -> None:
    answers = whoami_all(g, n, clients)
    served_by = sorted({pid for pid, _, _ in answers})
    assert set(served_by) <= set(g.worker_pids())
    rx.wait_requests("/whoami/<int:n>", n, timeout=15)
    rx.wait(lambda r: settled(r, served_by), timeout=10, message="every worker's later report")
    got = rx.requests("/whoami/<int:n>")
    assert len(got) == n  # exactly one event per request
    assert collections.Counter((pid, r.tid, r.size) for pid, r in got) == collections.Counter(answers)
    for pid, r in got:
        assert (r.status, r.endpoint, r.method, r.exc) == (200, "whoami", "GET", "")
        assert Path(f"/proc/{pid}/task/{r.tid}").exists()
    assert rx.rejects() == []


def test_sync_workers_with_preload_and_the_hook_in_your_own_config(tmp_path: Path) -> None:
    # The app already has Beacon(app); the hook, imported into a config of your own,
    # sees that and does not wrap it twice: still exactly one event per request.
    conf = tmp_path / "my_conf.py"
    conf.write_text("from flasktop.beacon.gunicorn_conf import post_worker_init\n"
                    "workers = 2\npreload_app = True\n")
    with Receiver() as rx, gunicorn("beacon_app:app", "-c", str(conf), workers_expected=2,
                                    env={"FLASKTOP_BEACON": rx.address}) as g:
        check_each_request_reported_once(g, rx, n=24, clients=4)
        assert {d.pid for d in rx.datagrams()} <= set(g.worker_pids())  # never the master


def test_gthread_workers_with_preload_streaming_and_in_flight(tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{port}", "BEACON_HOLD_DIR": str(tmp_path)}
    with gunicorn("beacon_app:app", "-k", "gthread", "--threads", "4", "-w", "2", "--preload",
                  workers_expected=2, env=env) as g:
        assert g.get("/").status == 200  # a flusher runs, and finds nobody listening
        t_start = time.time()
        held = in_background(lambda: g.get("/hold/gthread-token", timeout=30))
        try:
            with Receiver(port) as rx:
                def held_flight(r: Receiver) -> list:
                    return [(d, f) for d, f in r.inflight() if f.route == "/hold/<token>"]
                (d, flight), = rx.wait(held_flight, timeout=8, message="the held request in flight")[:1]
                assert abs(flight.start - t_start) < 0.5
                assert d.pid in g.worker_pids() and Path(f"/proc/{d.pid}/task/{flight.tid}").exists()
                assert flight.tid != d.pid  # a pool thread, not the worker's main thread
                (tmp_path / "gthread-token").touch()
                held.join(timeout=15)
                [(pid, done)] = rx.wait_requests("/hold/<token>", 1)
                assert pid == d.pid and done.tid == flight.tid and done.status == 200

                r = g.get("/stream/3")
                assert r.body == b"chunk 0\nchunk 1\nchunk 2\n"
                [(_, stream)] = rx.wait_requests("/stream/<int:chunks>", 1)
                assert stream.duration_s >= 0.3 and stream.size == len(r.body)

                check_each_request_reported_once(g, rx, n=32, clients=8)
                # read in the master while it preloaded the app, kept across fork
                assert {d.gunicorn for d in rx.datagrams() if d.kind == "f"} == {
                    GunicornSettings(30.0, 2, 4, 0, "gthread")}
        finally:
            (tmp_path / "gthread-token").touch()
            held.join(timeout=15)


def test_gevent_worker_keys_in_flight_requests_by_request(tmp_path: Path) -> None:
    pytest.importorskip("gevent")
    env = {"BEACON_HOLD_DIR": str(tmp_path)}
    with Receiver() as rx:
        env["FLASKTOP_BEACON"] = rx.address
        with gunicorn("beacon_app:app", "-k", "gevent", "-w", "1", workers_expected=1, env=env) as g:
            [worker] = g.worker_pids()
            holders = [in_background(lambda t=t: g.get(f"/hold/gevent-{t}", timeout=30))
                       for t in range(2)]
            try:
                def both(r: Receiver) -> list:
                    flights = [f for _, f in r.inflight() if f.route == "/hold/<token>"]
                    return flights if len(flights) >= 2 else []
                flights = rx.wait(both, timeout=8, message="both held requests in one report")
                assert len({f.tid for f in flights}) == 1  # greenlets share the native thread
                assert Path(f"/proc/{worker}/task/{flights[0].tid}").exists()
                answers = whoami_all(g, 12, 4)  # served while the two are held
                assert {(p, t) for p, t, _ in answers} == {(worker, flights[0].tid)}
            finally:
                for t in range(2):
                    (tmp_path / f"gevent-{t}").touch()
                for h in holders:
                    h.join(timeout=15)
            rx.wait_requests("/hold/<token>", 2)
            got = rx.wait_requests("/whoami/<int:n>", 12)
            assert len(got) == 12 and {r.status for _, r in got} == {200}
            assert {d.gunicorn for d in rx.datagrams() if d.kind == "f"} == {
                GunicornSettings(30.0, 1, 1, 0, "gevent")}


def test_a_worker_sends_its_heartbeat_and_settings_from_boot() -> None:
    """Beacon(app), loaded in each worker: the heartbeat starts with the worker, so a
    flasktop attached to an idle app hears every worker and gunicorn's settings at once."""
    with Receiver() as rx, gunicorn("beacon_app:app", "-w", "2", "-t", "9", workers_expected=2,
                                    env={"FLASKTOP_BEACON": rx.address}) as g:
        workers = set(g.worker_pids())
        rx.wait(lambda r: {d.pid for d in r.datagrams() if d.kind == "f"} >= workers,
                message="a heartbeat from each worker, before any request")
        beats = rx.datagrams()
        assert {d.kind for d in beats} == {"f"} and {d.pid for d in beats} == workers
        assert {d.gunicorn for d in beats} == {GunicornSettings(9.0, 2, 1, 0, "sync")}


def test_the_gunicorn_hook_instruments_an_uninstrumented_app() -> None:
    with Receiver() as rx, gunicorn("beacon_plain:app", "-c", HOOK, "-w", "1", "-t", "17",
                                    "--max-requests", "900", workers_expected=1,
                                    env={"FLASKTOP_BEACON": rx.address}) as g:
        [worker] = g.worker_pids()
        # the hook starts the heartbeat before any request, with gunicorn's settings
        [beat] = rx.wait(lambda r: [d for d in r.datagrams() if d.pid == worker and d.kind == "f"],
                         message="a heartbeat from the worker")[:1]
        assert beat.gunicorn == GunicornSettings(17.0, 1, 1, 900, "sync")
        assert g.get("/orders/7").status == 200
        assert g.get("/boom").status == 500
        [(pid, order)] = rx.wait_requests("/orders/<int:oid>", 1)
        [(_, boom)] = rx.wait_requests("/boom", 1)
        assert pid == worker and order.endpoint == "order"
        assert (boom.status, boom.exc) == (500, "PaymentDeclined")


def _udp_sockets(pids: List[int]) -> List[object]:
    out: List[object] = []
    for pid in pids:
        out += psutil.Process(pid).net_connections(kind="udp")
    return out


def test_off_sends_nothing_not_even_with_the_hook() -> None:
    env = {"FLASKTOP_BEACON": "off"}
    with gunicorn("beacon_app:app", "-c", HOOK, "-w", "1", workers_expected=1, env=env) as g:
        for i in range(4):
            assert g.get(f"/orders/{i}").status == 200
        assert _udp_sockets(g.worker_pids()) == []
        assert g.get("/whoami/1").status == 200
        assert _udp_sockets(g.worker_pids()) == []


def _comparable(r: object) -> Tuple[int, bytes, Dict[str, str]]:
    headers = {k: v for k, v in r.headers.items() if k.lower() != "date"}  # type: ignore[attr-defined]
    return r.status, r.body, headers  # type: ignore[attr-defined]


def test_responses_are_byte_for_byte_the_same_with_the_beacon_and_nobody_listening() -> None:
    paths = ["/", "/orders/41", "/nope?x=1", "/boom", "/teapot", "/fork", "/stream/1", "/echo?q=z"]
    nobody = f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    plain = Gunicorn("beacon_plain:app", "-w", "1", "--preload")
    beacon = Gunicorn("beacon_app:app", "-w", "1", "--preload", env={"FLASKTOP_BEACON": nobody})
    try:
        starting = [in_background(lambda g=g: g.start(workers_expected=1)) for g in (plain, beacon)]
        for t in starting:
            t.join(timeout=60)
        wait_until(lambda: plain.worker_pids() and beacon.worker_pids(), message="both serving")
        expected = [_comparable(plain.get(p)) for p in paths]
        for _ in range(2):
            assert [_comparable(beacon.get(p)) for p in paths] == expected
        # the beacon was there all along: its flusher opened its one socket
        wait_until(lambda: len(_udp_sockets(beacon.worker_pids())) == 1, timeout=10,
                   message="the beacon's socket in the worker")
    finally:
        plain.stop()
        beacon.stop()


def test_a_request_killed_by_the_timeout_keeps_its_route(tmp_path: Path) -> None:
    """gunicorn's SIGABRT ends the view with SystemExit, before start_response and after
    Flask forgot the request: the route must still be the template, not <unmatched>."""
    release = tmp_path / "release"
    with Receiver() as rx:
        env = {"FLASKTOP_BEACON": rx.address, "TROUBLE_RELEASE": str(release),
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        with gunicorn("trouble_app:app", "-w", "1", "--timeout", "3", env=env,
                      workers_expected=1) as g:
            in_background(lambda: _get_quietly(g, "/hang"))
            killed = rx.wait(lambda r: [q for _, q in r.requests() if q.exc == "SystemExit"],
                             timeout=20)
            assert [q.route for q in killed] == ["/hang"]
            assert killed[0].duration_s >= 2.5


def _get_quietly(g: Gunicorn, path: str) -> None:
    try:
        g.get(path, timeout=30)
    except OSError:
        pass  # the worker is killed under the request


def test_a_stream_the_client_abandons_ends_once_and_leaves_nothing_in_flight() -> None:
    """A thread-heavy gthread worker; the client reads the first chunk of a 2 s stream and
    hangs up. The request must be reported once, as ended, and leave no in-flight entry."""
    with Receiver() as rx, gunicorn("beacon_app:app", "-k", "gthread", "--threads", "64",
                                    "-w", "1", workers_expected=1,
                                    env={"FLASKTOP_BEACON": rx.address}) as g:
        assert g.get("/").status == 200
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.sendall(b"GET /stream/20 HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until(lambda: b"chunk 0" in s.recv(4096), timeout=10, message="the first chunk")
        # gunicorn finds the client gone at its next write and closes the response
        [(pid, done)] = rx.wait_requests("/stream/<int:chunks>", 1, timeout=15)
        assert pid == g.worker_pids()[0] and done.duration_s < 2.0  # ended early, not at 2 s
        rx.wait(lambda r: [d for d in r.datagrams() if d.kind == "f" and d.pid == pid
                           and d.t > done.end + 0.5 and d.inflight_total == 0],
                timeout=10, message="an in-flight report with nothing left running")
        assert g.get("/").status == 200
