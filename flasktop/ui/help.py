"""The `?` screen: every key, and what the marks mean."""

from __future__ import annotations

from typing import ClassVar, List, Tuple

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from flasktop.ui.widgets import composed

KEYS: Tuple[Tuple[str, str], ...] = (
    ("↑ ↓ PgUp PgDn", "move in the focused table or pane"),
    ("Tab, Shift+Tab", "next, previous pane"),
    ("Enter", "open the highlighted route, worker or request"),
    ("Esc", "back; on the overview, clear the filter"),
    ("/", "filter routes and workers by substring"),
    ("s, S", "cycle the focused table's sort column; reverse"),
    ("p", "pause the view (collection goes on); p again"),
    ("", "jumps to the latest snapshot"),
    ("?", "this help"),
    ("q", "quit"),
)

MARKS: Tuple[Tuple[str, str], ...] = (
    ("▲", "a slow route (the slow-route detector)"),
    ("LEAK", "memory keeps growing past warm-up"),
    ("41s / 1m00s", "on this request for 41 s; gunicorn kills at 60 s"),
    ("≥12s", "no beacon: a lower bound from an unchanged stack"),
    ("PAUSED +3", "the view is frozen; 3 newer snapshots wait"),
    ("busy", "share of all workers' busy time in the route"),
    ("self, total", "share of a route's samples in a frame, or under it"),
    ("␛ �", "a control or invisible character from outside"),
)


def help_text() -> Text:
    out = Text(end="")
    out.append("Keys\n", "bold underline")
    for key, what in KEYS:
        out.append(f"  {key:<16}", "bold cyan")
        out.append(what + "\n")
    out.append("\nMarks\n", "bold underline")
    for mark, what in MARKS:
        out.append(f"  {mark:<16}", "bold")
        out.append(what + "\n")
    out.append("\nEsc, ? or Enter closes this.", "dim")
    return out


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[List[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("question_mark", "close", "Close", show=False),
        Binding("enter", "close", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(help_text(), id="help-text", markup=False)

    def on_mount(self) -> None:
        if not composed(self):
            return
        self.query_one("#help").border_title = "flasktop help"

    def action_close(self) -> None:
        self.dismiss(None)
