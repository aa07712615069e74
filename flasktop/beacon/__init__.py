"""The flasktop beacon: report each request to flasktop over loopback UDP.

Standard library only, never raises into the app, never blocks a request::

    from flasktop.beacon import Beacon
    Beacon(app)                      # or Beacon().init_app(app)

    app = BeaconMiddleware(app)      # any other WSGI app

    gunicorn -c python:flasktop.beacon.gunicorn_conf app:app   # no code change

See docs/beacon.md.
"""

from __future__ import annotations

DEFAULT_PORT = 9711
DEFAULT_ADDRESS = "127.0.0.1:9711"

from typing import Any  # noqa: E402

from flasktop.beacon._address import AddressArg  # noqa: E402
from flasktop.beacon._fast import EXTENSION  # noqa: E402
from flasktop.beacon._flask import Beacon  # noqa: E402
from flasktop.beacon._middleware import BeaconMiddleware  # noqa: E402

__all__ = ["Beacon", "BeaconMiddleware", "DEFAULT_ADDRESS", "DEFAULT_PORT", "instrument"]


def instrument(app: Any, address: AddressArg = None) -> Any:
    """Instrument a WSGI app once: a Flask app gets :class:`Beacon`, any other is wrapped.

    Returns the app to serve (the same Flask app, or the middleware), or ``app``
    unchanged when the beacon is off or ``app`` is already instrumented. Never raises.
    """
    try:
        if (isinstance(app, BeaconMiddleware)
                or isinstance(getattr(app, "wsgi_app", None), BeaconMiddleware)
                or EXTENSION in (getattr(app, "extensions", None) or {})):
            return app
        if _is_flask(app):
            Beacon(app, address)
            return app
        middleware = BeaconMiddleware(app, address)
        return middleware if middleware.enabled else app
    except Exception:  # noqa: BLE001
        return app


def _is_flask(app: Any) -> bool:
    import sys

    flask = sys.modules.get("flask")
    return flask is not None and isinstance(app, getattr(flask, "Flask", ()))
