"""When no --pid is given and several gunicorn masters run: let the user pick one."""

from __future__ import annotations

from typing import Optional, Sequence

from rich.text import Text
from textual.app import App, ComposeResult
from textual.widgets import Footer, OptionList, Static
from textual.widgets.option_list import Option

from flasktop.textsafe import sanitize


class PickerApp(App[Optional[int]]):
    """A list of masters; Enter attaches, q or Escape quits."""

    BINDINGS = [("q", "quit_picker", "Quit"), ("escape", "quit_picker", "Quit")]
    CSS = "OptionList { height: 1fr; } #title { padding: 0 1; text-style: bold; }"

    def __init__(self, masters: Sequence[object]) -> None:
        super().__init__()
        self.masters = list(masters)

    def compose(self) -> ComposeResult:
        yield Static(f"{len(self.masters)} gunicorn masters on this machine: pick one", id="title")
        options = []
        for m in self.masters:
            cmd = sanitize(" ".join(getattr(m, "cmdline", ()) or ()), 100)
            bind = sanitize(", ".join(getattr(m, "bind", ()) or ()), 40)
            options.append(Option(Text(f"{m.pid:>8}  {bind:<22} {cmd}"), id=str(m.pid)))
        yield OptionList(*options)
        yield Footer()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.exit(int(event.option.id or 0) or None)

    def action_quit_picker(self) -> None:
        self.exit(None)


def pick(masters: Sequence[object]) -> Optional[int]:
    return PickerApp(masters).run()
