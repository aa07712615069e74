"""The pure model: events and a clock in, an immutable Snapshot out. No I/O, no threads."""
