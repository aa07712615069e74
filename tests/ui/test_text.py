"""The pure pieces: safe text, number formats, charts and panes rendered without an app."""

from __future__ import annotations

import unicodedata

import pytest
from rich.console import Console
from rich.text import Text

from flasktop.model.snapshot import HotFrame, LatencyPoint, Problem, WorkerEvent
from flasktop.ui.overview import banner_text, header_text
from flasktop.textsafe import PLACEHOLDER
from flasktop.ui.text import (
    fmt_bytes,
    fmt_duration,
    fmt_ms,
    fmt_pct,
    fmt_rate,
    hbar,
    monochrome,
    safe_text,
    sparkline,
)
from flasktop.ui.widgets import Histogram, LatencyChart, SeriesChart, events_text, problems_text, share_bars
from flasktop.ui.worker import exit_reason, stacks_text
from tests.ui.fixtures import HOSTILE, STUCK_PID, T0, snapshot, timeout_event

UNSAFE = ["\x00", "\x07", "\x1b", "\t", "\n", "\r", "\x7f", "\x85", "\x9b", "\u200b", "\u200d", "\u200e",
          "\u202a", "\u202e", "\u2066", "\u2069", "\u2028", "\ufeff", "\udcff"]


def rendered(text: Text, width: int = 200) -> str:
    console = Console(width=width, file=None, force_terminal=True, color_system="truecolor", record=True)
    with console.capture() as cap:
        console.print(text)
    return cap.get()


@pytest.mark.parametrize("ch", UNSAFE)
def test_safe_text_replaces_every_unsafe_character_visibly(ch: str) -> None:
    out = safe_text(f"a{ch}b")
    assert isinstance(out, Text) and out.spans == []
    assert out.plain[0] == "a" and out.plain[-1] == "b" and len(out.plain) == 3
    assert ch not in out.plain
    middle = out.plain[1]
    assert middle == PLACEHOLDER or unicodedata.name(middle).startswith("SYMBOL FOR")


def test_escape_sequences_show_as_control_pictures() -> None:
    assert safe_text("/clear\x1b[2J").plain == "/clear␛[2J"
    assert safe_text("\x1b]8;;http://x\x1b\\y").plain == "␛]8;;http://x␛\\y"


@pytest.mark.parametrize("name", HOSTILE)
def test_markup_is_never_parsed(name: str) -> None:
    out = safe_text(name)
    assert out.spans == []
    screen = rendered(out)
    assert out.plain in screen
    assert "\x1b]8" not in screen  # no hyperlink escape was emitted


def test_safe_text_caps_length_and_keeps_the_style_we_ask_for() -> None:
    out = safe_text("x" * 500, limit=20, style="bold")
    assert len(out.plain) == 20 and out.plain.endswith("…")
    assert out.style == "bold"
    assert safe_text(12345).plain == "12345"


def test_formats() -> None:
    assert [fmt_ms(v) for v in (None, 0.25, 4.21, 45.4, 1234, 12345, 125_000)] == \
        ["—", "0.25ms", "4.2ms", "45ms", "1.23s", "12.3s", "2m05s"]
    assert [fmt_duration(v) for v in (41, 125, 3700, 90000)] == ["41s", "2m05s", "1h01m", "1d01h"]
    assert [fmt_bytes(v) for v in (None, 512, 2048, 5 * 2 ** 20, 300 * 2 ** 20, 3 * 2 ** 30)] == \
        ["—", "512B", "2.0K", "5.0M", "300M", "3.0G"]
    assert [fmt_rate(v) for v in (0, 0.05, 2.5, 123.4)] == ["0/s", "<0.1/s", "2.5/s", "123/s"]
    assert [fmt_pct(v) for v in (0, 0.0005, 0.027, 0.55)] == ["0%", "<0.1%", "2.7%", "55%"]


def test_sparkline_and_bar() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5], 10) == "▁▁▁"
    assert sparkline(list(range(100)), 4) == "▁▃▆█"
    assert hbar(0.5, 4) == "██  " and hbar(1.5, 3) == "███" and hbar(0.5, 1) == "▌"


def test_monochrome_keeps_meaning_without_colour() -> None:
    text = Text("ok ", "green")
    text.append("LEAK", "bold red")
    text.append(" slow", "yellow")
    mono = monochrome(text)
    assert mono.plain == text.plain
    styles = [sp.style for sp in mono.spans]
    assert all(s.color is None and s.bgcolor is None for s in styles)
    assert styles[0].bold and styles[0].underline  # was red
    assert styles[1].bold and not styles[1].underline  # was yellow


def test_problems_collapse_to_one_line_with_a_count() -> None:
    problems = snapshot(0).problems
    one = problems_text(problems, 1)
    assert "\n" not in one.plain and one.plain.startswith("3 problems ▸ ● worker 4104 stuck")
    three = problems_text(problems, 3).plain.split("\n")
    assert len(three) == 3 and "grows 6.5 MB/min" in three[1]
    two = problems_text(problems, 2).plain.split("\n")
    assert two[-1].strip() == "+2 more"
    assert "no problems" in problems_text((), 3).plain
    hostile = problems_text((Problem("x", 1, "[bold]\x1b[2J"),), 1)
    assert "[bold]␛[2J" in hostile.plain


def test_events_newest_first_relative_to_the_snapshot_clock() -> None:
    evs = (WorkerEvent(T0 - 60, "started", 1, "worker 1 started"), timeout_event())
    lines = events_text(evs, T0 + 60, 10).plain.split("\n")
    assert "10s ago" in lines[0] and "timeout_killed" in lines[0]
    assert "2m00s ago" in lines[1]
    assert len(events_text(evs, T0 + 60, 1).plain.split("\n")) == 1


def test_header_and_banner() -> None:
    snap = snapshot(0, pyspy="denied", master_alive=False)
    header = header_text(snap, paused=True, pending=3, attaching_to="4100").plain
    assert header.startswith(" PAUSED +3 ")
    assert "py-spy ✗ denied" in header
    banner = banner_text(snap).plain.split("\n")
    assert banner[0].startswith("⚠ master 4100 is gone")
    assert banner[1].startswith("⚠ py-spy denied: ptrace not permitted")
    assert header_text(None, paused=False, pending=0, attaching_to="[x]\x1b").plain.endswith(
        "attaching to gunicorn [x]␛")
    assert banner_text(snapshot(0)).plain == ""


def test_latency_chart_fits_its_box_and_puts_p99_on_top() -> None:
    chart = LatencyChart()
    pts = tuple(LatencyPoint(T0 + k, 1, 30.0, 50.0, 100.0) for k in range(10))
    chart.points = pts
    lines = chart.lines(40, 10)
    assert len(lines) == 10
    assert all(len(line.plain) <= 40 for line in lines)
    top = lines[0]
    assert "100ms" in top.plain and "█" in top.plain
    assert not any("dim" in str(sp.style) for sp in top.spans if sp.start >= 7)  # bars are not dimmed
    assert lines[-1].plain.split() == ["██", "p50", "██", "p95", "██", "p99"]
    mono = chart.lines(40, 10, mono=True)
    assert "░" in mono[0].plain and "█" in mono[7].plain and "▓" in mono[5].plain
    assert "no requests" in LatencyChart().lines(40, 10)[0].plain


def test_series_chart_labels_min_and_max_and_a_flat_line_sits_in_the_middle() -> None:
    chart = SeriesChart(fmt_bytes)
    chart.values = tuple(float(v) * 2 ** 20 for v in range(100, 130))
    lines = chart.lines(50, 8)
    assert len(lines) == 8 and lines[0].plain.strip().startswith("129M") and lines[6].plain.strip().startswith("100M")
    assert lines[-1].plain.strip().startswith("-30s") and lines[-1].plain.endswith("now")
    chart.values = (5.0,) * 10
    flat = [line.plain for line in chart.lines(30, 9)]
    assert flat[0].strip() == "" and "█" in flat[7] and "5" in flat[4]


def test_histogram_merges_buckets_to_fit() -> None:
    hist = Histogram()
    hist.buckets = tuple((float(2 ** k), k) for k in range(1, 21))
    lines = hist.lines(40, 5)
    assert len(lines) == 5
    counts = [int(line.plain.split()[-1]) for line in lines]
    assert sum(counts) == sum(range(1, 21))
    assert all(len(line.plain) <= 40 for line in lines)


def test_share_bars_and_stacks_are_plain_text() -> None:
    frames = (HotFrame("main (app.py:1)", 10, 1.0, 0), HotFrame("f ([red]x.py:1)", 5, 0.5, 2))
    bars = share_bars(frames, 5).plain.split("\n")
    assert bars[0].split() == ["self", "total", "frame"]
    assert bars[1].split()[-4:] == ["20%", "50%", "f", "([red]x.py:1)"]  # where it sat comes first
    assert bars[2].split() == ["100%", "main", "(app.py:1)"]
    worker = next(w for w in snapshot(0).workers if w.pid == STUCK_PID)
    stacks = stacks_text(worker, None).plain.split("\n")
    assert stacks[0].startswith("● thread 4110 MainThread · serving GET /export for 41s")
    assert stacks[1].strip() == "wait_for_lock (reports.py:88)"
    assert "heartbeat␛[31m · idle" in stacks[5]


def test_exit_reason_names_gunicorns_timeout() -> None:
    assert exit_reason(STUCK_PID, (timeout_event(),)).plain.startswith(
        f"⚠ worker {STUCK_PID} exited: killed by gunicorn's timeout")
    assert exit_reason(1, ()).plain == "⚠ worker 1 is gone"
