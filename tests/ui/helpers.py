"""Running the app under Pilot and reading back what it shows."""

from __future__ import annotations

import html
import re
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Dict, List, Sequence, Tuple

from textual.pilot import Pilot

from flasktop.model.snapshot import Snapshot
from flasktop.ui.app import FlasktopApp
from flasktop.ui.widgets import KeyedTable
from tests.ui.fixtures import MASTER_PID, FixedFeed

_TEXT = re.compile(r'<text[^>]*\bx="([0-9.]+)"[^>]*\by="([0-9.]+)"[^>]*>(.*?)</text>', re.S)


def screen_text(app: FlasktopApp) -> str:
    """The screen as plain lines, read from the exported SVG screenshot."""
    svg = app.export_screenshot()
    rows: Dict[float, List[Tuple[float, str]]] = {}
    for x, y, body in _TEXT.findall(svg):
        rows.setdefault(float(y), []).append((float(x), html.unescape(body).replace("\xa0", " ")))
    return "\n".join("".join(t for _, t in sorted(parts)) for _, parts in sorted(rows.items()))


def row_keys(table: KeyedTable) -> List[str]:
    return [str(r.key.value) for r in table.ordered_rows]


def cell(table: KeyedTable, row: str, column: str) -> str:
    return table.get_cell(row, column).plain


async def settle(pilot: Pilot, until: Callable[[], bool], tries: int = 50) -> None:
    """Let the app process messages until `until()` holds (bounded; no sleeping)."""
    for _ in range(tries):
        if until():
            return
        await pilot.pause()
    assert until(), "condition never held"


async def shows(pilot: Pilot, parts: Sequence[str], timeout: float = 10.0) -> str:
    """The screen's text once every one of ``parts`` is on it, or at the deadline (the
    caller's asserts then say what is missing). The footer's keys, for one, arrive a
    refresh after the screen: a loaded machine can take a while to get there."""
    app = pilot.app
    assert isinstance(app, FlasktopApp)
    deadline = time.monotonic() + timeout
    while True:
        text = screen_text(app)
        if all(part in text for part in parts) or time.monotonic() > deadline:
            return text
        await pilot.pause(0.05)


async def push(pilot: Pilot, feed: FixedFeed, snap: Snapshot) -> None:
    feed.push(snap)
    app = pilot.app
    assert isinstance(app, FlasktopApp)
    await pilot.pause()
    await settle(pilot, lambda: app.latest is snap)


@asynccontextmanager
async def running(snaps: Sequence[Snapshot] = (), size: Tuple[int, int] = (100, 30)
                  ) -> AsyncIterator[Tuple[FlasktopApp, Pilot, FixedFeed]]:
    feed = FixedFeed()
    app = FlasktopApp(feed, attaching_to=str(MASTER_PID))
    async with app.run_test(size=size) as pilot:
        for snap in snaps:
            await push(pilot, feed, snap)
        yield app, pilot, feed
        assert app.render_errors == []
