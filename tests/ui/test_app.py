"""The whole app under Pilot, fed fixed snapshots by a FixedFeed."""

from __future__ import annotations

from dataclasses import replace

import pytest
from rich.text import Text

from flasktop.ui.app import FlasktopApp
from flasktop.ui.help import HelpScreen
from flasktop.ui.messages import SnapshotReady
from flasktop.ui.overview import MemoryTable, OverviewScreen, RoutesTable, StuckTable
from flasktop.ui.route import RouteScreen, SlowestTable
from flasktop.ui.widgets import Line
from flasktop.ui.worker import WorkerScreen
from tests.ui.fixtures import (
    BUSY_PID,
    HOSTILE,
    IDLE_PID,
    LEAK_PID,
    MASTER_PID,
    STUCK_PID,
    FixedFeed,
    routes,
    snapshot,
    timeout_event,
)
from tests.ui.helpers import cell, push, row_keys, running, screen_text, settle, shows

ROUTE_KEYS = ["GET /export", "GET /orders/<int:oid>", "POST /login", "GET /health"]
WORKER_KEYS = [str(p) for p in (IDLE_PID, BUSY_PID, LEAK_PID, STUCK_PID)]


def line(app: FlasktopApp, selector: str) -> str:
    return app.screen.query_one(selector, Line).plain


async def test_attaching_message_until_the_first_snapshot() -> None:
    async with running() as (app, pilot, feed):
        assert feed.started == 1
        assert f"attaching to gunicorn {MASTER_PID}…" in screen_text(app)
        await push(pilot, feed, snapshot(0))
        text = await shows(pilot, ("Slow routes", "Memory", "Stuck workers"))
        assert "attaching" not in text
        assert "Slow routes" in text and "Memory" in text and "Stuck workers" in text


async def test_overview_shows_master_routes_memory_and_stuck_workers() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        header = line(app, "#header")
        for part in (f"master {MASTER_PID}", "sync", "workers 4/4", "timeout 1m00s", "10 req/s", "err 2.0%",
                     "py-spy ✓ ok", "lost 3"):
            assert part in header
        routes_t = app.screen.query_one(RoutesTable)
        assert row_keys(routes_t) == ROUTE_KEYS
        assert cell(routes_t, "GET /export", "route").startswith("▲ ")
        assert not cell(routes_t, "POST /login", "route").startswith("▲")
        assert cell(routes_t, "GET /export", "p99") == "4.50s"
        memory = app.screen.query_one(MemoryTable)
        assert row_keys(memory) == WORKER_KEYS
        assert cell(memory, str(LEAK_PID), "leak") == "LEAK"
        assert cell(memory, str(IDLE_PID), "leak") == ""
        trend = cell(memory, str(LEAK_PID), "trend")
        assert set(trend.lstrip()) <= set("▁▂▃▄▅▆▇█") and trend.endswith("█")  # newest on the right
        stuck = app.screen.query_one(StuckTable)
        assert row_keys(stuck) == [str(STUCK_PID)]
        assert cell(stuck, str(STUCK_PID), "for") == "41s / 1m00s"
        assert cell(stuck, str(STUCK_PID), "route") == "/export"
        assert cell(stuck, str(STUCK_PID), "frame") == "wait_for_lock (reports.py:88)"
        assert "worker 4104 stuck 41s" in line(app, "#problems")


async def test_stuck_time_from_stacks_is_a_lower_bound() -> None:
    async with running([snapshot(0, stack_source="stack")]) as (app, pilot, feed):
        assert cell(app.screen.query_one(StuckTable), str(STUCK_PID), "for") == "≥41s / 1m00s"


async def test_cells_are_updated_in_place_and_the_cursor_stays_on_its_row() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        table = app.screen.query_one(RoutesTable)
        await pilot.press("down", "down")
        assert table.cursor_key == "POST /login"
        keys_before = {str(k.value): k for k in table.rows}
        swapped = tuple(replace(r, share=0.9) if r.route == "/health" else r for r in routes(1))
        await push(pilot, feed, snapshot(1, route_list=swapped))
        assert row_keys(table) == ["GET /health", "GET /export", "GET /orders/<int:oid>", "POST /login"]
        assert table.cursor_key == "POST /login"
        assert table.cursor_row == 3
        assert cell(table, "GET /export", "rate") == "3.0/s"
        # the same row objects: rows were updated, never cleared and refilled
        assert all(k is keys_before[str(k.value)] for k in table.rows)


async def test_an_untouched_cursor_stays_on_the_worst_route() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        table = app.screen.query_one(RoutesTable)
        swapped = tuple(replace(r, share=0.9) if r.route == "/health" else r for r in routes(1))
        await push(pilot, feed, snapshot(1, route_list=swapped))
        assert table.cursor_row == 0 and table.cursor_key == "GET /health"


async def test_rows_go_when_a_worker_disappears() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        await push(pilot, feed, snapshot(1, drop=[STUCK_PID], events=(timeout_event(),)))
        assert row_keys(app.screen.query_one(MemoryTable)) == WORKER_KEYS[:3]
        assert row_keys(app.screen.query_one(StuckTable)) == []
        assert "no stuck workers" in line(app, "#stuck-note")
        assert "workers 3/4" in line(app, "#header")


async def test_hostile_text_is_shown_literally() -> None:
    async with running([snapshot(0, hostile=True)], size=(120, 50)) as (app, pilot, feed):
        table = app.screen.query_one(RoutesTable)
        for name in HOSTILE:
            value = table.get_cell(f"GET {name}", "route")
            assert isinstance(value, Text)
            assert all(span.end <= 2 for span in value.spans)  # only our slow mark is styled
            assert "\x1b" not in value.plain
        assert cell(table, "GET [/]", "route") == "  GET [/]"
        assert cell(table, "GET /clear\x1b[2J", "route") == "  GET /clear␛[2J"
        svg = app.export_screenshot()
        text = screen_text(app)
        for literal in ("GET [/]", "GET [link=http://x]y", "GET [bold red]x", "GET /clear␛[2J",
                        "GET /osc␛]8;;http://evil/␛\\click␛]8;;␛\\"):
            assert literal in text
        assert "\x1b" not in svg


async def test_filter_narrows_routes_and_workers_and_escape_clears_it() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        assert "Clear filter" not in screen_text(app)
        await pilot.press("slash", "o", "r", "d")
        assert "filter ord" in screen_text(app) and "Clear filter" in screen_text(app)
        routes_t, memory = app.screen.query_one(RoutesTable), app.screen.query_one(MemoryTable)
        assert row_keys(routes_t) == ["GET /orders/<int:oid>"]
        assert row_keys(memory) == [str(BUSY_PID)]
        await pilot.press("enter")
        assert app.screen.focused is routes_t
        await push(pilot, feed, snapshot(1))
        assert row_keys(routes_t) == ["GET /orders/<int:oid>"]
        await pilot.press("escape")
        assert row_keys(routes_t) == ROUTE_KEYS
        assert row_keys(memory) == WORKER_KEYS


async def test_filter_with_no_match_says_so() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        await pilot.press("slash", "z", "z", "enter")
        assert row_keys(app.screen.query_one(RoutesTable)) == []
        assert "no route matches zz" in line(app, "#routes-note")


async def test_sort_key_cycles_the_route_columns_and_marks_the_header() -> None:
    async with running([snapshot(0, hostile=False)]) as (app, pilot, feed):
        table = app.screen.query_one(RoutesTable)
        await pilot.press("s")
        assert table.sort_key == "p95"
        assert table.columns["p95"].label.plain == "p95▼"
        assert row_keys(table) == ROUTE_KEYS  # p95 order happens to match busy time here
        await pilot.press("s", "s", "s", "s", "s")
        assert table.sort_key == "route"
        assert row_keys(table) == ["GET /export", "GET /health", "GET /orders/<int:oid>", "POST /login"]
        await pilot.press("S")
        assert row_keys(table) == ["POST /login", "GET /orders/<int:oid>", "GET /health", "GET /export"]
        await push(pilot, feed, snapshot(1))
        assert row_keys(table) == ["POST /login", "GET /orders/<int:oid>", "GET /health", "GET /export"]


async def test_sort_applies_to_the_focused_memory_table() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        await pilot.press("tab")
        memory = app.screen.query_one(MemoryTable)
        assert app.screen.focused is memory
        await pilot.press("s")
        assert memory.sort_key == "rss"
        assert row_keys(memory) == [str(LEAK_PID), str(STUCK_PID), str(BUSY_PID), str(IDLE_PID)]
        assert app.screen.query_one(RoutesTable).sort_key == "share"


async def test_pause_freezes_the_view_and_unpause_jumps_to_the_latest() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        table = app.screen.query_one(RoutesTable)
        assert cell(table, "GET /export", "rate") == "2.5/s"
        await pilot.press("p")
        assert "PAUSED" in screen_text(app)
        await push(pilot, feed, snapshot(1))
        await push(pilot, feed, snapshot(2))
        assert cell(table, "GET /export", "rate") == "2.5/s"
        assert "PAUSED +2" in line(app, "#header")
        assert app.snapshot is not app.latest
        await pilot.press("p")
        assert cell(table, "GET /export", "rate") == "3.5/s"
        assert "PAUSED" not in screen_text(app)


async def test_help_lists_the_keys_and_escape_closes_it() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        keys = ("Enter", "Esc", "filter", "sort", "pause", "quit", "Tab")
        text = await shows(pilot, keys)
        for key in keys:
            assert key in text
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)


async def test_route_drill_down_updates_live_and_keeps_data_when_the_route_goes() -> None:
    async with running([snapshot(0)], size=(120, 40)) as (app, pilot, feed):
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(app.screen, RouteScreen))
        screen = app.screen
        assert isinstance(screen, RouteScreen) and screen.key == "GET /export"
        await pilot.pause()
        assert "GET /export" in line(app, "#title") and "100 requests" in line(app, "#title")
        slowest = screen.query_one(SlowestTable)
        assert slowest.row_count == 5
        assert cell(slowest, row_keys(slowest)[0], "duration") == "7.20s"
        assert "wait_for_lock (reports.py:88)" in line(app, "#frames")
        text = await shows(pilot, ("Latency over time", "p95", "Distribution"))
        assert "Latency over time" in text and "p95" in text and "Distribution" in text
        await push(pilot, feed, snapshot(1))
        assert "110 requests" in line(app, "#title")
        await push(pilot, feed, snapshot(2, route_list=routes(2)[1:]))
        assert "110 requests" in line(app, "#title")
        assert "no longer reported" in line(app, "#banner")
        await push(pilot, feed, snapshot(3, master_alive=False, route_list=routes(3)[1:]))
        banner = line(app, "#banner").split("\n")
        assert banner[0].startswith(f"⚠ master {MASTER_PID} is gone") and "no longer reported" in banner[1]
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)
        assert row_keys(app.screen.query_one(RoutesTable)) == ROUTE_KEYS[1:]


async def test_worker_drill_down_focuses_the_feed_and_reports_the_exit() -> None:
    async with running([snapshot(0)], size=(120, 40)) as (app, pilot, feed):
        await pilot.press("tab", "down", "down", "down", "enter")
        await settle(pilot, lambda: isinstance(app.screen, WorkerScreen))
        screen = app.screen
        assert isinstance(screen, WorkerScreen) and screen.pid == STUCK_PID
        await settle(pilot, lambda: feed.focused[-1:] == [STUCK_PID])
        stacks = line(app, "#stacks")
        assert "serving GET /export for 41s" in stacks and "wait_for_lock (reports.py:88)" in stacks
        assert "heartbeat␛[31m" in stacks and "heartbeat␛[31m" in screen_text(app)
        assert "RSS" in screen_text(app) and "Open file descriptors" in screen_text(app)
        await push(pilot, feed, snapshot(1, drop=[STUCK_PID], events=(timeout_event(),)))
        banner = line(app, "#banner")
        assert f"worker {STUCK_PID} exited: killed by gunicorn's timeout" in banner
        assert "wait_for_lock (reports.py:88)" in line(app, "#stacks")  # the last data stays
        assert "timeout_killed" in line(app, "#wevents")
        await pilot.press("escape")
        await settle(pilot, lambda: feed.focused[-1:] == [None])
        assert isinstance(app.screen, OverviewScreen)


async def test_from_a_slow_request_to_its_worker_and_back() -> None:
    async with running([snapshot(0)], size=(120, 40)) as (app, pilot, feed):
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(app.screen, RouteScreen))
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(app.screen, WorkerScreen))
        assert app.screen.pid == STUCK_PID
        await pilot.press("escape")
        await settle(pilot, lambda: isinstance(app.screen, RouteScreen) and feed.focused[-1:] == [None])
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)


async def test_missing_beacon_says_how_to_add_it() -> None:
    async with running([snapshot(0, beacon="missing")]) as (app, pilot, feed):
        note = line(app, "#routes-note")
        assert "Beacon(app)" in note and "flasktop.beacon" in note
        assert "gunicorn -c python:flasktop.beacon.gunicorn_conf" in note
        assert "beacon ✗ missing" in line(app, "#header")


async def test_pyspy_denied_is_explained_where_stacks_would_be() -> None:
    async with running([snapshot(0, pyspy="denied")]) as (app, pilot, feed):
        assert "py-spy denied: ptrace not permitted" in line(app, "#banner")
        assert "no stacks: py-spy denied" in line(app, "#stuck-note")


async def test_master_gone_shows_a_banner_and_keeps_the_data() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        await push(pilot, feed, snapshot(1, master_alive=False))
        assert f"master {MASTER_PID} is gone" in line(app, "#banner")
        assert row_keys(app.screen.query_one(RoutesTable)) == ROUTE_KEYS


@pytest.mark.parametrize("size", [(80, 24), (20, 5)])
async def test_every_screen_survives_small_and_large_terminals(size: tuple) -> None:
    async with running([snapshot(0)], size=size) as (app, pilot, feed):
        await push(pilot, feed, snapshot(1))
        app.post_message(SnapshotReady(snapshot(2)))
        app.screen.query_one(RoutesTable).focus()
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(app.screen, RouteScreen))
        await push(pilot, feed, snapshot(3))
        await pilot.press("escape")
        app.screen.query_one(MemoryTable).focus()
        await pilot.press("enter")
        await settle(pilot, lambda: isinstance(app.screen, WorkerScreen))
        await push(pilot, feed, snapshot(4, drop=[IDLE_PID]))
        await pilot.resize_terminal(20, 5)
        await pilot.pause()
        await pilot.resize_terminal(*size)
        await pilot.press("escape", "question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)


async def test_at_80x24_every_pane_and_the_keys_are_visible() -> None:
    async with running([snapshot(0, pyspy="denied")], size=(80, 24)) as (app, pilot, feed):
        parts = ("master 4100", "Slow routes", "Memory", "Stuck workers", "▲ GET /export", "LEAK",
                 "41s / 1m00s", "Filter", "Sort", "Quit", "Help", "Pause", "3 problems")
        text = await shows(pilot, parts)
        for part in parts:
            assert part in text, part


async def test_a_timeout_assumed_because_the_title_hides_the_arguments_is_marked() -> None:
    from flasktop.report import render
    snap = snapshot(0)
    assumed = replace(snap, master=replace(snap.master, timeout_assumed=True))
    async with running([assumed], size=(120, 30)) as (app, pilot, feed):
        assert "timeout 1m00s?" in await shows(pilot, ["timeout 1m00s?"])
        await push(pilot, feed, snapshot(1))
        assert "timeout 1m00s " in await shows(pilot, ["timeout 1m00s "])
    report = render(assumed)
    assert "timeout 60s?," in report and "assumed" in report and "setproctitle" in report
    assert "assumed" not in render(snap)


async def test_gunicorns_timeout_0_shows_as_none() -> None:
    from flasktop.report import render
    snap = snapshot(0)
    none = replace(snap, master=replace(snap.master, timeout=0.0))
    async with running([none], size=(120, 30)) as (app, pilot, feed):
        assert "timeout none " in await shows(pilot, ["timeout none "])
    assert "timeout none," in render(none)


async def test_snapshots_pushed_from_another_thread_are_shown() -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        snap = snapshot(5)
        feed.push_from_thread(snap)
        await settle(pilot, lambda: app.snapshot is snap)
        assert cell(app.screen.query_one(RoutesTable), "GET /export", "rate") == "5.0/s"


def test_a_newer_snapshot_replaces_a_queued_one() -> None:
    a, b = snapshot(0), snapshot(1)
    assert SnapshotReady(b).can_replace(SnapshotReady(a))


async def test_a_rendering_error_is_reported_and_the_app_keeps_running(monkeypatch: pytest.MonkeyPatch) -> None:
    async with running([snapshot(0)]) as (app, pilot, feed):
        def broken(self: OverviewScreen, snap: object) -> None:
            raise ValueError("boom")

        monkeypatch.setattr(OverviewScreen, "show", broken)
        await push(pilot, feed, snapshot(1))
        assert app.render_errors == ["ValueError: boom"]
        assert app.is_running
        monkeypatch.undo()
        await push(pilot, feed, snapshot(2))
        assert cell(app.screen.query_one(RoutesTable), "GET /export", "rate") == "3.5/s"
        app.render_errors.clear()


@pytest.mark.parametrize("make", [lambda: WorkerScreen(BUSY_PID), lambda: RouteScreen("GET /export"),
                                  HelpScreen], ids=["worker", "route", "help"])
async def test_a_screen_closed_as_soon_as_it_is_pushed_leaves_no_traceback(make) -> None:
    """Enter then q, faster than a loaded machine composes the screen: Textual mounts no
    children into a closing screen, and its Mount must not go looking for them."""
    feed = FixedFeed()
    app = FlasktopApp(feed, attaching_to=str(MASTER_PID))
    async with app.run_test(size=(80, 24)) as pilot:
        await push(pilot, feed, snapshot(0))
        app.push_screen(make())
        app.exit()
    assert app.return_code == 0 and app.render_errors == []


def test_a_snapshot_that_arrives_after_the_last_screen_left_is_ignored() -> None:
    """The feed's thread posts snapshots until it is stopped: one can be handled after
    the app's screen stack emptied on the way out (seen once under load in CI)."""
    app = FlasktopApp(FixedFeed())
    assert not app.screen_stack  # as at the end of a run
    app.on_snapshot_ready(SnapshotReady(snapshot(0)))
    app.paused = True
    app.on_snapshot_ready(SnapshotReady(snapshot(1)))
    assert app.render_errors == [] and app.pending == 1


async def test_quit_stops_the_feed() -> None:
    feed = FixedFeed()
    app = FlasktopApp(feed)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert feed.stopped == 1
    assert app.return_code == 0


async def test_no_color_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    async with running([snapshot(0)]) as (app, pilot, feed):
        assert app.no_color
        assert "LEAK" in screen_text(app)

