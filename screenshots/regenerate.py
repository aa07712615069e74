"""Regenerate the SVG screenshots from the real app watching the real demo.

    .venv/bin/python screenshots/regenerate.py [--wait 240]

Starts `flasktop demo`'s gunicorn app and load, attaches the real engine, runs the
Textual app headless, waits until the demo's troubles are on screen (a slow route,
a leaking worker, a stuck worker), then drives the keyboard into each screen and
saves an SVG of it here: overview (120x40 and 80x24), route, worker, help.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from flasktop.demo import Demo  # noqa: E402
from flasktop.engine import Engine  # noqa: E402
from flasktop.model.snapshot import Snapshot  # noqa: E402
from flasktop.ui.app import FlasktopApp  # noqa: E402


async def wait_for(app: FlasktopApp, pilot, cond: Callable[[Snapshot], bool], seconds: float,
                   what: str) -> Optional[Snapshot]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        snap = app.snapshot
        if snap is not None and cond(snap):
            return snap
        await pilot.pause(0.5)
    print(f"  (gave up waiting for {what} after {seconds:.0f} s)", file=sys.stderr)
    return app.snapshot


def save(app: FlasktopApp, name: str) -> None:
    path = app.save_screenshot(filename=f"{name}.svg", path=str(HERE))
    print(f"  saved {Path(path).relative_to(HERE.parent)}")


async def main(wait: float) -> None:
    with Demo(workers=4, timeout=20) as demo:
        engine = Engine(demo.pid, beacon=("127.0.0.1", demo.beacon_port))
        app = FlasktopApp(engine, attaching_to=f"the demo (gunicorn {demo.pid})")
        async with app.run_test(size=(120, 40)) as pilot:
            print("waiting for the demo's troubles to show (a leak takes a couple of minutes)...")
            await wait_for(app, pilot, lambda s: any(w.leak_suspected for w in s.workers)
                           and any(r.slow for r in s.routes), wait, "a leak and a slow route")
            snap = await wait_for(app, pilot, lambda s: any(w.state == "stuck" for w in s.workers),
                                  60, "a stuck worker")
            await pilot.pause(0.3)
            save(app, "overview")
            await pilot.resize_terminal(80, 24)
            await pilot.pause(1.2)
            save(app, "overview-80x24")
            await pilot.resize_terminal(120, 40)
            await pilot.pause(1.2)

            # Enter on the top route (the one taking most of the workers' time)
            await pilot.press("enter")
            await pilot.pause(1.5)
            save(app, "route")
            await pilot.press("escape")
            await pilot.pause(0.5)

            # the stuck worker (else the first one): Tab to the memory pane, down to its row
            stuck = next((w.pid for w in (snap.workers if snap else ()) if w.state == "stuck"), None)
            await pilot.press("tab")
            table = app.screen.query_one("#memory")
            pids = [int(str(k.value)) for k in table.rows]
            if stuck in pids:
                for _ in range(pids.index(stuck)):
                    await pilot.press("down")
            await pilot.press("enter")
            await pilot.pause(2.5)
            save(app, "worker")
            await pilot.press("escape")
            await pilot.pause(0.3)
            await pilot.press("question_mark")
            await pilot.pause(0.3)
            save(app, "help")
            await pilot.press("escape")
        engine.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--wait", type=float, default=240.0, help="seconds to wait for a leak verdict")
    asyncio.run(main(ap.parse_args().wait))
