"""The WSGI middleware, for any WSGI app; its record is also the Flask fast path's slow path.

Per request it reads the clock twice, builds one small list, keeps references in it
(status string, Content-Length value, matched rule) and appends it to a deque. No
formatting, no I/O, no lock: the flusher thread in ``_reporter`` does all of that.
Indexes into the record are literals here for speed; their names are in ``_reporter``.
A Flask app gets the cheaper hooks of ``_fast`` instead.
"""

from __future__ import annotations

import sys
import threading
from threading import get_native_id
from time import perf_counter
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional

from flasktop.beacon._address import AddressArg, choose
from flasktop.beacon._reporter import (QUEUE_CAP, WAKE_AT, HasReporter, Reporter, _log_failure_once,
                                       reporter_for)

WSGIApp = Callable[[Dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# werkzeug.wsgi.ClosingIterator once the app has imported werkzeug (looked up, never imported).
_CLOSING: Optional[type] = None


def _find_closing() -> None:
    global _CLOSING
    if _CLOSING is None:
        closing = getattr(sys.modules.get("werkzeug.wsgi"), "ClosingIterator", None)
        if isinstance(closing, type) and callable(getattr(closing, "close", None)):
            _CLOSING = closing


# get_native_id() is a system call; a thread-local is ~6x cheaper. Created at import:
# under gevent with --preload it is the real thread's local (greenlets share the tid).
_tls = threading.local()


class BeaconMiddleware(HasReporter):
    """Wrap any WSGI app: ``app = BeaconMiddleware(app)``.

    ``address`` is ``"host:port"``, ``(host, port)`` or ``"off"``; when None, the
    ``config`` mapping's ``FLASKTOP_BEACON``, then the environment variable
    ``FLASKTOP_BEACON``, then ``DEFAULT_ADDRESS`` decide. Off, or an address that does
    not resolve, makes this a plain pass-through.
    """

    __slots__ = ("wsgi_app", "reporter")

    def __init__(self, wsgi_app: WSGIApp, address: AddressArg = None, *,
                 config: Optional[Mapping[str, Any]] = None) -> None:
        self.wsgi_app = wsgi_app
        self.reporter: Optional[Reporter] = None
        _find_closing()
        try:
            self.reporter = reporter_for(choose(address, config))
        except Exception:  # noqa: BLE001 - a broken beacon degrades to pass-through
            _log_failure_once("setting up")


    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        reporter = self.reporter
        if reporter is None:
            return self.wsgi_app(environ, start_response)
        try:
            try:
                tid = _tls.tid
            except AttributeError:
                tid = _tls.tid = get_native_id()
            # T0, ENVIRON, STATUS, SIZE, TID, EXC, T1, RULE, METHOD
            rec = [perf_counter(), environ, None, None, tid, "", 0.0, None,
                   environ.get("REQUEST_METHOD")]
            started = reporter.started
            n = len(started)
            if n < WAKE_AT:
                started.append(rec)
            elif n < QUEUE_CAP:
                started.append(rec)
                if not reporter.woken:
                    reporter.wakeup()
            else:
                reporter.dropped += 1
            if not reporter.running:
                _find_closing()
                reporter.start()
            resp = _Response(rec, start_response)
        except Exception:  # noqa: BLE001 - a broken beacon degrades to pass-through
            _log_failure_once("recording a request")
            return self.wsgi_app(environ, start_response)
        try:
            it = self.wsgi_app(environ, resp.start_response)
        except BaseException as e:
            rec[5] = type(e).__name__
            _end(rec)
            raise
        if type(it) is _CLOSING and rec[3] is not None:
            # Werkzeug's own closing iterator (every buffered Flask response): end the request
            # in its close() instead of wrapping it, saving the app two calls per request.
            try:
                it._callbacks.insert(0, resp.ended)
                return it
            except Exception:  # noqa: BLE001 - not the class we know after all: wrap it
                pass
        file_wrapper = environ.get("wsgi.file_wrapper")
        if file_wrapper is not None and type(it) is file_wrapper:
            return _hook_file_wrapper(it, rec)
        resp._it = it
        return resp


class _Response:
    """Wraps start_response, and is the response iterable: the request ends at close()."""

    __slots__ = ("_it", "_rec", "_sr")

    def __init__(self, rec: list, start_response: Callable[..., Any]) -> None:
        self._rec = rec
        self._sr = start_response

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        rec = self._rec
        try:
            rec[2] = status
            if type(headers) is list and headers:
                # Keep the Content-Length value, not the list. Werkzeug puts it last.
                name, value = headers[-1]
                if name == "Content-Length":
                    rec[3] = value
                else:
                    for name, value in headers:
                        if name == "Content-Length":
                            rec[3] = value
                            break
            req = rec[1].get("werkzeug.request")  # Flask drops it when the request ends
            if req is not None:
                rec[7] = getattr(req, "url_rule", None)
        except Exception:  # noqa: BLE001 - malformed headers are the server's to refuse
            pass
        if exc_info is None:
            return self._sr(status, headers)
        return self._sr(status, headers, exc_info)

    def __iter__(self) -> Iterator[bytes]:
        rec = self._rec
        if rec[3] is None:  # no Content-Length: count what is sent
            return _counted(self._it, rec)
        return iter(self._it)

    def ended(self) -> None:
        """First of werkzeug's ClosingIterator callbacks: the server is closing the response."""
        rec = self._rec
        if not rec[6]:
            _end(rec)

    def close(self) -> None:
        rec = self._rec
        if rec[6]:
            return
        try:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
        except BaseException as e:
            if not rec[5]:
                rec[5] = type(e).__name__
            raise
        finally:
            if rec[7] is None and rec[1] is not None:
                _unmatched(rec)
            rec[1] = None  # the environ: a finished request holds only small values
            rec[6] = perf_counter()


def _unmatched(rec: list) -> None:
    """No Flask rule: a non-Flask app may name its route in environ["flasktop.route"]."""
    try:
        environ = rec[1]
        route = environ.get("flasktop.route")
        if route is not None:
            endpoint = environ.get("flasktop.endpoint")
            rec[7] = (route, endpoint) if endpoint else route
    except Exception:  # noqa: BLE001
        pass


def _end(rec: list) -> None:
    """Stamp the end of a request that did not end through _Response.close().

    An exception that escapes the app skips start_response; the flusher's in-flight
    report has kept the matched rule of any request that ran for a while.
    """
    if rec[7] is None and rec[1] is not None:
        _unmatched(rec)
    rec[1] = None
    rec[6] = perf_counter()


def _counted(it: Iterable[bytes], rec: list) -> Iterator[bytes]:
    """Iterate ``it`` and keep the bytes sent so far in the record's SIZE."""
    n = 0
    rec[3] = 0
    try:
        for chunk in it:
            n += len(chunk)
            rec[3] = n
            yield chunk
    except GeneratorExit:
        raise
    except BaseException as e:
        rec[5] = type(e).__name__
        raise


def _hook_file_wrapper(it: Any, rec: list) -> Any:
    """Keep the server's own file wrapper (sendfile) and end the request on its close()."""
    inner = getattr(it, "close", None)

    def close() -> None:
        if rec[6]:
            return
        try:
            if inner is not None:
                inner()
        finally:
            _end(rec)

    try:
        it.close = close
    except Exception:  # noqa: BLE001 - a wrapper with __slots__: keep ours around it
        resp = _Response(rec, _no_start_response)
        resp._it = it
        return resp
    return it


def _no_start_response(*args: Any) -> None:
    raise RuntimeError("start_response after the app returned a file wrapper")
