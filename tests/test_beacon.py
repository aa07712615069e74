"""The beacon in-process: a real Flask app called as WSGI, real UDP on 127.0.0.1.

Gunicorn (sync, gthread, gevent, --preload, the config hook) is in test_beacon_gunicorn.py.
"""

from __future__ import annotations

import contextvars
import json
import struct
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from flask import Flask
from werkzeug.test import EnvironBuilder

from flasktop import protocol
from flasktop.beacon import DEFAULT_ADDRESS, DEFAULT_PORT, Beacon, BeaconMiddleware, instrument
from flasktop.beacon import _address, _reporter
from tests.fixtures.beacon_receiver import Receiver
from tests.support import FIXTURES, free_port, wait_until

sys.path.insert(0, str(FIXTURES))
from beacon_plain import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def call(app: Any, path: str = "/", method: str = "GET", query: str = "",
         data: bytes = b"", extra: Optional[Dict[str, Any]] = None) -> Tuple[str, list, bytes]:
    """One request through ``app`` as a WSGI server would: iterate, then close."""
    environ = EnvironBuilder(path=path, method=method, query_string=query, data=data).get_environ()
    environ.update(extra or {})
    seen: Dict[str, Any] = {}

    def start_response(status: str, headers: list, exc_info: Any = None) -> None:
        seen["status"], seen["headers"] = status, headers

    it = app(environ, start_response)
    try:
        body = b"".join(it)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return seen.get("status", ""), seen.get("headers", []), body


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@pytest.fixture
def rx() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture(autouse=True)
def _no_env_beacon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLASKTOP_BEACON", raising=False)


def settled_once(rx: Receiver) -> bool:
    """An empty in-flight report came after the last requests datagram: all is in."""
    ds = rx.datagrams()
    last_r = max((d.seq for d in ds if d.kind == "r"), default=0)
    return any(d.kind == "f" and d.seq > last_r and d.inflight_total == 0 for d in ds)


def beacon_app(address: str) -> Tuple[Flask, Beacon]:
    app = create_app()
    return app, Beacon(app, address=address)


# ---------------------------------------------------------------------------
# What a request reports


def test_flask_request_reports_template_endpoint_status_size_and_thread(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)
    status, headers, body = call(app, "/orders/12", query="secret=1")
    assert status.startswith("200")
    [(pid, req)] = rx.wait_requests("/orders/<int:oid>", 1)
    assert (pid, req.endpoint, req.method, req.status, req.exc) == (os.getpid(), "order", "GET", 200, "")
    assert req.size == len(body) == int(dict(headers)["Content-Length"])
    assert req.tid == threading.get_native_id()
    assert 0 <= req.duration_s < 5 and abs(req.end - time.time()) < 5
    # A Flask app gets the fast path: hooks in calls Flask makes anyway, no middleware.
    assert beacon.enabled and beacon.hook is not None and beacon.middleware is None
    assert not isinstance(app.wsgi_app, BeaconMiddleware)


def test_app_factory_init_app_reads_the_app_config(rx: Receiver) -> None:
    beacon = Beacon()
    app = create_app()
    app.config["FLASKTOP_BEACON"] = rx.address
    beacon.init_app(app)
    call(app, "/")
    [(_, req)] = rx.wait_requests("/", 1)
    assert (req.endpoint, req.status) == ("index", 200)
    assert app.extensions["flasktop_beacon"] is beacon
    hooked = (app.request_context, app.response_class, app.should_ignore_error)
    Beacon(app)  # a second beacon does not hook twice
    assert (app.request_context, app.response_class, app.should_ignore_error) == hooked
    from werkzeug.middleware.proxy_fix import ProxyFix

    app.wsgi_app = ProxyFix(app.wsgi_app)  # ... nor when another middleware is around it
    Beacon(app)
    assert instrument(app) is app and isinstance(app.wsgi_app, ProxyFix)
    call(app, "/")
    rx.wait_requests("/", 2)
    rx.wait(settled_once, message="a report after the second request")
    assert len(rx.requests("/")) == 2  # not 3


def test_any_wsgi_app_with_the_middleware_and_its_route_hook(rx: Receiver) -> None:
    def plain(environ: dict, start_response: Any) -> List[bytes]:
        if environ["PATH_INFO"].startswith("/named/"):
            environ["flasktop.route"] = "/named/<id>"
            environ["flasktop.endpoint"] = "named"
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"made", b" it"]

    app = BeaconMiddleware(plain, address=rx.address)
    assert call(app, "/named/42")[2] == b"made it"
    call(app, "/other/7")
    [(_, named)] = rx.wait_requests("/named/<id>", 1)
    [(_, other)] = rx.wait_requests(protocol.UNMATCHED, 1)
    assert (named.endpoint, named.status, named.size) == ("named", 201, 7)
    assert other.status == 201 and "other" not in repr(rx.raw)


def test_404_405_and_redirect_never_reveal_path_or_query(rx: Receiver) -> None:
    app, _ = beacon_app(rx.address)
    assert call(app, "/no-such-place-81413", query="token=hunter2")[0].startswith("404")
    assert call(app, "/orders/5", method="DELETE")[0].startswith("405")
    call(app, "/orders/not-a-number-55109")
    got = rx.wait_requests(protocol.UNMATCHED, 3)
    assert sorted(r.status for _, r in got) == [404, 404, 405]
    wait_until(lambda: any(d.kind == "f" for d in rx.datagrams()), message="an in-flight report")
    raw = b"".join(rx.raw)
    for secret in (b"no-such-place", b"81413", b"hunter2", b"token", b"not-a-number", b"55109"):
        assert secret not in raw


def test_exception_type_on_500_and_when_it_propagates(rx: Receiver) -> None:
    app, _ = beacon_app(rx.address)
    logging.getLogger(app.name).disabled = True
    assert call(app, "/boom")[0].startswith("500")
    [(_, handled)] = rx.wait_requests("/boom", 1)
    assert (handled.status, handled.exc, handled.endpoint) == (500, "PaymentDeclined", "boom")
    assert call(app, "/teapot")[0].startswith("418")
    [(_, teapot)] = rx.wait_requests("/teapot", 1)
    assert (teapot.status, teapot.exc) == (418, "")  # an HTTP error is not an exception

    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(Exception) as raised:
        call(app, "/boom")
    assert type(raised.value).__name__ == "PaymentDeclined"
    got = rx.wait_requests("/boom", 2)
    escaped = [r for _, r in got if r.status == 0]
    assert len(escaped) == 1 and escaped[0].exc == "PaymentDeclined" and escaped[0].size == -1


def test_the_app_gets_one_attribute_and_errors_are_watched_on_its_class(rx: Receiver) -> None:
    """More attributes on the app cost Flask (see _Contexts): request_context is hooked on
    the app's class; the error hook lives on the class that defines should_ignore_error,
    wraps it once, and still calls what it wraps."""
    plain = type("Flask", (Flask,), {})("plain")
    before = set(vars(plain))
    Beacon(plain, address=rx.address)
    assert set(vars(plain)) - before == {"response_class"}

    class Strict(Flask):
        ignored: List[str] = []

        def should_ignore_error(self, error: Optional[BaseException]) -> bool:  # no super()
            self.ignored.append(type(error).__name__)
            return False

    app = Strict("strict")

    class Boom(Exception):
        pass

    @app.route("/raise/<int:n>")
    def raise_(n: int) -> str:
        raise Boom(n)

    logging.getLogger(app.name).disabled = True
    Beacon(app, address=rx.address)
    Beacon(create_app(), address=rx.address)  # another app of another class
    hook = Strict.should_ignore_error
    Beacon(Strict("again"), address=rx.address)
    assert Strict.should_ignore_error is hook  # wrapped once per class
    assert call(app, "/raise/7")[0].startswith("500")
    [(_, req)] = rx.wait_requests("/raise/<int:n>", 1)
    assert (req.status, req.exc) == (500, "Boom")
    assert Strict.ignored == ["Boom"]  # the app's own should_ignore_error still ran


def test_apps_of_one_class_each_report_to_their_own_beacon(rx: Receiver) -> None:
    """request_context is hooked on the class: the class's last hooked app takes the fast
    path, its other apps (with a beacon of their own, or none) go through the registry."""
    from flask import request

    with Receiver() as other_rx:
        cls = type("Flask", (Flask,), {})
        apps = {}
        for name in ("first", "second", "bare"):
            app = apps[name] = cls(name)
            app.add_url_rule(f"/{name}/<int:n>", name, lambda n, name=name: f"{name} {n}")
        Beacon(apps["first"], address=rx.address)
        Beacon(apps["second"], address=other_rx.address)
        sub = type("Sub", (cls,), {})("sub")  # a subclass hooked too: the base's hook is skipped
        sub.add_url_rule("/sub/<int:n>", "sub", lambda n: f"sub {n}")
        Beacon(sub, address=rx.address)
        for name, app in list(apps.items()) + [("sub", sub)]:
            for n in range(3):
                assert call(app, f"/{name}/{n}")[2] == f"{name} {n}".encode()
        assert len(rx.wait_requests("/first/<int:n>", 3)) == 3
        assert len(rx.wait_requests("/sub/<int:n>", 3)) == 3
        assert len(other_rx.wait_requests("/second/<int:n>", 3)) == 3
        rx.wait(settled_once, message="a report after the requests")
        other_rx.wait(settled_once, message="a report after the requests")
        assert not rx.requests("/bare/<int:n>") and not other_rx.requests("/bare/<int:n>")
        assert not rx.requests("/second/<int:n>") and not other_rx.requests("/first/<int:n>")
        assert cls.request_context is not Flask.request_context
        with apps["bare"].test_request_context("/bare/1"):  # the class's original still serves
            assert request.path == "/bare/1"


def test_an_app_of_a_hooked_class_is_freed_once_another_is_hooked(rx: Receiver) -> None:
    """A test suite's app factory makes an app per test: the class's hook must not keep
    them all alive."""
    import gc
    import weakref

    cls = type("Flask", (Flask,), {})
    first = cls("first")
    Beacon(first, address=rx.address)
    assert call(first, "/nothing")[0].startswith("404")
    gone = weakref.ref(first)
    Beacon(cls("second"), address=rx.address)
    del first
    gc.collect()
    assert gone() is None


def test_streaming_duration_counts_until_close_and_size_is_bytes_sent(rx: Receiver) -> None:
    app, _ = beacon_app(rx.address)
    environ = EnvironBuilder(path="/stream/2").get_environ()
    it = app(environ, lambda status, headers, exc_info=None: None)
    body = b"".join(it)  # the generator sleeps 0.1 s per chunk
    held = 0.3
    time.sleep(held)  # the server is still busy with the response: the request is not over
    t_close = time.time()
    it.close()
    [(_, req)] = rx.wait_requests("/stream/<int:chunks>", 1)
    assert req.duration_s >= 0.2 + held
    assert req.size == len(body) == len(b"chunk 0\nchunk 1\n")
    assert abs(req.end - t_close) < 0.05


def test_async_view(rx: Receiver) -> None:
    pytest.importorskip("asgiref", reason="Flask async views need flask[async] (asgiref)")
    app, _ = beacon_app(rx.address)
    assert call(app, "/async/3")[2] == b"async 3\n"
    [(_, req)] = rx.wait_requests("/async/<int:n>", 1)
    assert (req.status, req.endpoint, req.tid) == (200, "async_view", threading.get_native_id())


def test_file_wrapper_is_kept_for_sendfile_and_its_close_ends_the_request(rx: Receiver, tmp_path: Path) -> None:
    from flask import send_file

    class FileWrapper:  # what a server puts in environ["wsgi.file_wrapper"]
        def __init__(self, filelike: Any, blksize: int = 8192) -> None:
            self.filelike = filelike
            self.close = filelike.close

        def __iter__(self) -> Iterator[bytes]:
            return iter(lambda: self.filelike.read(8192), b"")

    (tmp_path / "data.bin").write_bytes(b"x" * 10000)
    app = Flask("files")

    @app.route("/files/<name>")
    def files(name: str) -> Any:
        return send_file(tmp_path / name)

    Beacon(app, address=rx.address)
    environ = EnvironBuilder(path="/files/data.bin").get_environ()
    environ["wsgi.file_wrapper"] = FileWrapper
    it = app(environ, lambda status, headers, exc_info=None: None)
    assert isinstance(it, FileWrapper)  # the server can still sendfile() it
    assert b"".join(it) == b"x" * 10000
    it.close()
    [(_, req)] = rx.wait_requests("/files/<name>", 1)
    assert (req.status, req.size) == (200, 10000)


# ---------------------------------------------------------------------------
# In flight


def test_a_request_running_before_anyone_listens_is_reported_in_flight_with_its_true_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_udp_port()
    monkeypatch.setenv("BEACON_HOLD_DIR", str(tmp_path))
    app, _ = beacon_app(f"127.0.0.1:{port}")
    call(app, "/")  # the flusher runs, finds nobody listening
    t_start = time.time()
    worker = threading.Thread(target=call, args=(app, "/hold/late-listener"), daemon=True)
    worker.start()
    try:
        with Receiver(port) as rx:
            def held(r: Receiver) -> list:
                return [f for _, f in r.inflight() if f.route == "/hold/<token>"]
            [flight] = rx.wait(held, timeout=5, message="the held request in an in-flight report")[:1]
            assert flight.endpoint == "hold" and flight.method == "GET"
            assert abs(flight.start - t_start) < 0.5
            assert flight.tid == worker.native_id
    finally:
        (tmp_path / "late-listener").touch()
        worker.join(timeout=15)
    assert not worker.is_alive()


def test_an_empty_in_flight_report_is_sent_too_it_is_the_heartbeat(rx: Receiver) -> None:
    app, _ = beacon_app(rx.address)
    call(app, "/")
    rx.wait(lambda r: [d for d in r.datagrams() if d.kind == "f"], timeout=5,
            message="an in-flight report")
    report = [d for d in rx.datagrams() if d.kind == "f"][-1]
    assert report.inflight == () and report.inflight_total == 0
    assert (report.dropped, report.send_errors, report.pid) == (0, 0, os.getpid())


# ---------------------------------------------------------------------------
# Where it sends


def test_precedence_explicit_then_config_then_env_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    with Receiver() as arg, Receiver() as conf, Receiver() as env:
        monkeypatch.setenv("FLASKTOP_BEACON", env.address)
        for expect, address, config in ((arg, arg.address, conf.address),
                                        (conf, None, conf.address),
                                        (env, None, None)):
            app = create_app()
            if config:
                app.config["FLASKTOP_BEACON"] = config
            Beacon(app, address=address)
            call(app, "/orders/1")
            expect.wait_requests("/orders/<int:oid>", 1)
        for r in (arg, conf, env):
            assert len(r.requests("/orders/<int:oid>")) == 1
    monkeypatch.delenv("FLASKTOP_BEACON")
    assert _address.choose(None, {}) == DEFAULT_ADDRESS == f"127.0.0.1:{DEFAULT_PORT}"
    assert _address.choose(("127.0.0.1", 5), {"FLASKTOP_BEACON": "x:1"}) == "127.0.0.1:5"
    assert _address.choose(None, {"FLASKTOP_BEACON": False}) == "off"


@pytest.mark.parametrize("where", ["env", "config", "argument"])
def test_off_does_not_wrap_and_sends_nothing(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app()
    original = app.wsgi_app
    if where == "env":
        monkeypatch.setenv("FLASKTOP_BEACON", "off")
    elif where == "config":
        app.config["FLASKTOP_BEACON"] = "OFF"
    beacon = Beacon(app, address="off" if where == "argument" else None)
    assert app.wsgi_app == original and not beacon.enabled
    assert call(app, "/orders/3")[0].startswith("200")
    middleware = BeaconMiddleware(original, address="off" if where != "config" else None,
                                  config=app.config)
    assert middleware.reporter is None and call(middleware, "/")[2] == b"hello\n"
    assert instrument(original, address="off") is original


def test_localhost_is_resolved_once_preferring_ipv4_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with Receiver() as rx:  # bound on 127.0.0.1 only: an IPv6 sender would never reach it
        text = f"localhost:{rx.port}"
        with caplog.at_level(logging.INFO, logger="flasktop.beacon"):
            app, beacon = beacon_app(text)
            Beacon(create_app(), address=text)
        assert beacon.reporter is not None
        assert beacon.reporter.sockaddr == ("127.0.0.1", rx.port)
        lines = [r.getMessage() for r in caplog.records if r.name == "flasktop.beacon"]
        assert len([m for m in lines if "127.0.0.1" in m]) == 1
        call(app, "/")
        rx.wait_requests("/", 1)


@pytest.mark.parametrize("address", ["no-such-host.invalid:9711", "nonsense", "127.0.0.1:99999",
                                     "::1:9711", "[::1]9711", ":"])
def test_a_bad_address_disables_the_beacon_with_one_log_line(address: str, caplog: pytest.LogCaptureFixture) -> None:
    _address.forget()
    with caplog.at_level(logging.INFO, logger="flasktop.beacon"):
        app, beacon = beacon_app(address)
        Beacon(create_app(), address=address)
    assert not beacon.enabled
    assert call(app, "/")[2] == b"hello\n"
    lines = [r for r in caplog.records if r.name == "flasktop.beacon"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert "\n" not in lines[0].getMessage() and lines[0].exc_info is None


def test_an_ipv6_address_sends_over_ipv6() -> None:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        sock.settimeout(5)
        app, _ = beacon_app(f"[::1]:{sock.getsockname()[1]}")
        call(app, "/orders/9")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            d = protocol.decode(sock.recv(65536))
            if isinstance(d, protocol.Datagram) and d.requests:
                assert d.requests[0].route == "/orders/<int:oid>"
                return
        raise AssertionError("no requests datagram over IPv6")


# ---------------------------------------------------------------------------
# Never disturbs the app


def _responses(app: Any) -> List[Tuple[str, list, bytes]]:
    logging.getLogger("beacon_fixture").disabled = True
    out = []
    for path, method, query, data in (("/", "GET", "", b""), ("/orders/41", "GET", "a=1", b""),
                                      ("/nope", "GET", "", b""), ("/boom", "GET", "", b""),
                                      ("/echo", "POST", "q=2", b"\x00\xffbody"),
                                      ("/orders/2", "HEAD", "", b""), ("/stream/1", "GET", "", b""),
                                      ("/fork", "GET", "", b"")):
        out.append(call(app, path, method=method, query=query, data=data))
    return out


@pytest.mark.parametrize("trouble", ["no listener", "full receive buffer", "receiver closed",
                                     "beacon socket closed"])
def test_the_app_answers_byte_for_byte_the_same_whatever_happens_to_the_udp(trouble: str) -> None:
    expected = _responses(create_app())
    port = free_udp_port()
    held: Optional[socket.socket] = None
    if trouble == "full receive buffer":  # bound, tiny buffer, never read
        held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        held.bind(("127.0.0.1", port))
    elif trouble == "receiver closed":
        rx = Receiver(port)
        rx.close()
    try:
        app, beacon = beacon_app(f"127.0.0.1:{port}")
        for _ in range(2):
            assert _responses(app) == expected
            beacon.flush()
            if trouble == "beacon socket closed":
                reporter = beacon.reporter
                if reporter.sock is not None:
                    reporter.sock.close()
        stats = beacon.stats()
        assert stats["reported"] + stats["unheard"] + stats["held"] >= 2 * len(expected)
        if trouble == "full receive buffer":
            assert stats["sent"] > 0 and stats["listening"] == 1
        if trouble in ("no listener", "receiver closed"):
            wait_until(lambda: beacon.flush() and beacon.stats()["listening"] == 0,
                       message="the beacon to notice nobody listens")
    finally:
        if held is not None:
            held.close()


class _Broken:
    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"broken beacon state: {name}")


def test_a_broken_beacon_degrades_to_pass_through(rx: Receiver) -> None:
    expected = _responses(create_app())
    app, beacon = beacon_app(rx.address)
    reporter = beacon.reporter
    assert beacon.hook is not None
    call(app, "/")  # this thread's lane exists
    lane = beacon.hook.tls.lane
    started, reporter.started = reporter.started, None  # type: ignore[assignment]
    try:
        assert _responses(app) == expected  # the slow path's queue is gone
        beacon.hook.tls.lane = _Broken()  # ... and the fast path's lane
        assert _responses(app) == expected
        assert _responses(app) == expected
        mw = BeaconMiddleware(create_app(), address=rx.address)
        assert _responses(mw) == expected  # the middleware without its queue
    finally:
        reporter.started = started
        beacon.hook.tls.lane = lane


def test_flusher_failures_are_logged_once_and_never_reach_the_app(rx: Receiver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    app, beacon = beacon_app(rx.address)
    reporter = beacon.reporter

    class Exploding(dict):
        def get(self, *a: Any) -> Any:
            raise RuntimeError("boom inside the flusher")

    monkeypatch.setattr(_reporter, "_first_failure_logged", False)
    with caplog.at_level(logging.WARNING, logger="flasktop.beacon"):
        with reporter.lock:
            reporter.codes = Exploding()
        for _ in range(3):
            assert call(app, "/orders/1")[0].startswith("200")
            assert beacon.flush() is False
        with reporter.lock:
            reporter.codes = {}
        call(app, "/orders/2")
        rx.wait_requests("/orders/<int:oid>", 1)
    logged = [r for r in caplog.records if r.name == "flasktop.beacon"]
    assert len(logged) == 1 and "flushing failed" in logged[0].getMessage()


def test_a_lane_is_bounded_and_what_it_drops_is_counted_in_the_report(rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    app, beacon = beacon_app(rx.address)
    reporter = beacon.reporter
    monkeypatch.setattr(_reporter, "LANE_CAP", 300)
    extra = 25
    with reporter.lock:  # the flusher is held up: the lane keeps growing meanwhile
        for _ in range(300 + extra):
            call(app, "/")
        assert reporter.stats()["queued"] == 300 + extra
    rx.wait(lambda r: any(d.kind == "f" and d.dropped == extra for d in r.datagrams()),
            message="an in-flight report with the drop count")
    rx.wait(lambda r: r.count("/") >= 300, message="300 requests to /")
    time.sleep(0.3)  # nothing more may come
    assert rx.count("/") == 300 and reporter.stats()["queued"] == 0


def test_threads_serving_while_the_flusher_drains_lose_no_request_and_count_none_twice(rx: Receiver) -> None:
    """Four threads append to their lanes while the flusher takes whole quads from the
    lanes' fronts on its own thread: every request arrives exactly once."""
    app, beacon = beacon_app(rx.address)
    reporter = beacon.reporter
    threads, per_thread = 4, 1500

    def serve() -> None:
        for i in range(per_thread):
            call(app, f"/orders/{i}")

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    total = threads * per_thread
    rx.wait(lambda r: r.count("/orders/<int:oid>") >= total, timeout=20,
            message=f"{total} requests to /orders/<int:oid>")
    rx.wait(settled_once, message="an empty in-flight report after the requests")
    assert rx.count("/orders/<int:oid>") == total
    assert beacon.stats()["aggregated"] > 0 and reporter.stats()["queued"] == 0
    rows = rx.aggregates()
    assert rows and all(a.route == "/orders/<int:oid>" and a.status == 200 for _, a in rows)
    assert len({a.tid for _, a in rows}) > 1  # each thread's lane is counted as its own


def test_a_context_copied_to_another_thread_does_not_lend_it_the_first_threads_lane(rx: Receiver) -> None:
    """A thread that runs a copy of a context in which another thread served a request
    (contextvars.copy_context(), as asyncio.to_thread does) must still report its requests
    as its own thread's: a lane is found per thread, never through the context."""
    app, beacon = beacon_app(rx.address)
    call(app, "/")  # this thread's lane, in this thread's context
    copied = contextvars.copy_context()
    tids: List[int] = []

    def serve() -> None:
        tids.append(threading.get_native_id())
        for _ in range(20):
            call(app, "/orders/1")

    t = threading.Thread(target=copied.run, args=(serve,))
    t.start()
    t.join()
    rx.wait(lambda r: r.count("/orders/<int:oid>") >= 20, message="20 requests from the other thread")
    rx.wait(settled_once, message="an empty in-flight report after the requests")
    assert rx.count("/orders/<int:oid>") == 20
    assert tids[0] != threading.get_native_id()
    assert _tids(rx, "/orders/<int:oid>") == {tids[0]}
    assert _tids(rx, "/") == {threading.get_native_id()}


def _tids(rx: Receiver, route: str) -> set:
    """The thread ids ``route``'s requests were reported with, one by one or aggregated."""
    return {e.tid for _, e in rx.requests(route)} | {a.tid for _, a in rx.aggregates(route)}


def test_the_queue_is_bounded_and_what_it_drops_is_counted_in_the_report(rx: Receiver) -> None:
    app = BeaconMiddleware(create_app(), address=rx.address)  # the slow path's queue
    reporter = app.reporter
    with reporter.lock:  # the flusher is stuck: nothing leaves the queue
        call(app, "/")
        extra = 25
        for _ in range(_reporter.QUEUE_CAP + extra - 1):
            call(app, "/")
        assert len(reporter.started) == _reporter.QUEUE_CAP
        assert reporter.dropped == extra
    rx.wait(lambda r: any(d.kind == "f" and d.dropped == extra for d in r.datagrams()),
            message="an in-flight report with the drop count")
    # One flush of QUEUE_CAP: the first BUDGET one by one, the rest counted in aggregates.
    rx.wait(lambda r: r.count("/") >= _reporter.QUEUE_CAP, timeout=20,
            message=f"{_reporter.QUEUE_CAP} requests to /")
    time.sleep(0.3)  # nothing more may come
    assert rx.count("/") == _reporter.QUEUE_CAP
    assert len(rx.requests("/")) >= _reporter.BUDGET


def test_a_busy_flush_sends_its_budget_and_every_failure_one_by_one_and_counts_the_rest(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)
    reporter = beacon.reporter
    fast, teapots, booms = _reporter.BUDGET + 700, 300, 5
    with reporter.lock:  # one flush gets them all
        for i in range(fast):
            call(app, f"/orders/{i}")
        for _ in range(teapots):
            call(app, "/teapot")
        for _ in range(booms):
            call(app, "/boom")
    total = fast + teapots + booms
    rx.wait(lambda r: r.count() >= total, timeout=20, message=f"{total} requests")
    rx.wait(settled_once, message="an empty in-flight report after the requests")
    assert rx.count() == total
    assert (rx.count("/orders/<int:oid>"), rx.count("/teapot"), rx.count("/boom")) == (fast, teapots, booms)
    # Every failure went one by one, with its exception type; the budget too.
    booms_seen = rx.requests("/boom")
    assert len(booms_seen) == booms and all(r.status == 500 and r.exc for _, r in booms_seen)
    assert len(rx.requests()) >= _reporter.BUDGET + booms
    rows = rx.aggregates()
    assert rows, "a busy flush sends aggregates"
    me, tid = os.getpid(), threading.get_native_id()
    for pid, a in rows:
        assert (pid, a.tid, a.exc, a.method) == (me, tid, "", "GET")
        assert (a.route, a.endpoint, a.status) in {("/orders/<int:oid>", "order", 200),
                                                    ("/teapot", "teapot", 418)}
        assert a.start <= a.end and abs(a.end - time.time()) < 10
        # fast requests only: every bucket below the always-one-by-one threshold
        assert all(protocol.bucket_value(k) < _reporter.SLOW_S * 1.02 for k, _ in a.buckets)
    assert beacon.stats()["aggregated"] == total - len(rx.requests())


def test_a_forked_child_reports_as_itself(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)
    call(app, "/orders/1")
    rx.wait_requests("/orders/<int:oid>", 1)
    pid = os.fork()
    if pid == 0:  # the child: one request, flushed, gone; it never returns into pytest
        try:
            call(app, "/orders/2")
            beacon.flush()
        finally:
            os._exit(0)
    try:
        got = rx.wait_requests("/orders/<int:oid>", 2)
        assert sorted(p for p, _ in got) == sorted([os.getpid(), pid])
    finally:
        os.waitpid(pid, 0)
    call(app, "/orders/3")  # the parent's flusher is untouched
    assert [p for p, _ in rx.wait_requests("/orders/<int:oid>", 3)].count(os.getpid()) == 2


def test_nobody_listening_stops_encoding_and_a_listener_is_heard_again() -> None:
    port = free_udp_port()
    app, beacon = beacon_app(f"127.0.0.1:{port}")
    call(app, "/")
    wait_until(lambda: beacon.flush() and beacon.stats()["listening"] == 0, timeout=5,
               message="the kernel to refuse a datagram")
    call(app, "/teapot")
    beacon.flush()
    assert beacon.stats()["held"] >= 1  # ended while nobody listened: held, not encoded
    with Receiver(port) as rx:
        def heard(r: Receiver) -> bool:
            call(app, "/orders/8")
            return bool(r.requests("/orders/<int:oid>"))
        rx.wait(heard, timeout=6, message="the beacon to resume after a listener binds")
        # the request that ended just before the listener bound was not lost
        assert len(rx.requests("/teapot")) == 1
    assert beacon.stats()["listening"] == 1 and beacon.stats()["held"] == 0


# ---------------------------------------------------------------------------
# The wire: what the flusher encodes is what protocol.Encoder would say


def test_labels_are_clipped_and_encoded_like_protocol_encoder(rx: Receiver) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    app = create_app()
    beacon = Beacon(app, address=rx.address)
    reporter = beacon.reporter
    labels = st.one_of(st.sampled_from(["/", "/a/<int:x>", "", "é/ü", "\x00\n\t\"\\"]),
                       st.text(max_size=300))
    row = st.tuples(labels, labels, st.sampled_from(["GET", "POST", "BREW"]),
                    st.integers(0, 999), st.integers(0, 10**9), st.integers(-1, 2**40),
                    st.sampled_from(["", "ValueError", "E" * 300]), st.integers(1, 2**32 - 1))
    sent: List[List[tuple]] = []

    @hypothesis.settings(max_examples=40, deadline=None, database=None)
    @hypothesis.given(st.lists(row, min_size=1, max_size=60))
    def check(rows: List[tuple]) -> None:
        now = time.perf_counter()
        recs = []
        for route, endpoint, method, status, dur, size, exc, tid in rows:
            rule = type("Rule", (), {"rule": route, "endpoint": endpoint})()
            # the record layout of flasktop.beacon._reporter (T0 ... METHOD)
            recs.append([now - dur / 1e6, None, f"{status:03d} X", None if size < 0 else str(size),
                         tid, exc, now, rule, method])
        with reporter.lock:
            reporter._send_requests(recs)
        sent.append(rows)

    check()
    expected = []
    for rows in sent:
        for route, endpoint, method, status, dur, size, exc, tid in rows:
            expected.append((protocol.clip(route), protocol.clip(endpoint),
                             method if method != "BREW" else "OTHER", status, size,
                             protocol.clip(exc), tid, dur))
    rx.wait(lambda r: sum(len(d.requests) for d in r.datagrams()) >= len(expected), timeout=10,
            message="every encoded request")
    assert rx.rejects() == []
    assert max(len(d) for d in rx.raw) <= protocol.MAX_DATAGRAM
    got = [(r.route, r.endpoint, r.method, r.status, r.size, r.exc, r.tid, r.duration_s)
           for d in rx.datagrams() for r in d.requests]
    assert len(got) == len(expected)
    # durations went through float microseconds; compare them to the microsecond
    key = lambda t: t[:7]  # noqa: E731
    assert sorted(map(key, got)) == sorted(map(key, expected))
    by_key: Dict[tuple, List[float]] = {}
    for t in got:
        by_key.setdefault(key(t), []).append(t[7])
    for t in expected:
        assert any(abs(d * 1e6 - t[7]) <= 1.5 for d in by_key[key(t)])
    # the same rows through protocol.Encoder decode to the same requests
    enc = protocol.Encoder(os.getpid())
    reference = [(r.route, r.endpoint, r.method, r.status, r.size, r.exc, r.tid)
                 for rows in sent for data in enc.requests(int(time.time() * 1000), [
                     [protocol.clip(a), protocol.clip(b), m if m != "BREW" else "OTHER", s, d, z,
                      protocol.clip(x), t, 0] for a, b, m, s, d, z, x, t in rows])
                 for r in protocol.decode(data).requests]
    assert sorted(reference) == sorted(map(key, got))


# ---------------------------------------------------------------------------
# Standard library only, and flushed at exit


BLOCKER = r"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("textual", "psutil", "rich"):
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Blocker())
"""


def test_the_beacon_imports_only_the_standard_library_and_flushes_at_exit(rx: Receiver) -> None:
    script = BLOCKER + r"""
import json, os, sys
import flasktop.beacon
from flasktop.beacon import BeaconMiddleware
from flask import Flask
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("textual", "psutil", "rich"))
app = Flask("stdlib_only")
@app.route("/items/<int:i>")
def item(i):
    return {"i": i}
app.wsgi_app = BeaconMiddleware(app.wsgi_app, address=sys.argv[1])
bodies = []
for i in range(3):
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/items/{i}", "SERVER_NAME": "x",
           "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": __import__("io").BytesIO()}
    it = app(env, lambda s, h, e=None: None)
    bodies.append(b"".join(it).decode())
    it.close()
print(json.dumps({"loaded": loaded, "bodies": bodies}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script, rx.address], env=env, cwd=str(ROOT),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["loaded"] == [] and len(doc["bodies"]) == 3
    got = rx.wait_requests("/items/<int:i>", 3)  # the process exited at once: atexit flushed
    assert {r.status for _, r in got} == {200}


def test_the_flusher_is_a_daemon_and_never_keeps_the_process_alive(rx: Receiver) -> None:
    script = r"""
import sys
from flasktop.beacon import BeaconMiddleware
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
mw = BeaconMiddleware(app, address=sys.argv[1])
it = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda s, h, e=None: None)
list(it); it.close()
import threading
print(sorted(t.name for t in threading.enumerate() if t.daemon))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script, rx.address], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "flasktop-beacon" in out
    rx.wait_requests(protocol.UNMATCHED, 1)


def test_nobody_listening_for_long_keeps_every_store_bounded() -> None:
    """Hours with no listener, compressed: many requests with nothing bound to the port.
    What the beacon keeps stays within its caps, and the app's answers never change."""
    port = free_udp_port()
    app, beacon = beacon_app(f"127.0.0.1:{port}")
    expected = call(app, "/orders/1")
    for i in range(30_000):
        assert call(app, f"/orders/{i}")[0] == expected[0]
        if i % 5000 == 0:
            beacon.flush()
    beacon.flush()
    stats = beacon.stats()
    assert stats["listening"] == 0
    assert stats["held"] <= _reporter.HOLD_CAP and stats["queued"] <= _reporter.QUEUE_CAP
    assert stats["inflight"] == 0
    assert stats["reported"] + stats["unheard"] + stats["held"] + stats["dropped"] >= 30_000
    reporter = beacon.reporter
    assert len(reporter.labels) <= _reporter.CACHE_CAP and len(reporter.rules) <= _reporter.CACHE_CAP


# ---------------------------------------------------------------------------
# The Flask fast path: its fallbacks


def test_a_response_class_set_after_the_beacon_is_hooked_too(rx: Receiver) -> None:
    from flask import Response

    class Late(Response):
        default_mimetype = "text/x-late"

    app, beacon = beacon_app(rx.address)
    app.response_class = Late  # an extension's, set after Beacon(app)
    worker = threading.Thread(target=lambda: call(app, "/orders/4"))  # that thread's first
    worker.start()
    worker.join()
    [(_, req)] = rx.wait_requests("/orders/<int:oid>", 1)
    assert (req.status, req.size) == (200, len(call(create_app(), "/orders/4")[2]))
    assert issubclass(app.response_class, Late)

    class Later(Response):
        default_mimetype = "text/x-later"

    call(app, "/whoami/1")  # this thread's lane exists before the swap
    app.response_class = Later  # after this thread's requests: one goes uncounted, no more
    status, headers, _ = call(app, "/")
    assert dict(headers)["Content-Type"].startswith("text/x-later")
    for _ in range(3):
        call(app, "/")
    rx.wait_requests("/", 3)
    rx.wait(settled_once, message="a report after the requests")
    assert len(rx.requests("/")) == 3 and beacon.stats()["dropped"] == 1
    assert issubclass(app.response_class, Later)


def test_responses_pickle_and_copy_as_the_apps_own_class(rx: Receiver) -> None:
    import copy
    import pickle

    app, _ = beacon_app(rx.address)
    base = app.response_class.__mro__[1]
    with app.test_request_context("/"):
        made = app.make_response("cached body")
    assert type(pickle.loads(pickle.dumps(made))) is base  # no beacon class in a cache
    assert type(copy.copy(made)) is base

    @app.route("/cached")
    def cached() -> Any:
        return copy.copy(made)  # Flask makes it the app's class again

    assert call(app, "/cached")[2] == b"cached body"
    [(_, req)] = rx.wait_requests("/cached", 1)
    assert (req.status, req.size) == (200, len(b"cached body"))


def test_a_response_closed_without_being_served_ends_nothing(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)
    with app.test_request_context("/"):
        made = app.make_response("never sent")
    made.close()  # not served: no lane of its own, and no exception out of close()
    made.close()
    assert call(app, "/orders/5")[0] == "200 OK"
    [(_, req)] = rx.wait_requests("/orders/<int:oid>", 1)
    assert req.status == 200
    assert beacon.stats()["dropped"] == 0 and not rx.requests("/")


def test_a_request_inside_a_request_is_reported_once_each(rx: Receiver) -> None:
    app, _ = beacon_app(rx.address)

    @app.route("/outer")
    def outer() -> str:
        inner = call(app, "/orders/3")  # the same app, the same thread, nested
        return "outer saw " + inner[0]

    assert call(app, "/outer")[2] == b"outer saw 200 OK"
    [(_, out)] = rx.wait_requests("/outer", 1)
    [(_, inner)] = rx.wait_requests("/orders/<int:oid>", 1)
    assert out.tid == inner.tid == threading.get_native_id()
    assert inner.duration_s <= out.duration_s and (out.status, inner.status) == (200, 200)
    call(app, "/")  # the lane is free again
    rx.wait_requests("/", 1)


def test_a_thread_per_request_server_leaves_no_lane_behind(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)
    for i in range(40):  # like the development server: a new thread for every request
        t = threading.Thread(target=call, args=(app, f"/orders/{i}"))
        t.start()
        t.join()
    got = rx.wait_requests("/orders/<int:oid>", 40)
    assert len({r.tid for _, r in got}) > 1
    wait_until(lambda: beacon.flush() and beacon.stats()["lanes"] == 0, timeout=10,
               message="the lanes of the finished threads forgotten")


def test_groups_are_bounded_whatever_methods_and_statuses_arrive(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)

    @app.route("/status/<int:code>")
    def status(code: int) -> Tuple[str, int]:
        return "s", code

    for i in range(600):  # junk methods on a 404: one group
        call(app, f"/nowhere/{i}", method=f"JUNK{i}")
    for code in range(200, 600):
        call(app, f"/status/{code}")
    reporter = beacon.reporter
    assert len(reporter.group_info) <= _reporter.GROUPS_CAP + 2
    assert len(reporter.groups) <= 5 * _reporter.GROUPS_CAP
    leaves = [code for rules in reporter.routes.values() for codes in rules.values()
              for code in codes]
    assert len(leaves) < len(reporter.group_info) <= _reporter.GROUPS_CAP + 2
    unmatched = [g for g in reporter.group_info[2:] if g[1] is None]
    assert {g[2] for g in unmatched} == {"OTHER"}
    total = 600 + 400
    rx.wait(lambda r: r.count() >= total, timeout=20, message=f"{total} requests")
    rx.wait(settled_once, message="all in")
    assert rx.count() == total


def test_one_slow_request_among_fast_ones_of_its_route_goes_one_by_one(rx: Receiver) -> None:
    app, beacon = beacon_app(rx.address)

    @app.route("/nap/<int:ms>")
    def nap(ms: int) -> str:
        time.sleep(ms / 1000)
        return "z"

    with beacon.reporter.lock:  # one flush gets them all: the budget, then one group
        for i in range(301):
            call(app, "/nap/8" if i == 200 else "/nap/0")
    rx.wait(lambda r: r.count("/nap/<int:ms>") >= 301, message="301 naps")
    rx.wait(settled_once, message="all in")
    assert rx.count("/nap/<int:ms>") == 301
    # The 8 ms nap is past the budget and in a one-route flush: it must still go one by one.
    # (A fast one may be slow too on a loaded machine; it then goes one by one as well.)
    assert [r for _, r in rx.requests("/nap/<int:ms>") if r.duration_s >= 0.008]
    for _, a in rx.aggregates():
        assert all(protocol.bucket_value(k) < _reporter.SLOW_S * 1.02 for k, _ in a.buckets)


def _kept(d: float) -> float:
    """What kind "h" keeps of a duration: the top three bytes of its binary64."""
    return struct.unpack("<d", b"\0" * 5 + struct.pack("<d", d)[5:])[0]


def _flush_written(rx: Receiver, durations: List[float]) -> Tuple[Beacon, List[Tuple[int, Any]]]:
    """A real request makes the group of /orders/<int:oid> and this thread's lane; then one
    flush sends ``durations`` written to that lane as its request path writes ended
    requests (start, group, size, duration). Returns the beacon and the (budget, rest)
    split the receiver saw: the first BUDGET one by one, the rest as it decided."""
    app, beacon = beacon_app(rx.address)
    call(app, "/orders/1")
    rx.wait(lambda r: r.count() >= 1, message="the first request")
    rep = beacon.reporter
    gk = rep.routes["GET"]["/orders/<int:oid>"][200]
    [lane] = [lane for lane in rep.lanes if lane.ident == threading.get_ident()]
    start = time.perf_counter() - 10.0  # each ended before now
    with rep.lock:
        for i, d in enumerate(durations):
            lane.buf.extend(_reporter.QUAD.pack(start + i * 1e-4, gk, 13.0, d))
    assert rep.flush(timeout=5)
    total = 1 + len(durations)
    rx.wait(lambda r: r.count() >= total, message=f"{total} requests")
    rx.wait(settled_once, message="all in")
    assert rx.count() == total
    return beacon, [(d.seq, d) for d in rx.datagrams() if d.aggregates]


@pytest.mark.parametrize("durations, most", [
    ([31e-6 + i * 3.1e-6 for i in range(1500)], 4),  # 31 us to 4.7 ms: one top byte, 2 B each
    ([20e-6, 40e-6] * 750, 5),  # either side of 30.5 us: a top byte each, 3 B each
], ids=["one-top-byte", "two-top-bytes"])
def test_a_busy_one_route_flush_sends_its_durations_high_bytes_for_flasktop_to_bucket(
        rx: Receiver, durations: List[float], most: int) -> None:
    """One group, every duration under SLOW_S: past the budget, kind "h" (two or three
    bytes a duration, a few hundred a datagram; kind "d" took 7 for these); decoded, each
    is in the bucket of what its high bytes keep of it."""
    assert max(durations) < _reporter.SLOW_S
    beacon, rows = _flush_written(rx, durations)
    budget = _reporter.BUDGET
    assert {d.kind for _, d in rows} == {protocol.KIND_HIGH_BYTES}
    assert len(rows) <= most
    got: Counter = Counter()
    for _, d in rows:
        for a in d.aggregates:
            assert (a.route, a.method, a.status, a.tid) == (
                "/orders/<int:oid>", "GET", 200, threading.get_native_id())
            got.update(dict(a.buckets))
    assert got == Counter(protocol.bucket_of(_kept(d)) for d in durations[budget:])
    assert beacon.stats()["aggregated"] == len(durations) - budget


@pytest.mark.parametrize("fast", [40e-6, 20e-6], ids=["one-top-byte", "two-top-bytes"])
def test_slow_requests_of_a_busy_one_route_flush_go_one_by_one_the_rest_as_high_bytes(
        rx: Receiver, fast: float) -> None:
    """From SLOW_S on a request is slow (a GC pause is enough): it goes one by one, found
    by its high bytes whether or not the others share its top byte, and the rest still go
    as kind "h". Every request once."""
    slow = [_reporter.SLOW_S, 0.0123, 2.5, 0.0049]
    durations = [fast] * 300 + [slow[0]] + [1e-3] * 99 + slow[1:] + [fast] * 10
    beacon, rows = _flush_written(rx, durations)
    assert {d.kind for _, d in rows} == {protocol.KIND_HIGH_BYTES}
    assert sorted(r.duration_s for _, r in rx.requests("/orders/<int:oid>")
                  if r.duration_s >= 0.0048) == pytest.approx(sorted(slow), abs=2e-6)
    got: Counter = Counter()
    for _, d in rows:
        for a in d.aggregates:
            got.update(dict(a.buckets))
    rest = [d for d in durations[_reporter.BUDGET:] if d < _reporter.SLOW_S]
    assert got == Counter(protocol.bucket_of(_kept(d)) for d in rest)
    assert beacon.stats()["aggregated"] == len(rest)


def test_a_test_request_context_is_no_request_and_loses_none(rx: Receiver) -> None:
    from flask import url_for

    app, beacon = beacon_app(rx.address)
    with app.test_request_context("/"):  # e.g. url_for at start-up: a context, no request
        assert url_for("order", oid=5) == "/orders/5"
    call(app, "/orders/6")
    [(_, req)] = rx.wait_requests("/orders/<int:oid>", 1)
    rx.wait(settled_once, message="all in")
    assert len(rx.requests()) == 1 and beacon.stats()["dropped"] == 0
