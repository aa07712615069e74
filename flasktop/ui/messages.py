"""Every message the UI posts, as small dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from flasktop.model.snapshot import Snapshot


@dataclass
class SnapshotReady(Message):
    """A new snapshot from the feed; a newer one replaces one still queued."""

    snapshot: Snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady)


@dataclass
class OpenRoute(Message):
    """Drill into a route, by its row key ("METHOD route")."""

    key: str


@dataclass
class OpenWorker(Message):
    """Drill into a worker."""

    pid: int
