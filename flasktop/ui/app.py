"""The Textual app: it renders the latest Snapshot from a Feed, and nothing else."""

from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

from textual.app import App, ScreenStackError, UnknownModeError
from textual.binding import Binding, BindingType
from textual.filter import Monochrome, NoColor
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen

from flasktop.model.snapshot import Snapshot
from flasktop.ui.feed import Feed
from flasktop.ui.help import HelpScreen
from flasktop.ui.messages import OpenRoute, OpenWorker, SnapshotReady
from flasktop.ui.overview import OverviewScreen
from flasktop.ui.route import RouteScreen
from flasktop.ui.worker import WorkerScreen


class FlasktopApp(App[None]):
    """`flasktop --pid N`: overview, route and worker drill-downs, keyboard only."""

    CSS_PATH = "flasktop.tcss"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS: ClassVar[Optional[List[Tuple[int, str]]]] = [
        (0, "-narrow"), (110, "-wide"), (150, "-xwide")]
    VERTICAL_BREAKPOINTS: ClassVar[Optional[List[Tuple[int, str]]]] = [(0, "-short"), (34, "-tall")]
    BINDINGS: ClassVar[List[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("p", "pause", "Pause"),
    ]

    paused: reactive[bool] = reactive(False, init=False)

    def __init__(self, feed: Feed, title: str = "flasktop", attaching_to: str = "") -> None:
        super().__init__()
        self.feed = feed
        self.title = title
        self.attaching_to = attaching_to
        self.snapshot: Optional[Snapshot] = None  # the one on screen
        self.latest: Optional[Snapshot] = None  # the newest received
        self.pending = 0  # snapshots received while paused
        self.render_errors: List[str] = []
        self._focused_pid: Optional[int] = None
        self._feed_stopped = False
        if self.no_color:
            # NO_COLOR asks for no colour codes at all; Textual's default filter for it
            # (Monochrome) still paints 256-colour greys over the terminal's own colours.
            # Its NoColor filter emits none; our marks stay visible as bold/underline.
            self._filters = [NoColor() if isinstance(f, Monochrome) else f for f in self._filters]

    def get_default_screen(self) -> Screen:
        return OverviewScreen(self.attaching_to, self.title)

    def on_mount(self) -> None:
        self.screen_change_signal.subscribe(self, self._on_screen_change)
        self.feed.start(self._on_snapshot)

    def _on_snapshot(self, snap: Snapshot) -> None:
        """Called by the feed, from its own thread."""
        self.post_message(SnapshotReady(snap))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        self.latest = message.snapshot
        if self.paused:
            self.pending += 1
            self._refresh_header()
            return
        self._show_snapshot(message.snapshot)

    def _top_screen(self) -> Optional[Screen]:
        """The screen on top, or None once the app is closing: a snapshot posted by the
        feed's thread can arrive after the last screen left the stack."""
        try:
            return self.screen
        except (ScreenStackError, UnknownModeError):
            return None

    def _show_snapshot(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.pending = 0
        screen = self._top_screen()
        show = getattr(screen, "show", None)
        if show is None or not getattr(screen, "ready", False):
            return  # not composed yet: its on_mount renders self.snapshot
        with self.batch_update():
            try:
                show(snap)
            except Exception as exc:  # a rendering bug must not take the whole view down at 3 am
                first = not self.render_errors
                self.render_errors.append(f"{type(exc).__name__}: {exc}")
                self.log.error("render failed", exc)
                if first:
                    self.notify(f"display error: {type(exc).__name__}: {exc}", severity="error", markup=False)

    def _refresh_header(self) -> None:
        refresh = getattr(self._top_screen(), "refresh_header", None)
        if refresh is not None:
            refresh()

    def watch_paused(self, paused: bool) -> None:
        if not paused and self.latest is not None and self.latest is not self.snapshot:
            self._show_snapshot(self.latest)
        else:
            self._refresh_header()

    def action_pause(self) -> None:
        self.paused = not self.paused

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def on_open_route(self, message: OpenRoute) -> None:
        self.push_screen(RouteScreen(message.key))

    def on_open_worker(self, message: OpenWorker) -> None:
        self.push_screen(WorkerScreen(message.pid))

    def _on_screen_change(self, screen: Screen) -> None:
        self._sync_focus()

    def _sync_focus(self) -> None:
        """Tell the feed which worker the user is looking at (the top non-modal screen)."""
        pid: Optional[int] = None
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ModalScreen):
                continue
            if isinstance(screen, WorkerScreen):
                pid = screen.pid
            break
        if pid != self._focused_pid:
            self._focused_pid = pid
            self.feed.focus(pid)

    def stop_feed(self) -> None:
        if not self._feed_stopped:
            self._feed_stopped = True
            self.feed.stop()

    async def action_quit(self) -> None:
        self.stop_feed()
        self.exit()

    def on_unmount(self) -> None:
        self.stop_feed()
