"""Widgets that render parts of a Snapshot; none of them does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.coordinate import Coordinate
from textual.widget import Widget
from textual.widgets import DataTable, Static

from flasktop.model.snapshot import HotFrame, LatencyPoint, Problem, WorkerEvent
from flasktop.ui.text import EIGHTHS, fmt_ago, fmt_duration, fmt_ms, hbar, join, monochrome, safe_text


def composed(screen: Widget) -> bool:
    """Whether ``screen``'s children were mounted. Textual skips mounting into a node that is
    closing, so a screen closed as soon as it was pushed (Enter then q, faster than a loaded
    machine composes it) still gets its Mount event, with no children to query."""
    return bool(screen.children)


@dataclass(frozen=True)
class Col:
    """A table column; `flex` > 0 makes it share the width left by the fixed ones."""

    key: str
    label: str
    width: int = 0
    flex: float = 0.0
    right: bool = True
    min_table_width: int = 0  # hide the column when the table is narrower


def num(s: str, style: str = "") -> Text:
    """A right-aligned cell of our own making (the style covers the characters, not the padding)."""
    out = Text(justify="right", no_wrap=True, end="")
    out.append(s, style)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Text) and isinstance(b, Text):
        return a.plain == b.plain and a.style == b.style and a.spans == b.spans and a.justify == b.justify
    return bool(a == b)


class KeyedTable(DataTable):
    """A DataTable updated in place by row key: no clear-and-refill, the cursor stays on its row."""

    BINDINGS: ClassVar[List[BindingType]] = [Binding("enter", "select_cursor", "Open")]
    COLUMNS: ClassVar[Tuple[Col, ...]] = ()

    def __init__(self, *, id: Optional[str] = None, classes: Optional[str] = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self._items: List[Tuple[str, Any]] = []
        self._layout: Tuple[Tuple[Col, int], ...] = ()
        self._syncing = False
        self._pinned: Optional[str] = None
        self.sort_key: str = ""
        self.sort_reverse: bool = False

    # what subclasses provide
    def cells(self, item: Any, widths: Dict[str, int]) -> List[Text]:
        raise NotImplementedError

    def label_for(self, col: Col) -> str:
        mark = ("▼" if self.sort_reverse else "▲") if col.key == self.sort_key else ""
        return col.label + mark

    def _cells(self, item: Any, widths: Dict[str, int]) -> List[Text]:
        cells = self.cells(item, widths)
        return [monochrome(c) for c in cells] if self.app.no_color else cells

    # layout
    def visible_columns(self, width: int) -> List[Col]:
        return [c for c in self.COLUMNS if width >= c.min_table_width]

    def _compute_layout(self, width: int) -> Tuple[Tuple[Col, int], ...]:
        if width <= 0:
            return ()
        cols = self.visible_columns(width)
        pad = 2 * self.cell_padding
        fixed = sum(c.width + pad for c in cols if not c.flex) + sum(pad for c in cols if c.flex)
        left = max(0, width - 1 - fixed)  # 1: the vertical scrollbar
        flex_total = sum(c.flex for c in cols) or 1.0
        out = []
        for c in cols:
            w = c.width if not c.flex else max(6, int(left * c.flex / flex_total))
            out.append((c, w))
        return tuple(out)

    def _rebuild(self, layout: Tuple[Tuple[Col, int], ...]) -> None:
        self._syncing = True
        try:
            cursor = self.cursor_row
            self._layout = layout
            self.clear(columns=True)
            for col, w in layout:
                label = Text(self.label_for(col), justify="right" if col.right else "left", no_wrap=True)
                self.add_column(label, width=w, key=col.key)
            widths = self.widths
            for key, item in self._items:
                self.add_row(*self._cells(item, widths), key=key)
            self._restore_cursor(cursor)
        finally:
            self._syncing = False

    @property
    def widths(self) -> Dict[str, int]:
        return {c.key: w for c, w in self._layout}

    def relayout(self, force: bool = False) -> None:
        """Choose columns for the current width; rebuild only when they change."""
        layout = self._compute_layout(self.size.width)
        if layout and (force or layout != self._layout):
            self._rebuild(layout)

    def on_resize(self, event: events.Resize) -> None:
        self.relayout()

    # data
    def sync(self, items: Sequence[Tuple[str, Any]]) -> None:
        """Show exactly `items` (row key, model object), in that order, touching only what changed."""
        self._items = list(dict(items).items())  # a duplicate key would make add_row raise
        if not self._layout:
            self.relayout()
            return
        self._syncing = True
        try:
            cursor = self.cursor_row
            keys = [k for k, _ in self._items]
            wanted = set(keys)
            for row_key in [rk for rk in self.rows if rk.value not in wanted]:
                self.remove_row(row_key)
            widths = self.widths
            for key, item in self._items:
                cells = self._cells(item, widths)
                if key in self.rows:
                    old = self.get_row(key)
                    for (col, _), new, prev in zip(self._layout, cells, old):
                        if not _same(new, prev):
                            self.update_cell(key, col.key, new)
                else:
                    self.add_row(*cells, key=key)
            if [r.key.value for r in self.ordered_rows] != keys and keys:
                rank = {id(self.get_row(k)[0]): i for i, k in enumerate(keys)}
                self.sort(key=lambda row: rank[id(row[0])])
            self._restore_cursor(cursor)
        finally:
            self._syncing = False

    def set_sort(self, key: str, reverse: bool) -> None:
        self.sort_key, self.sort_reverse = key, reverse
        if self._layout:
            self._rebuild(self._layout)

    def _restore_cursor(self, previous_row: int) -> None:
        if not self.row_count:
            return
        if self._pinned is not None and self._pinned in self.rows:
            row = self.get_row_index(self._pinned)
        else:
            row = min(previous_row, self.row_count - 1)
        if row != self.cursor_row:
            self.move_cursor(row=row)

    def watch_cursor_coordinate(self, old: Coordinate, new: Coordinate) -> None:
        super().watch_cursor_coordinate(old, new)
        if not self._syncing:
            self._pinned = self.key_at(new.row)

    def key_at(self, row: int) -> Optional[str]:
        if not (0 <= row < self.row_count):
            return None
        return self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value

    @property
    def cursor_key(self) -> Optional[str]:
        """The row key under the cursor."""
        return self.key_at(self.cursor_row)

    def item(self, key: Optional[str]) -> Any:
        for k, it in self._items:
            if k == key:
                return it
        return None


class Line(Static):
    """One or a few lines of Text; hidden when empty."""

    DEFAULT_CSS = "Line { height: auto; text-wrap: nowrap; text-overflow: ellipsis; }"

    def __init__(self, *, id: Optional[str] = None, classes: Optional[str] = None) -> None:
        super().__init__(Text(""), id=id, classes=classes, markup=False)
        self.plain = ""
        self._shown: Optional[Text] = None

    def show_text(self, text: Optional[Text]) -> None:
        text = text if text is not None else Text("")
        if self.app.no_color:
            text = monochrome(text)
        if self._shown is None or not _same(text, self._shown):
            self._shown = text
            self.plain = text.plain
            self.update(text)
        self.display = bool(text.plain)


SEVERITY_STYLE = ((80, "bold red"), (50, "red"), (20, "yellow"), (0, "cyan"))


def severity_style(severity: int) -> str:
    for floor, style in SEVERITY_STYLE:
        if severity >= floor:
            return style
    return ""


def problems_text(problems: Sequence[Problem], max_lines: int) -> Text:
    """Ranked problems, one line each, at most `max_lines` (the last says how many are left)."""
    if not problems:
        return join(("✓ ", "green"), ("no problems detected", "dim"))
    out = Text(end="", no_wrap=True, overflow="ellipsis")
    max_lines = max(1, max_lines)
    if len(problems) > 1 and max_lines == 1:
        out.append(f"{len(problems)} problems ▸ ", "bold")
        shown = problems[:1]
    elif len(problems) > max_lines:
        shown = problems[: max_lines - 1]
    else:
        shown = problems
    for i, p in enumerate(shown):
        if i:
            out.append("\n")
        out.append("● ", severity_style(p.severity))
        out.append_text(safe_text(p.summary, 300))
    if max_lines > 1 and len(shown) < len(problems):
        out.append(f"\n  +{len(problems) - len(shown)} more", "dim")
    return out


EVENT_STYLE = {
    "timeout_killed": "bold red",
    "crash_loop": "bold red",
    "master_exited": "bold red",
    "exited": "yellow",
    "recycled": "cyan",
    "reloaded": "cyan",
    "master_replaced": "yellow",
}


def events_text(events_: Sequence[WorkerEvent], now: float, max_lines: int) -> Text:
    """The newest events, newest first."""
    out = Text(end="", no_wrap=True, overflow="ellipsis")
    if not events_:
        out.append("no worker events yet", "dim")
        return out
    for i, e in enumerate(list(reversed(events_))[: max(0, max_lines)]):
        if i:
            out.append("\n")
        out.append(f"{fmt_ago(now, e.t):>11} ", "dim")
        out.append(f"{e.kind:<15}", EVENT_STYLE.get(e.kind, ""))
        out.append_text(safe_text(e.summary, 300))
    return out


class ChartBase(Widget):
    """A widget that draws itself from the data last given, at whatever size it has."""

    DEFAULT_CSS = "ChartBase { height: 8; }"

    def lines(self, width: int, height: int, mono: bool = False) -> List[Text]:
        raise NotImplementedError

    def render(self) -> Text:
        width, height = self.content_region.width, self.content_region.height
        if width <= 0 or height <= 0:
            return Text("")
        mono = self.app.no_color
        text = Text("\n", end="").join(self.lines(width, height, mono))
        return monochrome(text) if mono else text


AXIS = 7


def _axis(label: str) -> Text:
    out = Text(end="", no_wrap=True)
    out.append(label.rjust(AXIS - 1)[: AXIS - 1] + " ", "dim")
    return out


class SeriesChart(ChartBase):
    """A bar chart of one series, one bar a sample, scaled between its min and max."""

    def __init__(self, fmt: Callable[[Optional[float]], str], *, id: Optional[str] = None,
                 classes: Optional[str] = None) -> None:
        super().__init__(id=id, classes=classes)
        self.fmt = fmt
        self.values: Tuple[float, ...] = ()
        self.seconds_per_point = 1.0
        self.bar_style = "green"

    def set_values(self, values: Sequence[float], style: str = "green") -> None:
        values = tuple(values)
        if values != self.values or style != self.bar_style:
            self.values, self.bar_style = values, style
            self.refresh()

    def lines(self, width: int, height: int, mono: bool = False) -> List[Text]:
        plot_w, plot_h = max(1, width - AXIS), max(1, height - 1)
        vals = list(self.values[-plot_w:])
        if not vals:
            return [Text("no samples yet", style="dim")]
        lo, hi = min(vals), max(vals)
        min_span = max(abs(hi) * 0.02, 1.0)
        if hi - lo < min_span:
            base, top = (hi + lo) / 2 - min_span / 2, min_span
        else:
            base, top = lo - (hi - lo) * 0.1, (hi - lo) * 1.1
        rows = _columns([v - base for v in vals], plot_h, top, self.bar_style)
        pad = Text(" " * (plot_w - len(vals)), end="")
        hi_label, lo_label = self.fmt(hi), self.fmt(lo)
        out = []
        for i, row in enumerate(rows):
            if hi_label == lo_label:
                label = hi_label if i == plot_h // 2 else ""
            else:
                label = hi_label if i == 0 else (lo_label if i == plot_h - 1 else "")
            out.append(_axis(label) + pad + row)
        out.append(_time_axis(len(vals) * self.seconds_per_point, plot_w, plot_w - len(vals)))
        return out


def _time_axis(seconds: float, width: int, start: int = 0) -> Text:
    left = f"-{fmt_duration(seconds)}"
    start = max(0, min(start, width - len(left) - 4))
    gap = max(1, width - start - len(left) - 3)
    return Text(" " * (AXIS + start) + left + " " * gap + "now", style="dim", end="", no_wrap=True)


def _columns(values: Sequence[float], height: int, top: float, style: str) -> List[Text]:
    lines = []
    levels = [0.0 if top <= 0 else min(1.0, max(0.0, v / top)) * height * 8 for v in values]
    for row in range(height - 1, -1, -1):
        line = Text(end="", no_wrap=True)
        for level in levels:
            filled = level - row * 8
            if filled >= 8:
                line.append("█", style)
            elif filled > 0:
                line.append(EIGHTHS[max(1, int(filled))], style)
            else:
                line.append(" ")
        lines.append(line)
    return lines


BAND = (("p50", "green"), ("p95", "yellow"), ("p99", "red"))


def _stretch(n: int, width: int) -> int:
    """Cells per point so that `n` points fill about `width` cells (at most 4)."""
    return max(1, min(4, width // max(1, n)))


class LatencyChart(ChartBase):
    """p50/p95/p99 over time as nested bars: p50 inside p95 inside p99, newest on the right."""

    def __init__(self, *, id: Optional[str] = None, classes: Optional[str] = None) -> None:
        super().__init__(id=id, classes=classes)
        self.points: Tuple[LatencyPoint, ...] = ()

    def set_points(self, points: Sequence[LatencyPoint]) -> None:
        points = tuple(points)
        if points != self.points:
            self.points = points
            self.refresh()

    def lines(self, width: int, height: int, mono: bool = False) -> List[Text]:
        plot_w, plot_h = max(1, width - AXIS), max(1, height - 2)
        pts = [p for p in self.points if p.count > 0][-plot_w:]
        if not pts:
            return [Text("no requests in the recent history", style="dim")]
        k = _stretch(len(pts), plot_w)
        top = max(p.p99_ms for p in pts) or 1.0
        pad = " " * max(0, plot_w - k * len(pts))
        fills = ("█", "▓", "░") if mono else ("█", "█", "█")
        out = []
        for row in range(plot_h - 1, -1, -1):
            label = fmt_ms(top) if row == plot_h - 1 else ("0" if row == 0 else "")
            if row == plot_h // 2 and plot_h > 4:
                label = fmt_ms(top * (row + 1) / plot_h)
            line = _axis(label)
            line.append(pad)
            for p in pts:
                levels = [v / top * plot_h * 8 for v in (p.p50_ms, p.p95_ms, p.p99_ms)]
                glyph, style = " ", ""
                for (_, st), level, full in zip(BAND, levels, fills):
                    filled = level - row * 8
                    if filled >= 8:
                        glyph, style = full, st
                        break
                    if filled > 0 and st == "red":
                        glyph, style = EIGHTHS[max(1, min(8, int(filled)))], st
                line.append(glyph * k, style)
            out.append(line)
        span = pts[-1].t - pts[0].t if len(pts) > 1 else 0.0
        out.append(_time_axis(span, plot_w, len(pad)))
        legend = Text(" " * AXIS, end="", no_wrap=True)
        for (name, st), full in zip(BAND, fills):
            legend.append(full * 2, st)
            legend.append(f" {name}  ")
        out.append(legend)
        return out


class Histogram(ChartBase):
    """Latency distribution as horizontal bars, buckets merged to fit the height."""

    def __init__(self, *, id: Optional[str] = None, classes: Optional[str] = None) -> None:
        super().__init__(id=id, classes=classes)
        self.buckets: Tuple[Tuple[float, int], ...] = ()

    def set_buckets(self, buckets: Sequence[Tuple[float, int]]) -> None:
        buckets = tuple(buckets)
        if buckets != self.buckets:
            self.buckets = buckets
            self.refresh()

    def lines(self, width: int, height: int, mono: bool = False) -> List[Text]:
        nonzero = [i for i, (_, c) in enumerate(self.buckets) if c]
        if not nonzero:
            return [Text("no requests yet", style="dim")]
        used = list(self.buckets[nonzero[0]: nonzero[-1] + 1])
        groups = max(1, min(len(used), height))
        step = len(used) / groups
        merged: List[Tuple[float, int]] = []
        for g in range(groups):
            chunk = used[int(g * step): max(int(g * step) + 1, int((g + 1) * step))]
            merged.append((chunk[-1][0], sum(c for _, c in chunk)))
        peak = max(c for _, c in merged) or 1
        count_w = len(str(peak))
        bar_w = max(1, width - 9 - count_w - 1)
        out = []
        for upper, count in merged:
            line = Text(end="", no_wrap=True)
            line.append(f"≤{fmt_ms(upper):>7} ", "dim")
            line.append(hbar(count / peak, bar_w), "cyan")
            line.append(f" {count:>{count_w}}")
            out.append(line)
        return out


def share_bars(frames: Sequence[HotFrame], max_lines: int, bar_w: int = 8) -> Text:
    """Hot frames, where the route's threads sat (self) first, then their callers (total)."""
    out = Text(end="", no_wrap=True, overflow="ellipsis")
    if not frames:
        out.append("no stack samples for this route yet", "dim")
        return out
    total = next((f.samples / f.share for f in frames if f.share > 0 and f.samples > 0), 0.0)
    out.append(" " * bar_w + "  self  total  frame", "dim")
    for f in sorted(frames, key=lambda f: (-f.leaf, -f.share))[: max(0, max_lines)]:
        own = f.leaf / total if total else 0.0
        out.append("\n")
        out.append(hbar(own, bar_w), "magenta")
        out.append(f" {own * 100:4.0f}%  {f.share * 100:4.0f}%  " if f.leaf else f"        {f.share * 100:4.0f}%  ")
        out.append_text(safe_text(f.frame, 300, "" if f.leaf else "dim"))
    return out


__all__ = [
    "Col",
    "KeyedTable",
    "Line",
    "LatencyChart",
    "SeriesChart",
    "Histogram",
    "events_text",
    "problems_text",
    "share_bars",
    "severity_style",
    "num",
]
