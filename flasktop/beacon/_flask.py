"""The Flask extension: ``Beacon(app)`` or ``Beacon().init_app(app)``."""

from __future__ import annotations

import logging
from typing import Any, Optional

from flasktop.beacon._address import AddressArg, choose
from flasktop.beacon._fast import EXTENSION, FlaskHook, eligible
from flasktop.beacon._middleware import BeaconMiddleware
from flasktop.beacon._reporter import EXC, RULE, HasReporter, Reporter, find_record, reporter_for

log = logging.getLogger("flasktop.beacon")



class Beacon(HasReporter):
    """Report every request of a Flask app to flasktop over loopback UDP.

    ``address`` beats ``app.config["FLASKTOP_BEACON"]``, which beats the environment
    variable ``FLASKTOP_BEACON``, which beats ``DEFAULT_ADDRESS``; ``"off"`` at the
    winning level turns it off (the app is then not wrapped at all).
    """

    def __init__(self, app: Any = None, address: AddressArg = None) -> None:
        self.address = address
        self.middleware: Optional[BeaconMiddleware] = None  # when the fast path can't be had
        self.hook: Optional[FlaskHook] = None  # the Flask fast path
        self.reporter: Optional[Reporter] = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        """Wrap ``app.wsgi_app``. Never raises: a failure leaves the app as it was."""
        try:
            self._init_app(app)
        except Exception:  # noqa: BLE001
            log.warning("flasktop beacon: not installed on %r", app, exc_info=True)

    def _init_app(self, app: Any) -> None:
        existing = app.wsgi_app
        if isinstance(existing, BeaconMiddleware):
            self.middleware, self.reporter = existing, existing.reporter
            return
        if EXTENSION in app.extensions:  # already in (fast, or under another middleware)
            other = app.extensions[EXTENSION]
            self.middleware, self.hook, self.reporter = other.middleware, other.hook, other.reporter
            return
        if eligible(app):
            reporter = reporter_for(choose(self.address, app.config))
            if reporter is None:
                return
            self.hook = FlaskHook(app, reporter)
            self.reporter = reporter
            app.extensions[EXTENSION] = self
            return
        middleware = BeaconMiddleware(existing, self.address, config=app.config)
        if not middleware.enabled:
            return
        _watch_exceptions(app)
        app.wsgi_app = middleware
        app.extensions[EXTENSION] = self
        self.middleware, self.reporter = middleware, middleware.reporter



def _record_exception(sender: Any, exception: Optional[BaseException] = None, **_: Any) -> None:
    """got_request_exception: Flask is about to turn ``exception`` into a 500."""
    if exception is None:
        return
    try:
        from flask import request

        rec = find_record(request.environ)
        if rec is not None:
            rec[EXC] = type(exception).__name__
            if rec[RULE] is None:  # the exception may propagate past start_response
                rec[RULE] = request.url_rule
    except Exception:  # noqa: BLE001
        pass


def _teardown(exc: Optional[BaseException]) -> None:
    if exc is not None:
        _record_exception(None, exc)


def _watch_exceptions(app: Any) -> None:
    """Learn exception types on the exception path only (a signal), else via teardown."""
    try:
        from flask import signals

        if getattr(signals, "signals_available", True):
            signals.got_request_exception.connect(_record_exception, app, weak=False)
            return
    except Exception:  # noqa: BLE001 - no blinker on an old Flask
        pass
    app.teardown_request(_teardown)
