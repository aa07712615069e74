"""The Flask fast path: a beacon that adds no call of its own to a Flask request.

A WSGI middleware costs a Flask app at least three Python calls per request (its own
``__call__``, the ``start_response`` it wraps and the close of the iterable it wraps),
and keeping a record object per request until another thread reads it costs more again
(docs/benchmarks.md). So for a Flask app ``Beacon`` hooks into calls Flask makes anyway:

- ``request_context``, hooked on the app's class (see ``_Contexts``), builds the same
  ``RequestContext`` and appends the start time to its thread's *lane*;
- ``app.response_class`` gets a subclass whose ``__call__`` is werkzeug's three lines
  plus appending the request's group (status, rule, method) and size to the lane and
  its end stamp to werkzeug's ``ClosingIterator`` callbacks;
- ``should_ignore_error``, which Flask calls only when a request raised, ends a request
  that an exception takes out of Flask (gunicorn's timeout, PROPAGATE_EXCEPTIONS). It is
  hooked on the app's class, not on the app (see ``_watch_errors``).

A lane is one thread's open request (its environ, start, group and size, as attributes)
and a ``bytearray`` of the (start, group, size, duration) quads of its ended requests, packed
as four native doubles, which the end stamp appends in one call (``array('d').extend`` parses
each float with ``PyArg_Parse``: about 1,900 machine instructions a request against 350 for
``Struct.pack``, counted with callgrind). Only its thread appends to it; only the flusher
takes whole quads from its front. Anything unusual (a nested request, greenlets sharing a
thread, a streamed or file response, a status without Content-Length) takes the slow
path instead: a record in the reporter's queue, exactly as the middleware makes.
"""

from __future__ import annotations

import copyreg
import sys
import threading
from functools import wraps
from threading import get_ident, get_native_id
from time import perf_counter
from typing import Any, Callable, Dict, List, Optional

from flasktop.beacon import _middleware
from flasktop.beacon._middleware import _hook_file_wrapper, _Response
from flasktop.beacon._reporter import (_METHODS, _STALE, EXC, QUAD, QUEUE_CAP, RULE, STATUS,
                                       T1, UNTRACKED, WAKE_AT, GROUPS_CAP, Reporter,
                                       _log_failure_once)

LANES_CAP = 1024  # threads with a lane; more (a thread per request server) take the slow path


class Lane:
    """One thread's requests: the open one as attributes, the ended ones as floats."""

    __slots__ = ("buf", "environ", "t0", "gk", "size", "tid", "ident", "thread")

    def __init__(self) -> None:
        self.buf = bytearray()  # ended requests, QUAD-packed
        self.environ: Optional[Dict[str, Any]] = None  # of the open request
        self.t0 = 0.0
        self.gk = 0.0  # the open request's group once it responded, else 0
        self.size = -1.0
        self.tid = get_native_id()
        self.ident = get_ident()
        self.thread = threading.current_thread()


class _OffLane:
    """What a request on the slow path has in its environ for a lane: never its own."""

    __slots__ = ()
    environ = _STALE


_OFF_LANE = _OffLane()
LANE_KEY = "flasktop.lane"  # the environ key of the lane a request opened (its literal is
#                            # in request_context and __call__: a global is one load more)


class _NoLane:
    """Stands in for a lane when none may be made: every request takes the slow path."""

    __slots__ = ("environ", "tid", "ident")

    def __init__(self) -> None:
        self.environ = _STALE  # never a request's environ, never None: always "taken"
        self.tid = get_native_id()
        self.ident = get_ident()


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    try:
        return monkey is not None and bool(monkey.is_module_patched("threading"))
    except Exception:  # noqa: BLE001
        return False


def _thread_local() -> Any:
    """The real thread's local. Under gevent's monkey patching threading.local is per
    greenlet, which would make a lane per request; greenlets of one thread share a lane
    and a request that overlaps another on it takes the slow path."""
    if _gevent_patched():
        try:
            return sys.modules["gevent.monkey"].get_original("_threading_local", "local")()
        except Exception:  # noqa: BLE001
            pass
    return threading.local()


def eligible(app: Any) -> bool:
    """Whether ``app`` is a Flask whose hooks are the ones this module knows."""
    flask_app = sys.modules.get("flask.app")
    ctx = sys.modules.get("flask.ctx")
    werkzeug_response = _werkzeug_response()
    if flask_app is None or ctx is None or werkzeug_response is None:
        return False
    flask_cls = getattr(flask_app, "Flask", None)
    if flask_cls is None or not isinstance(app, flask_cls):
        return False
    if "request_context" in vars(app) or "should_ignore_error" in vars(app):
        return False
    if getattr(type(app), "should_ignore_error", None) is None:
        return False
    response_class = getattr(app, "response_class", None)
    return (isinstance(response_class, type) and issubclass(response_class, werkzeug_response)
            and response_class.__call__ is werkzeug_response.__call__
            and isinstance(getattr(ctx, "RequestContext", None), type))


class FlaskHook:
    """The fast path installed on one Flask app, reporting to ``reporter``."""

    def __init__(self, app: Any, reporter: Reporter) -> None:
        self.app = app
        self.reporter = reporter
        # Each thread's lane lives in a thread-local, looked up once a request, when the
        # request begins; the request's environ then carries it (LANE_KEY) to __call__.
        # A per-thread lookup costs what a thread's identity costs, about 0.3 us a request
        # in place (docs/benchmarks.md), so there is exactly one; a ContextVar would need a
        # second, as a context copied to another thread brings the first thread's value.
        self.tls = _thread_local()
        _middleware._find_closing()
        self._closing = _middleware._CLOSING
        contexts = _contexts_of(type(app))
        # What makes the app's RequestContext: Flask's own request_context() is
        # RequestContext(app, environ), called here without the method's frame; a class
        # that overrides it keeps its own.
        own = contexts.orig is sys.modules["flask.app"].Flask.request_context
        self._make_ctx = sys.modules["flask.ctx"].RequestContext if own else contexts.orig
        _watch_errors(type(app))
        # The app gets exactly one attribute: see _contexts_of for why not more.
        self.response_class = self._subclass(app.response_class)
        app.response_class = self.response_class
        self.request_context_fn = self._request_context_fn(contexts.other)
        contexts.install(self.request_context_fn)

    # -- the request path ----------------------------------------------------------

    def _request_context_fn(self, others: Callable[[Any, Dict[str, Any]], Any]
                            ) -> Callable[[Any, Dict[str, Any]], Any]:
        """The app's ``request_context``, a method of its class: ``others`` serves the
        class's other apps."""
        app = self.app
        make_ctx = self._make_ctx
        busy = self._busy
        tls = self.tls
        thread_lane = self._thread_lane

        def request_context(self: Any, environ: Dict[str, Any]) -> Any:
            if self is not app:
                return others(self, environ)
            t0 = perf_counter()
            ctx = make_ctx(app, environ)
            try:
                try:
                    lane = tls.lane
                except AttributeError:
                    lane = thread_lane()  # this thread's first request
                if lane.environ is None:
                    lane.t0 = t0
                    lane.environ = environ
                    environ["flasktop.lane"] = lane  # LANE_KEY, for __call__
                else:
                    busy(lane, environ, t0)
            except Exception:  # noqa: BLE001 - a broken beacon: the request goes unreported
                pass
            return ctx

        return request_context

    def _thread_lane(self) -> Any:
        """Make this thread's lane: its first request found none in the thread-local."""
        lane = self.tls.lane = self._new_lane()
        return lane

    def _subclass(self, base: type) -> type:
        closing = self._closing
        routes = self.reporter.routes
        pack = QUAD.pack
        sizes = _SIZES
        parse_size = _parse_size
        rare = self._rare_response
        werkzeug_response = _werkzeug_response()
        own_close = getattr(base, "close", None) is werkzeug_response.close

        class BeaconResponse(base):  # type: ignore[valid-type,misc]
            def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
                app_iter, status, headers = self.get_wsgi_response(environ)
                start_response(status, headers)
                try:
                    # the lane this request opened: not its own (another request's, or
                    # _OFF_LANE: the slow path) or none (KeyError) sends it to the rare path
                    lane = environ["flasktop.lane"]  # LANE_KEY
                    if lane.environ is environ and type(app_iter) is closing:
                        name, value = headers[len(headers) - 1]  # [-1] is not specialized
                        if name == "Content-Length":
                            # a group the request path has not met (KeyError): the rare path
                            gk = routes[environ["REQUEST_METHOD"]][
                                environ["werkzeug.request"].url_rule.rule][self._status_code]
                            try:
                                size = sizes[value]  # parsing costs the request 8x more
                            except KeyError:
                                size = parse_size(value)
                            if gk:
                                lane.size = size
                                lane.gk = gk
                                self._ft_lane = lane  # close() ends the request
                                return app_iter
                except Exception:  # noqa: BLE001 - a 404 (no rule): the rare path knows it
                    pass
                return rare(self, environ, app_iter, status, headers)

            def close(self) -> None:
                """The end stamp (the open request becomes a quad), then the base class's
                close: werkzeug's own is inlined, so no call is added."""
                try:
                    lane = self._ft_lane
                except AttributeError:  # closed without being called
                    lane = None
                if lane is not None:
                    self._ft_lane = None
                    try:
                        t0 = lane.t0
                        buf = lane.buf  # += is bytearray's own concat: no method call
                        buf += pack(t0, lane.gk, lane.size, perf_counter() - t0)
                        lane.environ = None
                        lane.gk = 0.0
                    except Exception:  # noqa: BLE001 - never into the server's close()
                        pass
                if own_close:
                    # werkzeug's close(), with a list (what set_data() makes) and no
                    # callbacks (the common case) each found without a call
                    response = self.response
                    if type(response) is not list and hasattr(response, "close"):
                        response.close()
                    on_close = self._on_close
                    if on_close:
                        for func in on_close:
                            func()
                else:
                    base.close(self)

            def __reduce_ex__(self, protocol: Any) -> Any:
                # Pickled (a response cache) and copied as the app's own class, which any
                # process can load; Flask makes a returned one this class again.
                getstate = getattr(self, "__getstate__", None)
                state = getstate() if getstate is not None else self.__dict__
                if isinstance(state, dict) and "_ft_lane" in state:
                    state = {k: v for k, v in state.items() if k != "_ft_lane"}
                return copyreg._reconstructor, (base, object, None), state

            # ``_ft_lane``, the lane whose open request this response ends, is an instance
            # attribute only, set by __call__ (or _rare_response). No class default: CPython
            # 3.12 and 3.13 leave every load and store of an instance attribute that is also
            # a class attribute unspecialized (3.11 does not). No slot either: Flask's
            # force_type() sets the __class__ of a plain Response returned by a view to this
            # one, which a different layout would refuse.

        BeaconResponse.__name__ = base.__name__
        BeaconResponse.__qualname__ = base.__qualname__
        BeaconResponse.__doc__ = base.__doc__
        return BeaconResponse

    # -- rare branches ------------------------------------------------------------

    def _new_lane(self) -> Any:
        """This thread's first request: its lane (or, past LANES_CAP, the slow path's)."""
        try:
            rep = self.reporter
            with rep.group_lock:
                if len(rep.lanes) >= LANES_CAP:
                    rep.prune_lanes()
                    if len(rep.lanes) >= LANES_CAP:
                        return _NoLane()
                lane = Lane()
                rep.lanes.append(lane)
            rep.start()
            if self.app.response_class is not self.response_class:
                self._rehook()  # set after Beacon(app), before this thread's first request
            return lane
        except Exception:  # noqa: BLE001
            _log_failure_once("recording a request")
            return _NoLane()

    def _group(self, code: int, rule: Any, raw_method: Any, exc: str = "") -> float:
        """The group id of (code, rule, method, exc): negative when its requests are always
        sent one by one (5xx, never started, an exception); 0 when the table is full."""
        method = raw_method if raw_method in _METHODS else "OTHER"  # junk methods: one group
        route = getattr(rule, "rule", None)
        rep = self.reporter
        with rep.group_lock:
            full = (code, route, method, exc)
            gk = rep.groups.get(full)
            if gk is None:
                if len(rep.group_info) > GROUPS_CAP:
                    return 0.0
                n = float(len(rep.group_info))
                gk = -n if (code >= 500 or code <= 0 or exc) else n
                rep.group_info.append((code, rule, method, exc))
                rep.groups[full] = gk
            if not exc and method is raw_method and route is not None:
                # the request path finds it without a call; one leaf per such group, so
                # the table's own cap bounds these too
                rep.routes.setdefault(raw_method, {}).setdefault(route, {})[code] = gk
            return gk

    def _busy(self, lane: Any, environ: Dict[str, Any], t0: float) -> None:
        """The thread's lane has a request open (or is stale after fork)."""
        try:
            if lane.environ is _STALE and isinstance(lane, Lane):  # first request after fork
                with self.reporter.group_lock:
                    del lane.buf[:]
                    lane.tid = get_native_id()
                    lane.gk = 0.0
                    if lane not in self.reporter.lanes:
                        self.reporter.lanes.append(lane)
                lane.environ = None
                self.reporter.start()
            open_env = lane.environ
            if open_env is not None and open_env is not _STALE and not lane.gk \
                    and open_env.get("werkzeug.request") is None:
                # The open request context ended without our response. Most often it was
                # app.test_request_context(), which makes none: nothing to report. Else a
                # response class set after this thread's first request: that request's
                # status and end are unknown (now may be long after), so it is counted as
                # dropped, never reported with a made-up time.
                lane.environ = None
                if self.app.response_class is not self.response_class:
                    self.reporter.dropped += 1
                    self._rehook()
            if lane.environ is None:
                lane.t0 = t0
                lane.environ = environ
                environ[LANE_KEY] = lane
                return
            self._slow_start(environ, t0)  # nested, or greenlets sharing the thread
        except Exception:  # noqa: BLE001
            _log_failure_once("recording a request")

    def _rehook(self) -> None:
        """``app.response_class`` was replaced: hook the new class too."""
        with self.reporter.group_lock:
            current = self.app.response_class
            base = _werkzeug_response()
            if current is self.response_class or base is None or not isinstance(current, type) \
                    or current.__call__ is not base.__call__:
                return  # a class with its own __call__: its requests go untracked, counted
            self.response_class = self._subclass(current)
            self.app.response_class = self.response_class

    def _finish_open(self, lane: Any, code: int, rule: Any, method: Any, exc: str) -> None:
        """End the lane's open request now, as ``code`` (0: it never responded)."""
        gk = self._group(code, rule, method, exc) or UNTRACKED
        lane.buf += QUAD.pack(lane.t0, gk, -1.0, perf_counter() - lane.t0)
        lane.environ = None
        lane.gk = 0.0

    def _slow_start(self, environ: Dict[str, Any], t0: float) -> None:
        """A record in the reporter's queue, as the middleware makes, for this request."""
        rep = self.reporter
        lane = getattr(self.tls, "lane", None)
        tid = lane.tid if lane is not None else get_native_id()
        rec = [t0, environ, None, None, tid, "", 0.0, None, environ.get("REQUEST_METHOD")]
        started = rep.started
        n = len(started)
        if n >= QUEUE_CAP:
            rep.dropped += 1
            return
        started.append(rec)
        if n >= WAKE_AT and not rep.woken:
            rep.wakeup()
        if not rep.running:
            rep.start()
        environ["flasktop.rec"] = rec
        environ[LANE_KEY] = _OFF_LANE  # __call__ then takes the rare path without a KeyError

    def _rare_response(self, response: Any, environ: Dict[str, Any], app_iter: Any,
                       status: str, headers: Any) -> Any:
        """Every response the request path did not take: a new group, no matched rule
        (404, 405), no Content-Length (a stream), a file, or a request on the slow path."""
        try:
            response._ft_lane = None  # its close() then needs no exception to know
            rec = environ.get("flasktop.rec")
            lane = getattr(self.tls, "lane", None)
            if rec is None and lane is not None and lane.environ is environ and not lane.gk:
                size = _content_length(headers)
                if size is not None and type(app_iter) is self._closing:
                    req = environ.get("werkzeug.request")
                    gk = self._group(response.status_code, getattr(req, "url_rule", None),
                                     environ.get("REQUEST_METHOD"))
                    if gk:
                        lane.size = float(size)
                        lane.gk = gk
                        response._ft_lane = lane
                        return app_iter
                lane.environ = None  # this request moves to a record
                self._slow_start(environ, lane.t0)
                rec = environ.get("flasktop.rec")
            if rec is None or rec[STATUS] is not None:
                return app_iter
            resp = _Response(rec, _no_start_response)
            resp.start_response(status, headers)
            file_wrapper = environ.get("wsgi.file_wrapper")
            if file_wrapper is not None and type(app_iter) is file_wrapper:
                return _hook_file_wrapper(app_iter, rec)
            resp._it = app_iter
            return resp
        except Exception:  # noqa: BLE001
            _log_failure_once("recording a response")
            return app_iter

    def _raised(self, error: BaseException) -> None:
        ctx = _current_request_ctx()
        if ctx is None:
            return
        environ = ctx.request.environ
        rule = getattr(ctx.request, "url_rule", None)
        name = type(error).__name__
        rec = environ.get("flasktop.rec")
        if rec is not None:
            if not rec[EXC]:
                rec[EXC] = name
            if rec[STATUS] is None and not rec[T1]:  # no response: the exception ends it
                rec[RULE] = rule
                _middleware._end(rec)
            return
        lane = getattr(self.tls, "lane", None)
        if lane is None or lane.environ is not environ:
            return
        method = environ.get("REQUEST_METHOD")
        if not lane.gk:  # raised out of Flask before any response: it ends here
            self._finish_open(lane, 0, rule, method, name)
        else:  # Flask made a 500 of it: the group learns the exception's name
            code = self.reporter.group_info[int(abs(lane.gk))][0]
            lane.gk = self._group(code, rule, method, name) or lane.gk


EXTENSION = "flasktop_beacon"  # the app.extensions key of the app's Beacon
_WATCHED = "__flasktop_watches_errors__"
_CONTEXTS = "__flasktop_request_contexts__"
_watch_lock = threading.Lock()


class _Contexts:
    """The ``request_context`` of one Flask class, hooked for the apps that have a beacon.

    The hook is a method of the class, not an attribute of the app, because of what
    attributes of the app cost Flask. CPython keeps the attributes of a class's instances
    in a table of names they share, with room for 29; a Flask 3.1 app has 27, 28 once it
    rendered a template (``jinja_env``), more with ``ProxyFix`` (``wsgi_app``) or
    Flask-Login (``login_manager``). Past 29 the app's dict leaves the table: on 3.13 that
    costs each request about 5,000 machine instructions, half again what the beacon itself
    adds (``bench/app_attributes.py``, docs/benchmarks.md). So the app gets one attribute,
    ``response_class``, which Flask reads in too many places to be hooked elsewhere.

    The class's ``request_context`` is the last hooked app's own function, which checks
    ``self`` first; the class's other apps, with a beacon or not, go through :meth:`other`
    (an app of its class is rare in a worker: a second app mounted in one process, or a
    test suite's app factory), which finds theirs through ``app.extensions`` or calls the
    class's original. Nothing here holds an app but the class's current function: a test
    suite's apps are freed as before."""

    def __init__(self, cls: type, orig: Callable[[Any, Dict[str, Any]], Any]) -> None:
        self.cls = cls
        self.orig = orig

    def other(self, app: Any, environ: Dict[str, Any]) -> Any:
        fn = getattr(_hook_of(app), "request_context_fn", None)
        if fn is not None and getattr(fn, _CONTEXTS, None) is self:
            return fn(app, environ)
        return self.orig(app, environ)

    def install(self, fn: Callable[[Any, Dict[str, Any]], Any]) -> None:
        with _watch_lock:
            setattr(fn, _CONTEXTS, self)
            self.cls.request_context = fn  # type: ignore[attr-defined]


def _hook_of(app: Any) -> Optional["FlaskHook"]:
    """The app's ``FlaskHook``, found through ``app.extensions``, or None."""
    extensions = getattr(app, "extensions", None)
    beacon = extensions.get(EXTENSION) if type(extensions) is dict else None
    return getattr(beacon, "hook", None)


def _contexts_of(cls: type) -> _Contexts:
    """``cls``'s hooked ``request_context`` (made on its first app): the original is the
    method found on the class before, unwrapped if a base class's is hooked too."""
    with _watch_lock:
        contexts = vars(cls).get(_CONTEXTS)
        if contexts is None:
            orig = cls.request_context  # type: ignore[attr-defined]
            while isinstance(getattr(orig, _CONTEXTS, None), _Contexts):
                orig = getattr(orig, _CONTEXTS).orig  # a base class's hook: skip it
            contexts = _Contexts(cls, orig)
            setattr(cls, _CONTEXTS, contexts)
        return contexts


def _watch_errors(cls: type) -> None:
    """Hook ``should_ignore_error`` on the class that defines it for ``cls`` (once; the hook
    defers to it). Flask calls it only for a request that raised, before it forgets the
    request; the hook finds the app's ``FlaskHook`` through ``app.extensions``.

    On the class, not as an attribute of the app: see :class:`_Contexts`."""
    try:
        with _watch_lock:
            owner = next((k for k in cls.__mro__ if "should_ignore_error" in vars(k)), None)
            if owner is None:
                return
            orig = vars(owner)["should_ignore_error"]
            if getattr(orig, _WATCHED, False):
                return

            @wraps(orig)
            def should_ignore_error(self: Any, error: Optional[BaseException]) -> Any:
                if error is not None:
                    try:
                        hook = _hook_of(self)
                        if hook is not None:
                            hook._raised(error)
                    except Exception:  # noqa: BLE001 - never into Flask's error handling
                        pass
                return orig(self, error)

            setattr(should_ignore_error, _WATCHED, True)
            setattr(owner, "should_ignore_error", should_ignore_error)
    except Exception:  # noqa: BLE001
        _log_failure_once("hooking should_ignore_error")


_SIZES: Dict[str, float] = {}  # Content-Length value -> its float; the first SIZES_CAP seen
SIZES_CAP = 4096


def _parse_size(value: str) -> float:
    size = float(int(value))
    if len(_SIZES) < SIZES_CAP and size >= 0:
        _SIZES[value] = size
    return size


def _werkzeug_response() -> Any:
    """werkzeug's Response class once the app imported it (looked up, never imported)."""
    return getattr(sys.modules.get("werkzeug.wrappers.response"), "Response", None)


def _current_request_ctx() -> Any:
    globals_ = sys.modules.get("flask.globals")
    cv = getattr(globals_, "_cv_request", None)
    if cv is not None:
        return cv.get(None)
    stack = getattr(globals_, "_request_ctx_stack", None)  # Flask < 2.2
    return getattr(stack, "top", None)


def _content_length(headers: Any) -> Optional[int]:
    try:
        for name, value in headers:
            if name.lower() == "content-length":
                size = int(value)
                return size if size >= 0 else None
    except Exception:  # noqa: BLE001 - malformed: unknown
        pass
    return None


def _no_start_response(*args: Any) -> None:
    return None


__all__: List[str] = ["FlaskHook", "Lane", "eligible"]
