"""End to end: the real app, fed by the real engine watching a real gunicorn with the beacon,
finds the slow route and the stuck worker on screen (keyboard only, under Pilot)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import List

from flasktop.engine import Engine
from flasktop.ui.app import FlasktopApp
from tests.support import Gunicorn, free_port, gunicorn

ROOT = Path(__file__).resolve().parent.parent.parent


def _rows(app: FlasktopApp, table_id: str) -> List[str]:
    table = app.screen.query_one(f"#{table_id}")
    return [" ".join(str(c) for c in table.get_row(k)) for k in list(table.rows)]


def _hang(g: Gunicorn, stop: threading.Event) -> None:
    """Keep one request stuck in /hang: gunicorn's timeout kills its worker after 12 s (the
    row is stuck from 6 s), then the next one hangs, so a slow machine gets more than one
    chance to see it."""
    while not stop.is_set():
        try:
            g.get("/hang", timeout=60)
        except OSError:
            pass


async def test_the_real_app_shows_the_slow_route_and_the_stuck_worker(tmp_path: Path) -> None:
    udp = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "TROUBLE_RELEASE": str(tmp_path / "release"),
           "PYTHONPATH": str(ROOT)}
    with gunicorn("trouble_app:app", "-w", "3", "--timeout", "12", env=env,
                  workers_expected=3) as g:
        engine = Engine(g.pid, beacon=("127.0.0.1", udp), refresh=0.5, sample_interval=0.5)
        app = FlasktopApp(engine, attaching_to=f"gunicorn {g.pid}")
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                for path in ("/fast/1", "/fast/2", "/fast/3", "/slow"):
                    try:
                        g.get(path, timeout=10)
                    except OSError:
                        pass
                stop.wait(0.05)

        load = threading.Thread(target=traffic, daemon=True)
        try:
            async with app.run_test(size=(120, 40)) as pilot:
                load.start()
                threading.Thread(target=_hang, args=(g, stop), daemon=True).start()
                deadline = time.monotonic() + 60
                slow: List[str] = []
                stuck: List[str] = []
                seen = []
                while time.monotonic() < deadline and not (slow and stuck):
                    await pilot.pause(0.5)
                    slow = slow or [r for r in _rows(app, "routes") if "/slow" in r and "▲" in r]
                    rows = [r for r in _rows(app, "stuck") if "/hang" in r]
                    seen = rows or seen
                    stuck = stuck or [r for r in rows if "wait_for_lock" in r]
                assert slow, _rows(app, "routes")
                assert stuck, seen or _rows(app, "stuck")
                assert not [r for r in _rows(app, "routes") if "/fast" in r and "▲" in r]
                # Enter on the top route (the slow one eats the workers' time) opens it
                await pilot.press("enter")
                await pilot.pause(1.0)
                assert type(app.screen).__name__ == "RouteScreen"
                await pilot.press("escape")
                await pilot.pause(0.3)
                assert type(app.screen).__name__ == "OverviewScreen"
                assert app.render_errors == []
                await pilot.press("q")
        finally:
            stop.set()
            (tmp_path / "release").touch()
            engine.stop()
            if load.is_alive():
                load.join(10)
