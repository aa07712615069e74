"""The `?` screen: every key, and what the marks mean."""

from __future__ import annotations

from typing import ClassVar, List, Tuple

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS: Tuple[Tuple[str, str], ...] = (
    ("↑ ↓ PgUp PgDn", "move in the focused table"),
    ("Tab / Shift+Tab", "next / previous pane"),
    ("Enter", "open the highlighted route or worker"),
    ("Esc", "back (or clear the filter)"),
    ("/", "filter routes and workers by substring"),
    ("s / S", "cycle the sort column of the focused table / reverse it"),
    ("p", "pause the view (collection goes on); again to jump to the latest"),
    ("?", "this help"),
    ("q", "quit"),
)

MARKS: Tuple[Tuple[str, str], ...] = (
    ("▲", "a slow route (flagged by the slow-route detector)"),
    ("LEAK", "memory keeps growing past warm-up"),
    ("41s / 60s", "time on the current request against gunicorn's timeout"),
    ("≥12s", "no beacon: a lower bound from an unchanged stack"),
    ("PAUSED +3", "the view is frozen; 3 newer snapshots are waiting"),
    ("busy", "share of all workers' busy time spent in the route"),
)


def help_text() -> Text:
    out = Text(end="")
    out.append("Keys\n", "bold underline")
    for key, what in KEYS:
        out.append(f"  {key:<17}", "bold cyan")
        out.append(what + "\n")
    out.append("\nMarks\n", "bold underline")
    for mark, what in MARKS:
        out.append(f"  {mark:<17}", "bold")
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
        self.query_one("#help").border_title = "flasktop help"

    def action_close(self) -> None:
        self.dismiss(None)
