"""Where the beacon sends: precedence, parsing, and one name lookup per address."""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any, Dict, Mapping, Optional, Tuple, Union

log = logging.getLogger("flasktop.beacon")

OFF_WORDS = frozenset({"off", "false", "no", "none", "disable", "disabled"})

Target = Tuple[int, Tuple[Any, ...]]  # (address family, sockaddr for sendto)
AddressArg = Union[str, Tuple[str, int], None, bool]

_resolved: Dict[str, Optional[Target]] = {}
_lock = threading.Lock()


def choose(explicit: AddressArg = None, config: Optional[Mapping[str, Any]] = None) -> str:
    """The address text to use: explicit argument, else config, else env, else the default."""
    from flasktop.beacon import DEFAULT_ADDRESS

    if explicit is False:
        return "off"
    if explicit is not None and explicit != "":
        return _text(explicit)
    if config is not None:
        value = config.get("FLASKTOP_BEACON")
        if value is False:
            return "off"
        if value is not None and value != "":
            return _text(value)
    env = os.environ.get("FLASKTOP_BEACON", "").strip()
    return env or DEFAULT_ADDRESS


def _text(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(value).strip()


def is_off(text: str) -> bool:
    return text.strip().lower() in OFF_WORDS


def parse(text: str) -> Tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``port`` (on 127.0.0.1). Raises ValueError with a reason."""
    text = text.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ValueError("expected [ipv6]:port")
        host, port_text = text[1:end], text[end + 2:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets: [addr]:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, int(port_text)


def resolve(text: str) -> Optional[Target]:
    """Resolve once per process and address text, preferring IPv4; None means disabled.

    Never raises: a bad or unresolvable address is logged once and disables the beacon.
    """
    with _lock:
        if text in _resolved:
            return _resolved[text]
        target = _resolve(text)
        _resolved[text] = target
        return target


def _resolve(text: str) -> Optional[Target]:
    if is_off(text):
        log.info("flasktop beacon: off (FLASKTOP_BEACON=%s)", text)
        return None
    try:
        host, port = parse(text)
    except ValueError as e:
        log.warning("flasktop beacon: disabled, bad address %r: %s", text, e)
        return None
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        log.warning("flasktop beacon: disabled, cannot resolve %r: %s", host, e)
        return None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        log.warning("flasktop beacon: disabled, no IPv4 or IPv6 address for %r", host)
        return None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    log.info("flasktop beacon: sending to %s port %d (from %r)", sockaddr[0], sockaddr[1], text)
    return family, tuple(sockaddr)


def _new_lock() -> None:
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock)


def forget() -> None:
    """Drop cached resolutions (tests)."""
    with _lock:
        _resolved.clear()
