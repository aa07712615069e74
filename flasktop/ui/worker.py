"""A worker, drilled into: live stacks, memory and fd history, requests served, events."""

from __future__ import annotations

from typing import ClassVar, Dict, List, Optional, Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import ScrollableContainer, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from flasktop.model.snapshot import GONE, InFlightView, RequestRecord, Snapshot, WorkerEvent, WorkerView
from flasktop.ui.messages import OpenRoute
from flasktop.ui.overview import WORKER_STYLE, master_banner
from flasktop.ui.route import paused_mark, status_style
from flasktop.ui.text import (
    DASH,
    fmt_ago,
    fmt_bytes,
    fmt_duration,
    fmt_growth,
    fmt_ms,
    fmt_pct,
    join,
    safe_text,
)
from flasktop.ui.widgets import Col, KeyedTable, Line, SeriesChart, composed, events_text, num

EXIT_KINDS = ("exited", "timeout_killed", "recycled", "removed", "crash_loop")
EXIT_REASON = {
    "timeout_killed": "killed by gunicorn's timeout",
    "recycled": "recycled after max_requests",
    "removed": "removed by the master",
}
MAX_FRAMES = 60


def exit_reason(pid: int, events_: Sequence[WorkerEvent]) -> Text:
    """'worker 4242 exited: killed by gunicorn's timeout', from the newest event about it."""
    for e in reversed(events_):
        if e.pid == pid and e.kind in EXIT_KINDS:
            reason = EXIT_REASON.get(e.kind)
            out = Text(end="")
            out.append(f"⚠ worker {pid} exited: ", "bold red")
            out.append_text(safe_text(reason or e.summary, 200, "bold red"))
            if reason and e.summary:
                out.append("  ")
                out.append_text(safe_text(e.summary, 200, "dim"))
            return out
    return Text(f"⚠ worker {pid} is gone", "bold red", end="")


class ServedTable(KeyedTable):
    COLUMNS = (
        Col("when", "when", 9),
        Col("route", "route", flex=1, right=False),
        Col("status", "status", 6),
        Col("duration", "took", 7),
        Col("tid", "thread", 8),
    )
    now: float = 0.0

    def cells(self, r: RequestRecord, widths: Dict[str, int]) -> List[Text]:
        out: Dict[str, Text] = {
            "when": num(fmt_ago(self.now, r.end), "dim"),
            "route": safe_text(f"{r.method} {r.route}" if r.method else r.route, 200),
            "status": num(str(r.status), status_style(r.status)),
            "duration": num(fmt_ms(r.duration_ms)),
            "tid": num(str(r.tid), "dim"),
        }
        return [out[c.key] for c, _ in self._layout]


def _serving(f: InFlightView) -> Text:
    out = Text(end="")
    out.append(" · serving ", "dim")
    out.append_text(safe_text(f"{f.method} {f.route}" if f.method else f.route, 200, "bold"))
    bound = "≥" if f.source == "stack" else ""
    out.append(f" for {bound}{fmt_duration(f.elapsed_s)}", "yellow")
    return out


def stacks_text(w: WorkerView, pyspy_note: Optional[Text]) -> Text:
    """Every thread's live stack, innermost frame first, with the request it serves."""
    out = Text(end="", no_wrap=True, overflow="ellipsis")
    if pyspy_note is not None:
        out.append_text(pyspy_note)
        out.append("\n")
    by_tid = {f.tid: f for f in w.in_flight_all}
    if w.in_flight is not None:
        by_tid.setdefault(w.in_flight.tid, w.in_flight)
    if not w.threads:
        if w.stack:
            out.append("serving thread", "bold")
            if w.in_flight is not None:
                out.append_text(_serving(w.in_flight))
            for fr in w.stack[:MAX_FRAMES]:
                out.append("\n    ")
                out.append_text(safe_text(fr, 300))
        elif pyspy_note is None:
            out.append("no stack sample yet", "dim")
        return out
    for i, t in enumerate(w.threads):
        if i:
            out.append("\n")
        out.append("● " if t.active else "○ ", "green" if t.active else "dim")
        out.append(f"thread {t.tid} ", "bold")
        out.append_text(safe_text(t.name, 60, "cyan"))
        flight = t.in_flight or by_tid.get(t.tid)
        if flight is not None:
            out.append_text(_serving(flight))
        elif not t.active:
            out.append(" · idle", "dim")
        for fr in t.frames[:MAX_FRAMES]:
            out.append("\n    ")
            out.append_text(safe_text(fr, 300))
        if len(t.frames) > MAX_FRAMES:
            out.append(f"\n    … {len(t.frames) - MAX_FRAMES} more frames", "dim")
    return out


def worker_title(w: WorkerView, now: float, app: object, gone: bool) -> Text:
    out = paused_mark(app)
    out.append("worker ", "dim")
    out.append(str(w.pid), "bold strike" if gone else "bold")
    state = GONE if gone else w.state
    out.append(f"  {state}", WORKER_STYLE.get(state, ""))
    out.append(f"  up {fmt_duration(now - w.started)}" if w.started else "")
    out.append(f"  rss {fmt_bytes(w.rss_bytes)}")
    if w.growth_mb_per_min is not None:
        out.append(f" ({fmt_growth(w.growth_mb_per_min)} MB/min)", "red" if w.leak_suspected else "dim")
    if w.leak_suspected:
        out.append(" LEAK", "bold red")
    out.append("\n")
    if w.uss_bytes is not None:
        out.append(f"uss {fmt_bytes(w.uss_bytes)}  ")
    out.append(f"cpu {DASH if w.cpu_percent is None else f'{w.cpu_percent:.0f}%'}")
    out.append(f"  threads {DASH if w.num_threads is None else w.num_threads}")
    out.append(f"  fds {DASH if w.num_fds is None else w.num_fds}")
    if w.num_connections is not None:
        out.append(f"  conns {w.num_connections}")
    out.append(f"  served {w.requests_served}")
    return out


class WorkerScreen(Screen[None]):
    """One worker; the app tells the feed to sample it faster while this screen is on top."""

    ready = False  # set once composed; the app holds snapshots that arrive before

    BINDINGS: ClassVar[List[BindingType]] = [Binding("escape", "back", "Back")]
    AUTO_FOCUS = "#body"

    def __init__(self, pid: int) -> None:
        super().__init__(classes="drill")
        self.pid = pid
        self.worker: Optional[WorkerView] = None
        self.gone = False
        self.snapshot: Optional[Snapshot] = None

    def compose(self) -> ComposeResult:
        yield Line(id="title")
        yield Line(id="banner")
        with ScrollableContainer(id="body", classes="worker-body"):
            with Vertical(id="stacks-pane", classes="section"):
                yield Line(id="stacks")
            with Vertical(id="rss-pane", classes="section"):
                yield SeriesChart(fmt_bytes, id="rss")
            with Vertical(id="fd-pane", classes="section"):
                yield SeriesChart(lambda v: DASH if v is None else f"{v:.0f}", id="fds")
            with Vertical(id="served-pane", classes="section"):
                yield Line(classes="note", id="served-note")
                yield ServedTable(id="served")
            with Vertical(id="wevents-pane", classes="section"):
                yield Line(id="wevents")
        yield Footer()

    def on_mount(self) -> None:
        if not composed(self):
            return
        self.query_one("#stacks-pane").border_title = "Threads, innermost frame first"
        self.query_one("#rss-pane").border_title = "RSS"
        self.query_one("#fd-pane").border_title = "Open file descriptors"
        self.query_one("#served-pane").border_title = "Requests served"
        self.query_one("#wevents-pane").border_title = "Events"
        self.ready = True
        self.show(getattr(self.app, "snapshot", None))

    def on_screen_resume(self) -> None:
        if self.ready:
            self.show(getattr(self.app, "snapshot", None))

    def refresh_header(self) -> None:
        if self.worker is not None and self.snapshot is not None:
            self.query_one("#title", Line).show_text(worker_title(self.worker, self.snapshot.t, self.app, self.gone))

    def show(self, snap: Optional[Snapshot]) -> None:
        if snap is None:
            return
        self.snapshot = snap
        found = next((w for w in snap.workers if w.pid == self.pid), None)
        self.gone = found is None or found.state == GONE
        if found is not None:
            self.worker = found
        lines: List[Text] = master_banner(snap)
        if self.gone:
            reason = exit_reason(self.pid, snap.events)
            if self.worker is not None:
                reason.append(" · showing its last data", "dim")
            lines.append(reason)
        w = self.worker
        if w is None:
            self.query_one("#title", Line).show_text(join(paused_mark(self.app), ("worker ", "dim"),
                                                          (str(self.pid), "bold")))
            self.query_one("#banner", Line).show_text(Text("\n", end="").join(lines))
            self.query_one("#wevents", Line).show_text(self._events(snap))
            return
        for m in w.missing:
            lines.append(join(("⚠ ", "yellow"), safe_text(m, 300)))
        if w.leak_routes:
            parts = [safe_text(f"{route} {fmt_pct(share)}", 120) for route, share in w.leak_routes[:4]]
            lines.append(join(("growing while serving: ", "red"), Text(", ", end="").join(parts)))
        self.query_one("#banner", Line).show_text(Text("\n", end="").join(lines))
        self.refresh_header()
        pyspy = snap.source("pyspy")
        note = None
        if pyspy is not None and pyspy.state not in ("ok", "waiting"):
            note = join((f"no live stacks: py-spy {pyspy.state}: ", "yellow"), safe_text(pyspy.detail or DASH, 200))
        self.query_one("#stacks", Line).show_text(stacks_text(w, note))
        self.query_one("#rss", SeriesChart).set_values(w.rss_history, "red" if w.leak_suspected else "green")
        self.query_one("#fds", SeriesChart).set_values(w.fd_history, "cyan")
        table = self.query_one(ServedTable)
        table.now = snap.t
        table.sync([(f"{r.tid}:{r.end!r}:{r.duration_ms!r}:{i}", r) for i, r in enumerate(w.recent_requests)])
        self.query_one("#served-note", Line).show_text(
            None if w.recent_requests else Text("no requests seen from this worker yet", "dim"))
        self.query_one("#wevents", Line).show_text(self._events(snap))

    def _events(self, snap: Snapshot) -> Text:
        mine = [e for e in snap.events if e.pid == self.pid]
        return events_text(mine, snap.t, 20)

    def action_back(self) -> None:
        self.app.pop_screen()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        rec = self.query_one(ServedTable).item(event.row_key.value)
        if isinstance(rec, RequestRecord):
            self.post_message(OpenRoute(f"{rec.method} {rec.route}"))
