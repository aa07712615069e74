"""Make text from outside (route, thread, file names, process titles) safe for a terminal.

Whatever the app, py-spy or a datagram says is shown literally: control
characters (C0, DEL, C1, so ESC and every escape sequence), format characters
(bidirectional overrides and isolates, zero-width characters, the BOM, the Arabic
letter mark, invisible TAG characters ...), line and paragraph separators and lone
surrogates are replaced with a visible placeholder, and the length is capped.
Markup is a renderer's concern: the UI wraps the result in ``rich.text.Text`` so
``[/]`` stays ``[/]``.
"""

from __future__ import annotations

import re
import unicodedata

PLACEHOLDER = "\ufffd"
ELLIPSIS = "\u2026"
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f"  # C0, DEL, C1 (ESC, CSI ...)
    "\u200b-\u200f"  # zero-width space/joiners, LRM/RLM
    "\u2028\u2029"  # line/paragraph separators
    "\u202a-\u202e"  # bidi embeddings/overrides
    "\u2060-\u2064\u2066-\u2069"  # word joiner, invisible operators, bidi isolates
    "\ud800-\udfff"  # lone surrogates (JSON can carry them; no terminal can print them)
    "\ufeff\ufff9-\ufffb]"  # BOM/ZWNBSP, interlinear annotation
)
# Every other character of these categories too: Cc control, Cf format (U+061C, U+180E,
# U+00AD, the TAG block U+E0000-U+E007F ...), Cs surrogate, Zl/Zp separators.
_UNSAFE_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def _safe(ch: str) -> str:
    return PLACEHOLDER if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch


def sanitize(text: object, limit: int = 300) -> str:
    """``text`` as one safe line of at most ``limit`` characters."""
    s = text if isinstance(text, str) else str(text)
    if s.isascii() and s.isprintable() and len(s) <= limit:
        return s
    if len(s) > limit * 4:
        s = s[: limit * 4]
    s = _UNSAFE.sub(PLACEHOLDER, s)
    if not s.isascii():
        s = "".join(ch if ch < "\u00a0" else _safe(ch) for ch in s)
    if len(s) > limit:
        s = s[: max(0, limit - 1)] + ELLIPSIS
    return s
