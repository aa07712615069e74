"""The demo Flask app: one route for each kind of trouble flasktop is built to show.

Served by gunicorn under ``flasktop demo``, instrumented with the beacon. Every
misbehaviour is bounded: the leak stops growing at LEAK_CAP_BYTES per worker,
the hang ends by itself (or by gunicorn's timeout, which is the point).
"""

from __future__ import annotations

import random
import threading
import time

from flask import Flask, jsonify

from flasktop.beacon import Beacon

app = Flask(__name__)
Beacon(app)

LEAK_CHUNK = 512 * 1024
LEAK_CAP_BYTES = 300 * 1024 * 1024
_leaked: list = []
_export_lock = threading.Lock()
_export_lock.acquire()  # held forever: whoever waits on it hangs until gunicorn's timeout


class PaymentGatewayError(RuntimeError):
    pass


@app.route("/")
def index():
    return "flasktop demo\n"


@app.route("/api/items/<int:item_id>")
def item(item_id: int):
    time.sleep(random.uniform(0.002, 0.008))
    return jsonify(id=item_id, name=f"item {item_id}")


def build_rows(n: int) -> list:
    """The slow part of a report: a query that should have had an index."""
    time.sleep(random.uniform(0.35, 0.9))
    return [{"row": i} for i in range(n)]


@app.route("/reports/<name>")
def report(name: str):
    rows = build_rows(200)
    return jsonify(report=name, rows=len(rows))


def remember(key: str) -> None:
    """A cache with no eviction: every request keeps half a megabyte alive."""
    if len(_leaked) * LEAK_CHUNK < LEAK_CAP_BYTES:
        _leaked.append(bytearray(LEAK_CHUNK))


@app.route("/cache/<key>")
def cache(key: str):
    remember(key)
    return jsonify(cached=len(_leaked))


def wait_for_lock() -> None:
    """Waits on a lock nobody releases: gunicorn's timeout kills the worker first."""
    _export_lock.acquire(timeout=120)


@app.route("/export")
def export():
    wait_for_lock()
    return "exported\n"


def call_payment_api() -> None:
    """A slow third-party call that sometimes fails."""
    time.sleep(random.uniform(0.04, 0.15))
    if random.random() < 0.3:
        raise PaymentGatewayError("gateway timed out")


@app.route("/checkout", methods=["POST"])
def checkout():
    call_payment_api()
    return jsonify(ok=True)
