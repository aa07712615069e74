"""The overview: header, problems, slow routes, memory trends, stuck workers, events."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Container, Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from flasktop.model.snapshot import STUCK, RouteView, Snapshot, SourceView, WorkerView
from flasktop.ui.messages import OpenRoute, OpenWorker
from flasktop.ui.text import (
    DASH,
    fmt_bytes,
    fmt_duration,
    fmt_growth,
    fmt_ms,
    fmt_pct,
    fmt_rate,
    hbar,
    join,
    safe_text,
    sparkline,
)
from flasktop.ui.widgets import Col, KeyedTable, Line, composed, events_text, num, problems_text

BEACON_HOWTO = ("no beacon heard: add `Beacon(app)` from flasktop.beacon to the app, or run "
                "`gunicorn -c python:flasktop.beacon.gunicorn_conf …`")

STATE_STYLE = {"ok": "green", "waiting": "yellow", "degraded": "yellow", "denied": "bold red",
               "missing": "red", "error": "bold red", "off": "dim"}
STATE_GLYPH = {"ok": "✓", "waiting": "…", "off": "·"}
TROUBLE = ("degraded", "denied", "error")
SOURCE_LABEL = {"psutil": "psutil", "pyspy": "py-spy", "beacon": "beacon"}

WORKER_STYLE = {"idle": "dim", "busy": "green", "stuck": "bold red", "starting": "cyan",
                "stopped": "yellow", "unknown": "dim", "gone": "dim strike"}


def route_key(r: RouteView) -> str:
    return f"{r.method} {r.route}"


def route_label(r: RouteView) -> str:
    return f"{r.method} {r.route}" if r.method else r.route


def beacon_missing(snap: Snapshot) -> bool:
    src = snap.source("beacon")
    return src is None or src.state in ("missing", "off", "waiting", "error", "denied")


def source_text(src: SourceView, snap: Snapshot) -> Text:
    style = STATE_STYLE.get(src.state, "")
    out = Text(end="", no_wrap=True)
    out.append(SOURCE_LABEL.get(src.name, src.name) + " ")
    out.append(STATE_GLYPH.get(src.state, "✗") + " " + src.state, style)
    if src.name == "beacon":
        b = snap.beacon
        lost = b.lost + (b.kernel_drops or 0) + b.app_dropped
        extra = []
        if b.senders:
            extra.append(f"{b.senders} sender" + ("s" if b.senders != 1 else ""))
        if lost:
            extra.append(f"lost {lost}")
        if b.last_heard_s is not None and b.last_heard_s > 5:
            extra.append(f"silent {fmt_duration(b.last_heard_s)}")
        if extra:
            out.append(" (" + ", ".join(extra) + ")", "yellow" if lost else "dim")
    return out


def header_text(snap: Optional[Snapshot], *, paused: bool, pending: int, attaching_to: str,
                title: str = "flasktop") -> Text:
    """Two lines: the master and the load; the sources and their state."""
    out = Text(end="", no_wrap=True, overflow="ellipsis")
    if paused:
        out.append(f" PAUSED +{pending} " if pending else " PAUSED ", "bold reverse yellow")
        out.append(" ")
    out.append_text(safe_text(title, 40, "bold"))
    if snap is None:
        out.append("  attaching to gunicorn " + (safe_text(attaching_to, 40).plain or "…"), "dim")
        return out
    m = snap.master
    if m is not None:
        out.append("  master ")
        out.append(str(m.pid), "bold" if m.alive else "bold red strike")
        if not m.alive:
            out.append(" gone", "bold red")
        out.append("  ")
        out.append_text(safe_text(m.worker_class or "?", 20, "cyan"))
        if m.threads and m.threads > 1:
            out.append(f"×{m.threads}t", "cyan")
    alive = sum(1 for w in snap.workers if w.state != "gone")
    configured = m.workers if m is not None else None
    out.append("  workers ")
    short = configured is not None and alive < configured
    out.append(f"{alive}/{configured if configured is not None else '?'}", "bold red" if short else "bold")
    if m is not None:
        out.append(f"  timeout {fmt_duration(m.timeout) if m.timeout > 0 else 'none'}")
        if m.timeout_assumed:  # gunicorn's default: its process title hides the arguments
            out.append("?", "bold yellow")
    out.append("  ")
    out.append(fmt_rate(snap.rps).replace("/s", " req/s"), "bold")
    out.append("  err ")
    out.append(fmt_pct(snap.error_rate), "bold red" if snap.error_rate >= 0.01 else "bold")
    out.append("\n")
    for i, src in enumerate(snap.sources):
        if i:
            out.append("  ")
        out.append_text(source_text(src, snap))
    out.append(f"  up {fmt_duration(snap.attached_s)}", "dim")
    return out


def master_banner(snap: Snapshot) -> List[Text]:
    lines: List[Text] = []
    m = snap.master
    if m is None:
        lines.append(join(("⚠ no gunicorn master found", "bold red"), " · showing the last data"))
    elif not m.alive:
        lines.append(join((f"⚠ master {m.pid} is gone", "bold red"), " · showing the last data"))
    elif m.new_master_pid:
        lines.append(join((f"⚠ master {m.pid} is being replaced by {m.new_master_pid} (USR2)", "yellow")))
    return lines


def banner_text(snap: Snapshot) -> Text:
    """A line for each thing in trouble: the master, a source. Empty when all is well."""
    lines = master_banner(snap)
    for src in snap.sources:
        if src.state in TROUBLE:
            lines.append(join((f"⚠ {SOURCE_LABEL.get(src.name, src.name)} {src.state}: ", STATE_STYLE[src.state]),
                              safe_text(src.detail or "no detail", 300)))
    return Text("\n", end="").join(lines)


def _opt(v: Optional[float]) -> float:
    return -1.0 if v is None else float(v)


ROUTE_SORTS: Tuple[Tuple[str, Callable[[RouteView], Any], bool], ...] = (
    ("share", lambda r: r.share, True),
    ("p95", lambda r: _opt(r.p95_ms), True),
    ("p99", lambda r: _opt(r.p99_ms), True),
    ("max", lambda r: _opt(r.max_ms), True),
    ("rate", lambda r: r.rate, True),
    ("err", lambda r: r.error_rate, True),
    ("route", lambda r: route_label(r).lower(), False),
)

MEMORY_SORTS: Tuple[Tuple[str, Callable[[WorkerView], Any], bool], ...] = (
    ("pid", lambda w: w.pid, False),
    ("rss", lambda w: _opt(w.rss_bytes), True),
    ("growth", lambda w: _opt(w.growth_mb_per_min), True),
)


class RoutesTable(KeyedTable):
    COLUMNS = (
        Col("route", "route", flex=1, right=False),
        Col("rate", "rate", 6),
        Col("p50", "p50", 6, min_table_width=96),
        Col("p95", "p95", 6),
        Col("p99", "p99", 6),
        Col("max", "max", 6, min_table_width=64),
        Col("err", "err", 5),
        Col("share", "busy", 10, min_table_width=110),
        Col("share_pct", "busy", 5, min_table_width=0),
    )

    def visible_columns(self, width: int) -> List[Col]:
        cols = super().visible_columns(width)
        if any(c.key == "share" for c in cols):
            cols = [c for c in cols if c.key != "share_pct"]
        return cols

    def label_for(self, col: Col) -> str:
        if col.key in ("share", "share_pct") and self.sort_key == "share":
            return col.label + ("▼" if self.sort_reverse else "▲")
        return super().label_for(col)

    def cells(self, r: RouteView, widths: Dict[str, int]) -> List[Text]:
        name = Text(end="", no_wrap=True, overflow="ellipsis")
        name.append("▲" if r.slow else " ", "bold red")
        name.append(" ")
        name.append_text(safe_text(route_label(r), 200))
        late = "red" if r.slow else ""
        out: Dict[str, Text] = {
            "route": name,
            "rate": num(fmt_rate(r.rate)),
            "p50": num(fmt_ms(r.p50_ms)),
            "p95": num(fmt_ms(r.p95_ms), late),
            "p99": num(fmt_ms(r.p99_ms), late),
            "max": num(fmt_ms(r.max_ms)),
            "err": num(fmt_pct(r.error_rate) if r.count else DASH, "bold red" if r.error_rate > 0 else ""),
            "share_pct": num(fmt_pct(r.share)),
        }
        if "share" in widths:
            bar = Text(hbar(r.share, widths["share"] - 5), "blue", end="", no_wrap=True)
            bar.append(fmt_pct(r.share).rjust(5))
            out["share"] = bar
        return [out[c.key] for c, _ in self._layout]


class MemoryTable(KeyedTable):
    COLUMNS = (
        Col("pid", "pid", 7),
        Col("state", "state", 8, right=False),
        Col("rss", "rss", 6),
        Col("trend", "trend", flex=1, right=False),
        Col("growth", "MB/min", 6),
        Col("leak", "leak", 4, right=False),
        Col("cpu", "cpu", 5, min_table_width=84),
        Col("fds", "fds", 5, min_table_width=92),
        Col("served", "served", 7, min_table_width=110),
    )

    def cells(self, w: WorkerView, widths: Dict[str, int]) -> List[Text]:
        growth = w.growth_mb_per_min
        trend_style = "red" if w.leak_suspected else ("yellow" if growth is not None and growth > 0.5 else "green")
        hist = [v for v in w.rss_history]
        out: Dict[str, Text] = {
            "pid": num(str(w.pid), "bold" if w.state == STUCK else ""),
            "state": Text(w.state, WORKER_STYLE.get(w.state, ""), end="", no_wrap=True),
            "rss": num(fmt_bytes(w.rss_bytes)),
            "trend": Text(sparkline(hist, widths.get("trend", 10)).rjust(widths.get("trend", 10)), trend_style,
                          end="", no_wrap=True),
            "growth": num(fmt_growth(growth), "red" if w.leak_suspected else ""),
            "leak": Text("LEAK" if w.leak_suspected else "", "bold red", end=""),
            "cpu": num(DASH if w.cpu_percent is None else f"{w.cpu_percent:.0f}%"),
            "fds": num(DASH if w.num_fds is None else str(w.num_fds)),
            "served": num(str(w.requests_served)),
        }
        return [out[c.key] for c, _ in self._layout]


def stuck_elapsed(w: WorkerView) -> Tuple[Optional[float], bool]:
    """How long the worker has been on its request, and whether that is only a lower bound."""
    if w.in_flight is not None:
        return w.in_flight.elapsed_s, w.in_flight.source == "stack"
    return w.stuck_for_s, False


def innermost_frame(w: WorkerView) -> Optional[str]:
    if w.stack:
        return w.stack[0]
    if w.in_flight is not None:
        for t in w.threads:
            if t.tid == w.in_flight.tid and t.frames:
                return t.frames[0]
    return None


class StuckTable(KeyedTable):
    COLUMNS = (
        Col("pid", "pid", 7),
        Col("route", "route", flex=1, right=False),
        Col("for", "for/timeout", 12),
        Col("frame", "innermost frame", flex=2, right=False),
    )
    timeout: Optional[float] = None

    def cells(self, w: WorkerView, widths: Dict[str, int]) -> List[Text]:
        elapsed, lower_bound = stuck_elapsed(w)
        limit = self.timeout
        near = elapsed is not None and bool(limit) and elapsed >= 0.8 * limit  # 0: none
        when = ("≥" if lower_bound else "") + fmt_duration(elapsed)
        if limit:
            when += f" / {fmt_duration(limit)}"
        route = w.in_flight.route if w.in_flight is not None else None
        frame = innermost_frame(w)
        out: Dict[str, Text] = {
            "pid": num(str(w.pid), "bold red"),
            "route": safe_text(route, 200) if route else Text(DASH, "dim", end=""),
            "for": num(when, "bold red" if near else "yellow"),
            "frame": safe_text(frame, 300) if frame else Text("no stack sample", "dim", end=""),
        }
        return [out[c.key] for c, _ in self._layout]


def _cycle(sorts: Sequence[Tuple[str, Any, bool]], current: str) -> Tuple[str, bool]:
    names = [s[0] for s in sorts]
    nxt = sorts[(names.index(current) + 1) % len(sorts)] if current in names else sorts[0]
    return nxt[0], nxt[2]


def _sorted(items: Sequence[Any], sorts: Sequence[Tuple[str, Callable[[Any], Any], bool]],
            key: str, reverse: bool) -> List[Any]:
    for name, fn, _ in sorts:
        if name == key:
            return sorted(items, key=fn, reverse=reverse)
    return list(items)


class OverviewScreen(Screen[None]):
    """Everything at once; Enter drills into the highlighted route or worker."""

    ready = False  # set once composed; the app holds snapshots that arrive before

    AUTO_FOCUS = "#routes"
    BINDINGS: ClassVar[List[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("escape", "clear_filter", "Clear filter"),
    ]

    def __init__(self, attaching_to: str = "", title: str = "flasktop") -> None:
        super().__init__(id="overview")
        self.attaching_to = attaching_to
        self.title_text = title
        self.snapshot: Optional[Snapshot] = None
        self.filter = ""
        self.route_sort: Tuple[str, bool] = ("share", True)
        self.memory_sort: Tuple[str, bool] = ("pid", False)

    def compose(self) -> ComposeResult:
        yield Line(id="header")
        yield Line(id="banner")
        yield Line(id="problems")
        with Horizontal(id="filter-bar"):
            yield Static(Text("filter ", "bold"), id="filter-label", markup=False)
            yield Input(placeholder="substring of a route, pid or state (Enter keeps it, Esc clears)", id="filter")
        with Container(id="body"):
            with Vertical(id="routes-pane", classes="pane"):
                yield Line(classes="note", id="routes-note")
                yield RoutesTable(id="routes")
            with Container(id="lower"):
                with Vertical(id="memory-pane", classes="pane"):
                    yield Line(classes="note", id="memory-note")
                    yield MemoryTable(id="memory")
                with Vertical(id="stuck-pane", classes="pane"):
                    yield Line(classes="note", id="stuck-note")
                    yield StuckTable(id="stuck")
            with Vertical(id="events-pane", classes="pane"):
                yield Line(id="events")
        yield Static(Text(""), id="attaching", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if not composed(self):
            return
        self.query_one("#routes-pane").border_title = "Slow routes"
        self.query_one("#memory-pane").border_title = "Memory"
        self.query_one("#stuck-pane").border_title = "Stuck workers"
        self.query_one("#events-pane").border_title = "Worker events"
        self.query_one("#filter-bar").display = False
        self.query_one(RoutesTable).set_sort(*self.route_sort)
        self.query_one(MemoryTable).set_sort(*self.memory_sort)
        self.ready = True
        self.show(self.app_snapshot())

    def app_snapshot(self) -> Optional[Snapshot]:
        return getattr(self.app, "snapshot", None)

    def on_screen_resume(self) -> None:
        if self.ready:
            self.show(self.app_snapshot())

    def on_resize(self) -> None:
        if self.ready and self.snapshot is not None:
            self.query_one("#problems", Line).show_text(problems_text(self.snapshot.problems, self._problem_lines()))

    def _problem_lines(self) -> int:
        h = self.app.size.height
        return 1 if h < 34 else (3 if h < 45 else 5)

    def refresh_header(self) -> None:
        paused = bool(getattr(self.app, "paused", False))
        pending = int(getattr(self.app, "pending", 0))
        self.query_one("#header", Line).show_text(
            header_text(self.snapshot, paused=paused, pending=pending,
                        attaching_to=self.attaching_to, title=self.title_text))

    def show(self, snap: Optional[Snapshot]) -> None:
        """Render `snap` (None: still attaching)."""
        self.snapshot = snap
        self.refresh_header()
        attaching = self.query_one("#attaching", Static)
        body = self.query_one("#body")
        if snap is None:
            target = safe_text(self.attaching_to, 40).plain
            attaching.update(Text(f"attaching to gunicorn {target}…" if target else "waiting for the first snapshot…",
                                  style="bold"))
            attaching.display, body.display = True, False
            self.query_one("#problems", Line).show_text(None)
            return
        attaching.display, body.display = False, True
        self.query_one("#banner", Line).show_text(banner_text(snap))
        self.query_one("#problems", Line).show_text(problems_text(snap.problems, self._problem_lines()))
        self._show_routes(snap)
        self._show_memory(snap)
        self._show_stuck(snap)
        self.query_one("#events", Line).show_text(events_text(snap.events, snap.t, 30))

    def _matches(self, *texts: Optional[str]) -> bool:
        q = self.filter.lower()
        return not q or any(t is not None and q in t.lower() for t in texts)

    def _show_routes(self, snap: Snapshot) -> None:
        routes = [r for r in snap.routes if self._matches(route_label(r))]
        routes = _sorted(routes, ROUTE_SORTS, *self.route_sort)
        self.query_one(RoutesTable).sync([(route_key(r), r) for r in routes])
        note: Optional[Text] = None
        if not snap.routes:
            note = Text(BEACON_HOWTO, "yellow") if beacon_missing(snap) else Text("no requests seen yet", "dim")
        elif not routes:
            note = join(("no route matches ", "dim"), safe_text(self.filter, 60))
        elif snap.routes_dropped:
            note = Text(f"{snap.routes_dropped} more routes folded into <other>", "dim")
        self.query_one("#routes-note", Line).show_text(note)

    def _worker_matches(self, w: WorkerView) -> bool:
        return self._matches(str(w.pid), w.state, w.in_flight.route if w.in_flight else None)

    def _show_memory(self, snap: Snapshot) -> None:
        workers = _sorted([w for w in snap.workers if self._worker_matches(w)], MEMORY_SORTS, *self.memory_sort)
        self.query_one(MemoryTable).sync([(str(w.pid), w) for w in workers])
        note = None
        if not snap.workers:
            note = Text("no workers found under this master", "yellow")
        elif not workers:
            note = join(("no worker matches ", "dim"), safe_text(self.filter, 60))
        self.query_one("#memory-note", Line).show_text(note)

    def _show_stuck(self, snap: Snapshot) -> None:
        table = self.query_one(StuckTable)
        timeout = snap.master.timeout if snap.master is not None else None
        if timeout != table.timeout:
            table.timeout = timeout
            table.relayout(force=True)
        stuck = [w for w in snap.workers if w.state == STUCK and self._worker_matches(w)]
        stuck.sort(key=lambda w: -(stuck_elapsed(w)[0] or 0.0))
        table.sync([(str(w.pid), w) for w in stuck])
        table.display = bool(stuck)
        pyspy = snap.source("pyspy")
        lines: List[Text] = []
        if pyspy is not None and pyspy.state not in ("ok", "waiting", "off"):
            lines.append(join((f"no stacks: py-spy {pyspy.state}: ", "yellow"), safe_text(pyspy.detail, 200)))
        if not stuck:
            lines.append(Text("no stuck workers", "dim green"))
        self.query_one("#stuck-note", Line).show_text(Text("\n", end="").join(lines) if lines else None)

    # keys
    def focused_table(self) -> Optional[KeyedTable]:
        return self.focused if isinstance(self.focused, KeyedTable) else None

    def check_action(self, action: str, parameters: Tuple[object, ...]) -> Optional[bool]:
        if action == "clear_filter":
            bars = self.query("#filter-bar")
            return bool(self.filter) or any(bar.display for bar in bars)
        return True

    def action_filter(self) -> None:
        self.query_one("#filter-bar").display = True
        self.query_one("#filter", Input).focus()
        self.refresh_bindings()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter = event.value
        self.show(self.snapshot)
        self.refresh_bindings()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not event.value:
            self.query_one("#filter-bar").display = False
        self.query_one(RoutesTable).focus()

    def action_clear_filter(self) -> None:
        bar = self.query_one("#filter-bar")
        if bar.display or self.filter:
            self.query_one("#filter", Input).value = ""
            bar.display = False
            self.filter = ""
            self.show(self.snapshot)
            self.query_one(RoutesTable).focus()
            self.refresh_bindings()

    def action_sort(self, reverse: bool = False) -> None:
        if isinstance(self.focused, MemoryTable):
            key, rev = self.memory_sort if reverse else _cycle(MEMORY_SORTS, self.memory_sort[0])
            self.memory_sort = (key, not rev if reverse else rev)
            self.query_one(MemoryTable).set_sort(*self.memory_sort)
        else:
            key, rev = self.route_sort if reverse else _cycle(ROUTE_SORTS, self.route_sort[0])
            self.route_sort = (key, not rev if reverse else rev)
            self.query_one(RoutesTable).set_sort(*self.route_sort)
        self.show(self.snapshot)

    def action_reverse(self) -> None:
        self.action_sort(reverse=True)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        key = event.row_key.value
        if key is None:
            return
        if isinstance(event.data_table, RoutesTable):
            self.post_message(OpenRoute(key))
        else:
            self.post_message(OpenWorker(int(key)))
