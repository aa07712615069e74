"""What the app needs from whatever produces snapshots (the engine, or a test)."""

from __future__ import annotations

from typing import Callable, Optional, Protocol

from flasktop.model.snapshot import Snapshot


class Feed(Protocol):
    def start(self, on_snapshot: Callable[[Snapshot], None]) -> None:
        """Begin collecting; call `on_snapshot` from the feed's own thread, about once a second."""

    def stop(self) -> None:
        """Stop collecting; must return quickly (the app calls it on exit)."""

    def focus(self, pid: Optional[int]) -> None:
        """Hint: the user is looking at this worker (sample it faster); None when they leave."""
