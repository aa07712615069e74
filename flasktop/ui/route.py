"""A route, drilled into: latency over time, distribution, slowest requests, hot frames."""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import ScrollableContainer, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from flasktop.model.snapshot import RequestRecord, RouteView, Snapshot
from flasktop.ui.messages import OpenWorker
from flasktop.ui.overview import master_banner, route_key, route_label
from flasktop.ui.text import DASH, fmt_ago, fmt_ms, fmt_pct, fmt_rate, join, safe_text
from flasktop.ui.widgets import Col, Histogram, KeyedTable, LatencyChart, Line, composed, num, share_bars


def paused_mark(app: object) -> Text:
    if not getattr(app, "paused", False):
        return Text("", end="")
    pending = int(getattr(app, "pending", 0))
    return join((f" PAUSED +{pending} " if pending else " PAUSED ", "bold reverse yellow"), " ")


def status_style(status: int) -> str:
    return "bold red" if status >= 500 else ("yellow" if status >= 400 else "green")


class SlowestTable(KeyedTable):
    COLUMNS = (
        Col("duration", "took", 7),
        Col("status", "status", 6),
        Col("pid", "worker", 7),
        Col("tid", "thread", 8, min_table_width=72),
        Col("when", "when", 9),
        Col("exc", "exception", flex=1, right=False),
    )
    now: float = 0.0

    def cells(self, r: RequestRecord, widths: Dict[str, int]) -> List[Text]:
        out: Dict[str, Text] = {
            "duration": num(fmt_ms(r.duration_ms), "bold"),
            "status": num(str(r.status), status_style(r.status)),
            "pid": num(str(r.pid)),
            "tid": num(str(r.tid), "dim"),
            "when": num(fmt_ago(self.now, r.end), "dim"),
            "exc": safe_text(r.exc, 200, "red") if r.exc else Text("", end=""),
        }
        return [out[c.key] for c, _ in self._layout]


def route_title(r: RouteView, app: object, gone: bool) -> Text:
    out = paused_mark(app)
    out.append("route ", "dim")
    if r.slow:
        out.append("▲ slow ", "bold red")
    out.append_text(safe_text(route_label(r), 200, "bold strike" if gone else "bold"))
    out.append(f"  {fmt_rate(r.rate)}  {r.count} requests  ")
    out.append(f"{r.errors} errors ({fmt_pct(r.error_rate)})", "bold red" if r.errors else "")
    if r.in_flight:
        out.append(f"  {r.in_flight} in flight", "yellow")
    out.append("\nrecent  ", "dim")
    out.append(f"p50 {fmt_ms(r.p50_ms)}  p95 {fmt_ms(r.p95_ms)}  p99 {fmt_ms(r.p99_ms)}  max {fmt_ms(r.max_ms)}")
    out.append("   since attach  ", "dim")
    out.append(f"p50 {fmt_ms(r.total_p50_ms)}  p95 {fmt_ms(r.total_p95_ms)}  "
               f"p99 {fmt_ms(r.total_p99_ms)}  max {fmt_ms(r.total_max_ms)}")
    out.overflow, out.no_wrap = "ellipsis", True
    return out


class RouteScreen(Screen[None]):
    """One route; keeps its last data if the route stops being reported."""

    ready = False  # set once composed; the app holds snapshots that arrive before

    BINDINGS: ClassVar[List[BindingType]] = [Binding("escape", "back", "Back")]
    AUTO_FOCUS = "#slowest"

    def __init__(self, key: str) -> None:
        super().__init__(classes="drill")
        self.key = key
        self.route: Optional[RouteView] = None
        self.gone = False
        self.snapshot: Optional[Snapshot] = None

    def compose(self) -> ComposeResult:
        yield Line(id="title")
        yield Line(id="banner")
        with ScrollableContainer(id="body", classes="route-body"):
            with Vertical(id="latency-pane", classes="section"):
                yield LatencyChart(id="latency")
            with Vertical(id="dist-pane", classes="section"):
                yield Histogram(id="histogram")
            with Vertical(id="slowest-pane", classes="section"):
                yield Line(classes="note", id="slowest-note")
                yield SlowestTable(id="slowest")
            with Vertical(id="frames-pane", classes="section"):
                yield Line(id="frames")
        yield Footer()

    def on_mount(self) -> None:
        if not composed(self):
            return
        self.query_one("#latency-pane").border_title = "Latency over time"
        self.query_one("#dist-pane").border_title = "Distribution since attach"
        self.query_one("#slowest-pane").border_title = "Slowest recent requests"
        self.query_one("#frames-pane").border_title = "Hot frames while it ran"
        self.ready = True
        self.show(getattr(self.app, "snapshot", None))

    def on_screen_resume(self) -> None:
        if self.ready:
            self.show(getattr(self.app, "snapshot", None))

    def refresh_header(self) -> None:
        if self.route is not None:
            self.query_one("#title", Line).show_text(route_title(self.route, self.app, self.gone))

    def show(self, snap: Optional[Snapshot]) -> None:
        if snap is None:
            return
        self.snapshot = snap
        found = next((r for r in snap.routes if route_key(r) == self.key), None)
        self.gone = found is None
        if found is not None:
            self.route = found
        lines = master_banner(snap)
        if self.gone:
            lines.append(join(("⚠ ", "bold red"), safe_text(self.key, 200),
                              (" is no longer reported · showing its last data" if self.route is not None
                               else " has not been seen", "bold red")))
        self.query_one("#banner", Line).show_text(Text("\n", end="").join(lines))
        r = self.route
        if r is None:
            self.query_one("#title", Line).show_text(join(paused_mark(self.app), ("route ", "dim"),
                                                          safe_text(self.key, 200, "bold")))
            return
        self.refresh_header()
        self.query_one(LatencyChart).set_points(r.history)
        self.query_one(Histogram).set_buckets(r.histogram)
        table = self.query_one(SlowestTable)
        table.now = snap.t
        table.sync([(f"{q.pid}:{q.tid}:{q.end!r}:{q.duration_ms!r}:{i}", q) for i, q in enumerate(r.slowest)])
        self.query_one("#slowest-note", Line).show_text(
            None if r.slowest else Text("no completed requests yet", "dim"))
        pyspy = snap.source("pyspy")
        frames = share_bars(r.hot_frames, 40)
        if not r.hot_frames and pyspy is not None and pyspy.state not in ("ok", "waiting"):
            frames = join((f"no stacks: py-spy {pyspy.state}: ", "yellow"), safe_text(pyspy.detail or DASH, 200))
        self.query_one("#frames", Line).show_text(frames)

    def action_back(self) -> None:
        self.app.pop_screen()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        rec = self.query_one(SlowestTable).item(event.row_key.value)
        if isinstance(rec, RequestRecord):
            self.post_message(OpenWorker(rec.pid))
