"""Plain-text helpers: outside strings made safe, numbers made short."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Span, Text

from flasktop.fmt import (  # noqa: F401 - the UI's formatters, shared with the text report
    DASH, fmt_ago, fmt_bytes, fmt_duration, fmt_growth, fmt_ms, fmt_pct, fmt_rate,
)
from flasktop.textsafe import sanitize



# C0 controls and DEL as their visible control pictures (ESC shows as ␛); everything
# else unsafe is flasktop.textsafe's one definition, shared with the text report.
_PICTURES: Dict[int, str] = {c: chr(0x2400 + c) for c in range(0x20)}
_PICTURES[0x7F] = "\u2421"  # ␡


def clean(s: object, limit: int = 200) -> str:
    """`s` as a str without control, bidi, format or zero-width characters, at most `limit` long."""
    text = s if isinstance(s, str) else str(s)
    if len(text) > limit * 4:
        text = text[: limit * 4]
    return sanitize(text.translate(_PICTURES), limit)


def safe_text(s: object, limit: int = 200, style: str = "") -> Text:
    """Outside text as a plain rich Text: never markup, never a control sequence."""
    return Text(clean(s, limit), style=style, no_wrap=True, overflow="ellipsis", end="")


def join(*parts: Text | str | tuple, sep: str = "") -> Text:
    """Assemble Text from safe pieces; str pieces are ours (never outside text), never markup."""
    out = Text(end="", no_wrap=True, overflow="ellipsis")
    first = True
    for part in parts:
        if part is None or part == "":
            continue
        if not first and sep:
            out.append(sep)
        first = False
        if isinstance(part, tuple):
            out.append(part[0], style=part[1])
        else:
            out.append(part)
    return out


SPARKS = "▁▂▃▄▅▆▇█"
EIGHTHS = " ▁▂▃▄▅▆▇█"
H_EIGHTHS = " ▏▎▍▌▋▊▉█"


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values as block characters scaled between their min and max."""
    if width <= 0 or not values:
        return ""
    vals = list(values[-width:])
    lo, hi = min(vals), max(vals)
    span = hi - lo
    if span <= 0:
        return SPARKS[0] * len(vals)
    top = len(SPARKS) - 1
    return "".join(SPARKS[min(top, int((v - lo) / span * top + 0.5))] for v in vals)


def hbar(fraction: float, width: int) -> str:
    """A horizontal bar `width` cells wide filled to `fraction` (0..1) with eighth blocks."""
    if width <= 0:
        return ""
    fraction = min(1.0, max(0.0, fraction))
    eighths = int(round(fraction * width * 8))
    full, part = divmod(eighths, 8)
    bar = "█" * full + (H_EIGHTHS[part] if part else "")
    return bar.ljust(width)


_LOUD = {"red", "bright_red", "magenta", "bright_magenta"}
_BOLD = {"yellow", "bright_yellow"}
_MONO_CACHE: Dict[str, Style] = {}


def _mono_style(style: object) -> Style:
    key = str(style)
    cached = _MONO_CACHE.get(key)
    if cached is not None:
        return cached
    parsed = Style.parse(style) if isinstance(style, str) else (style if isinstance(style, Style) else Style())
    color: Optional[Color] = parsed.color
    name = color.name if color is not None else ""
    loud = name in _LOUD
    out = Style(bold=True if loud or name in _BOLD else parsed.bold, underline=True if loud else parsed.underline,
                dim=parsed.dim, italic=parsed.italic, reverse=parsed.reverse, strike=parsed.strike)
    _MONO_CACHE[key] = out
    return out


def monochrome(text: Text) -> Text:
    """`text` without colours: what was red is bold and underlined, what was yellow is bold (NO_COLOR)."""
    out = text.copy()
    out.style = _mono_style(text.style) if text.style else ""
    out.spans = [Span(sp.start, sp.end, _mono_style(sp.style)) for sp in text.spans]
    return out
