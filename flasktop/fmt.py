"""How flasktop writes numbers: one set of formatters for the UI and the text report."""

from __future__ import annotations

import math
from typing import Optional

DASH = "—"


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return DASH
    if ms < 1:
        return f"{ms:.2f}ms"
    if ms < 10:
        return f"{ms:.1f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    if ms < 10_000:
        return f"{ms / 1000:.2f}s"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    return fmt_duration(ms / 1000)


def fmt_duration(s: Optional[float]) -> str:
    if s is None:
        return DASH
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    if s < 86400:
        return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"
    return f"{int(s // 86400)}d{int(s % 86400 // 3600):02d}h"


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return DASH
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(b) >= size:
            v = b / size
            return f"{v:.1f}{unit}" if abs(v) < 10 else f"{v:.0f}{unit}"
    return f"{b:.0f}B"


def _small(v: float, unit: str) -> str:
    """A non-negative quantity in at most three significant characters: 0, <0.1, 7.5, 42."""
    if v == 0:
        return "0" + unit
    if v < 0.1:
        return "<0.1" + unit
    if v < 10:
        return f"{v:.1f}{unit}"
    return f"{v:.0f}{unit}"


def fmt_rate(r: Optional[float]) -> str:
    return DASH if r is None else _small(r, "/s")


def fmt_pct(x: Optional[float]) -> str:
    return DASH if x is None else _small(x * 100, "%")


def fmt_growth(mb_per_min: Optional[float]) -> str:
    if mb_per_min is None:
        return DASH
    if abs(mb_per_min) < 0.05:
        return "0.0"
    return f"{mb_per_min:+.1f}" if abs(mb_per_min) < 100 else f"{mb_per_min:+.0f}"


def fmt_ago(now: float, t: float) -> str:
    return fmt_duration(now - t) + " ago"
