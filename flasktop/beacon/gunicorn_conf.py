"""A gunicorn config that instruments the app without touching its code.

    gunicorn -c python:flasktop.beacon.gunicorn_conf app:app

Or, in your own gunicorn config file::

    from flasktop.beacon.gunicorn_conf import post_worker_init

Only hook names live at module level: gunicorn reads every setting name it finds here.
"""

from __future__ import annotations

from typing import Any


def post_worker_init(worker: Any) -> None:
    """Wrap ``worker.wsgi`` (a Flask app gets ``Beacon``) and start the heartbeat now."""
    from flasktop.beacon import BeaconMiddleware, instrument
    from flasktop.beacon._fast import EXTENSION
    from flasktop.beacon._reporter import gunicorn_settings

    try:
        worker.wsgi = instrument(worker.wsgi)
        app = worker.wsgi
        beacon = (getattr(app, "extensions", None) or {}).get(EXTENSION)
        if isinstance(app, BeaconMiddleware):
            reporter = app.reporter
        else:  # a Flask app: its Beacon's reporter (fast path or middleware)
            reporter = getattr(beacon, "reporter", None)
        if reporter is not None:
            settings = gunicorn_settings(worker.cfg)
            if settings is not None:
                reporter.gunicorn = settings
            reporter.start()
    except Exception:  # noqa: BLE001 - the worker must boot whatever happens here
        import logging

        logging.getLogger("flasktop.beacon").warning(
            "flasktop beacon: gunicorn hook failed; serving uninstrumented", exc_info=True)
