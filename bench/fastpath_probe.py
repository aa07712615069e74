"""A probe, not the beacon: what a Flask-specific hook that adds no call of its own costs.

docs/benchmarks.md explains why the beacon's middleware stays above its cost goal. This
measures the design that would meet it, side by side with bare Flask and a clock-only
middleware in one process (fresh hello-world apps, rounds alternating, medians of per-round
CPU differences against bare Flask):

- ``app.request_context`` replaced by a function that appends the start time to a
  per-thread ``array('d')`` and builds the same ``RequestContext``;
- ``app.response_class`` subclassed: its ``__call__`` is werkzeug's three lines, plus
  appending the (status, route, method) group to the same buffer and the end stamp
  callback to werkzeug's ClosingIterator;
- the end stamp: a per-thread bound method appending ``perf_counter()``.

Nothing is sent and the buffers are emptied between rounds: this is the request path's
floor for that design, before any flusher work. It uses Flask and werkzeug internals
(``ClosingIterator._callbacks``) on purpose, to measure, not to ship.

    .venv/bin/python bench/fastpath_probe.py [--rounds 60] [--requests 3000]
"""

from __future__ import annotations

import argparse
import statistics
import threading
from array import array
from threading import Lock, get_native_id
from time import perf_counter
from typing import Any, Callable, Dict, List

from flask import Flask
from flask.ctx import RequestContext
from werkzeug.test import EnvironBuilder

from beacon_overhead import ClockOnly, hello_app, run_round  # the same floor and loop

_tls = threading.local()


def _nothing() -> None:
    return None


class _Thread:
    __slots__ = ("buf", "done", "environ", "groups", "lock", "tid")

    def __init__(self, groups: Dict[Any, float], lock: Lock) -> None:
        self.buf = array("d")
        self.tid = get_native_id()
        self.groups = groups
        self.lock = lock
        self.environ = None
        self.done = self._done

    def _done(self) -> None:
        self.buf.append(perf_counter())
        self.environ = None


def probe_app() -> Flask:
    app = hello_app()
    groups: Dict[Any, float] = {}
    lock = Lock()

    class ProbeResponse(app.response_class):  # type: ignore[name-defined,misc]
        def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
            app_iter, status, headers = self.get_wsgi_response(environ)
            start_response(status, headers)
            t = _tls.t
            if t.environ is environ:
                key = (self._status_code, environ["werkzeug.request"].url_rule.rule,
                       environ["REQUEST_METHOD"])
                gk = t.groups.get(key)
                if gk is None:
                    with t.lock:
                        gk = t.groups.setdefault(key, float(len(t.groups) + 1))
                t.buf.append(gk)
                app_iter._callbacks.append(t.done)
            return app_iter

    def request_context(environ: Dict[str, Any]) -> RequestContext:
        try:
            t = _tls.t
        except AttributeError:
            t = _tls.t = _Thread(groups, lock)
        if t.environ is not None:
            raise RuntimeError("nested request: not handled by this probe")
        t.buf.append(perf_counter())
        t.environ = environ
        return RequestContext(app, environ)

    app.response_class = ProbeResponse
    app.request_context = request_context  # type: ignore[method-assign]
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--requests", type=int, default=3000)
    args = p.parse_args()
    clock = hello_app()
    clock.wsgi_app = ClockOnly(clock.wsgi_app)  # type: ignore[method-assign]
    apps = {"bare flask": hello_app(), "clock-only middleware": clock, "probe": probe_app()}
    base = EnvironBuilder(path="/", base_url="http://127.0.0.1:8000").get_environ()
    names = list(apps)
    cpu: Dict[str, List[float]] = {name: [] for name in names}
    for name in names:
        run_round(apps[name], base, 300, _nothing)
    for r in range(max(2, args.rounds)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            cpu[name].append(run_round(apps[name], base, max(100, args.requests), _nothing))
            t = getattr(_tls, "t", None)
            if t is not None:
                del t.buf[:]
    bare = statistics.median(cpu["bare flask"]) * 1e6
    print(f"Flask hello world in-process, {args.rounds} rounds x {args.requests} requests")
    for name in names:
        added = statistics.median(c - b for c, b in zip(cpu[name], cpu["bare flask"])) * 1e6
        print(f"{name:<24} {statistics.median(cpu[name]) * 1e6:7.2f} us/req  added {added:+.2f}"
              f" ({added / bare * 100:+.1f}%)")


if __name__ == "__main__":
    main()
