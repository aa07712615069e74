"""The UDP listener: beacon datagrams in, decoded :class:`Datagram` values out.

One daemon thread owns the socket. It sleeps on a timer, not in ``recv()``,
then reads everything waiting with non-blocking ``recv`` until EAGAIN, decodes
it, counts it, and hands the batch to a bounded backlog that the engine
drains. Nothing received is trusted; nothing received can stop the thread.

The counters the thread keeps are published, consistently, once per pass:
``stats()`` never sees a datagram counted as received but not yet as accepted
or rejected.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import os
import re
import socket
import threading
import time
from typing import Deque, Dict, Iterator, List, Optional, Tuple, Union

from flasktop.model.events import ListenerStats
from flasktop.protocol import MAX_DATAGRAM, Datagram, decode

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9711
DEFAULT_RCVBUF = 8 << 20
DEFAULT_BACKLOG = 100_000  # datagrams
DEFAULT_BACKLOG_EVENTS = 250_000  # requests + in-flight entries; ~300 bytes each once decoded (bench)
PID_TABLE = 4096  # senders whose sequence numbers are tracked (least recently heard evicted)
REORDER_WINDOW = 64  # a seq this far behind the highest seen is late; further back, a restart

# Sleep this long between reads, not in recv(). A thread asleep in recv() makes
# every sendto() in the app pay for waking it: bench/listener_throughput.py
# measured one sender's sendto() at ~22 us (median) against a receiver blocked in
# recv() and ~14 us against this timed drain (500 datagrams/s, 2-CPU VM). The
# app's cost is what matters, and the engine reads four times a second, so 25 ms
# of latency is free. When traffic is heavy the pause shrinks (down to
# _MIN_INTERVAL) so that a pass finds the kernel buffer at most about a quarter full.
DEFAULT_INTERVAL = 0.025
_MIN_INTERVAL = 0.001
_READ_BATCH = 4096  # datagrams per pass before publishing and looking at stop()
_TRUESIZE = 2304  # kernel bytes a full datagram takes in the receive buffer (measured)
_RECV_BUFFER = max(2048, MAX_DATAGRAM + 1)  # a longer datagram is read truncated, rejected as oversized
_MAX_REASONS = 64
LISTENER_ERROR = "listener_error"  # reject reason: handling one datagram raised

# SO_RCVBUFFORCE (root may exceed net.core.rmem_max). Python does not export it;
# 33 is its value in asm-generic, which these architectures use.
_RCVBUFFORCE: Optional[int] = getattr(socket, "SO_RCVBUFFORCE", None)
if _RCVBUFFORCE is None and os.uname().machine in (
        "x86_64", "i686", "i386", "aarch64", "armv7l", "armv6l", "riscv64", "ppc64le", "s390x"):
    _RCVBUFFORCE = 33

_HINT = "pick another with --beacon HOST:PORT"


class ListenerError(Exception):
    """The listener could not start; ``str()`` is one line for a person."""


class PortInUse(ListenerError):
    """The UDP port is taken. Says by whom when /proc/net/udp tells."""

    def __init__(self, host: str, port: int, uid: Optional[int] = None, user: Optional[str] = None,
                 pid: Optional[int] = None, command: Optional[str] = None) -> None:
        self.host = host
        self.port = port
        self.uid = uid
        self.user = user
        self.pid = pid
        self.command = command
        owner: List[str] = []
        if uid is not None:
            owner.append(f"uid {uid}" + (f", {user}" if user else ""))
        if pid is not None:
            owner.append(f"pid {pid}" + (f" {command}" if command else ""))
        who = f" (owner {', '.join(owner)})" if owner else ""
        super().__init__(f"UDP port {port} on {host} is already in use{who}; {_HINT}")


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_DIGITS = re.compile(r"[0-9]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]{0,251}[A-Za-z0-9_])?")
_DOTTED = re.compile(r"[0-9.]+")


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit - 1] + "\u2026")


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT`` (on 127.0.0.1) to ``(host, port)``.

    Raises ValueError with a one-line reason.
    """
    s = text.strip()
    shown = _short(s)
    example = "expected HOST:PORT, e.g. 127.0.0.1:9711 or [::1]:9711"
    if not s:
        raise ValueError(f"empty beacon address; {example}")
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"bad beacon address {shown}: no ']' after the IPv6 address; {example}")
        host, rest = s[1:end], s[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad beacon address {shown}: {_short(host)} is not an IPv6 address") from None
        if not rest:
            raise ValueError(f"bad beacon address {shown}: missing port; {example}")
        if rest[0] != ":":
            raise ValueError(f"bad beacon address {shown}: expected ':' and a port after ']'")
        port_text = rest[1:]
    elif _DIGITS.fullmatch(s):
        host, port_text = DEFAULT_HOST, s
    else:
        if s.count(":") > 1:
            raise ValueError(f"bad beacon address {shown}: an IPv6 address needs brackets, "
                             "e.g. [::1]:9711")
        host, sep, port_text = s.rpartition(":")
        if not sep:
            raise ValueError(f"bad beacon address {shown}: missing port; {example}")
        host = host or DEFAULT_HOST
        if _DOTTED.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"bad beacon address {shown}: {_short(host)} is not an IPv4 address") from None
        elif not _HOSTNAME.fullmatch(host):
            raise ValueError(f"bad beacon address {shown}: {_short(host)} is not a host name or address")
    if not port_text:
        raise ValueError(f"bad beacon address {shown}: missing port; {example}")
    if not _DIGITS.fullmatch(port_text) or len(port_text) > 5:
        raise ValueError(f"bad beacon address {shown}: port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"bad beacon address {shown}: port {port} is out of range (1-65535)")
    return host, port


class _Sender:
    """Sequence state of one beacon pid."""

    __slots__ = ("high", "missing")

    def __init__(self, seq: int) -> None:
        self.high = seq
        self.missing: set = set()


class Listener:
    """Receives beacon datagrams on UDP, decodes and counts them on its own thread."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 rcvbuf: int = DEFAULT_RCVBUF, backlog: int = DEFAULT_BACKLOG,
                 backlog_events: int = DEFAULT_BACKLOG_EVENTS, interval: float = DEFAULT_INTERVAL,
                 pid_table: int = PID_TABLE) -> None:
        if type(port) is not int or not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, not {port!r}")
        if backlog < 1 or backlog_events < 1 or pid_table < 1 or not interval > 0:
            raise ValueError("backlog, backlog_events, pid_table and interval must be positive")
        self.host = host
        self.port = port
        self.requested_rcvbuf = rcvbuf
        self.rcvbuf = 0  # what the kernel granted (Linux reports twice the request)
        self.last_error: Optional[str] = None  # the last recv() failure, if any
        self._backlog_limit = backlog
        self._event_limit = backlog_events
        self._interval = interval
        self._pid_limit = pid_table
        self._sock: Optional[socket.socket] = None
        self._inode: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        # Owned by the listener thread.
        self._received = 0
        self._accepted = 0
        self._events = 0
        self._bytes = 0
        self._lost = 0
        self._senders = 0
        self._rejected: Dict[str, int] = {}
        self._pids: "collections.OrderedDict[int, _Sender]" = collections.OrderedDict()
        # Shared, under _lock.
        self._backlog: Deque[Datagram] = collections.deque()
        self._queued_events = 0
        self._dropped_backlog = 0
        self._published: Tuple[int, int, int, int, int, int, Tuple[Tuple[str, int], ...]] = (
            0, 0, 0, 0, 0, 0, ())
        self._drops: Optional[int] = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def tracked_pids(self) -> int:
        """Senders whose sequence numbers are being followed (at most ``pid_table``)."""
        return len(self._pids)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Bind and start the thread. Raises PortInUse or ListenerError (one line each)."""
        if self._started:
            raise RuntimeError("a Listener starts once")
        family, sockaddr = self._resolve()
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.rcvbuf = _grow_rcvbuf(sock, self.requested_rcvbuf)
            sock.bind(sockaddr)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            host = sockaddr[0]
            if e.errno == errno.EADDRINUSE:
                raise _port_in_use(host, self.port, family) from None
            if e.errno == errno.EACCES and 0 < self.port < 1024:
                raise ListenerError(f"cannot listen on UDP {format_address(host, self.port)}: "
                                    f"ports below 1024 need root; {_HINT}") from None
            raise ListenerError(f"cannot listen on UDP {format_address(host, self.port)}: "
                                f"{e.strerror or e}; {_HINT}") from None
        self.host, self.port = sock.getsockname()[:2]
        self._inode = os.fstat(sock.fileno()).st_ino
        self._sock = sock
        self._started = True
        self._thread = threading.Thread(target=self._run, name="flasktop-listener", daemon=True)
        self._thread.start()

    def _resolve(self) -> Tuple[int, Tuple[str, int]]:
        host = self.host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return family, (str(ip), self.port)
        try:
            infos = socket.getaddrinfo(host, self.port, 0, socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise ListenerError(f"cannot resolve beacon host {_short(host)}: {reason}; {_HINT}") from None
        infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
        if not infos:
            raise ListenerError(f"no IPv4 or IPv6 address for beacon host {_short(host)}; {_HINT}")
        # The beacon prefers IPv4 for a name with both; listen where it sends.
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
        return infos[0][0], (str(infos[0][4][0]), self.port)

    def stop(self) -> None:
        """Stop the thread and close the socket. Idempotent; returns promptly."""
        self._stop.set()
        th = self._thread
        if th is not None and th is not threading.current_thread():
            th.join(timeout=5.0)
        sock, self._sock = self._sock, None
        if sock is not None:
            self._drops = self._read_drops()
            sock.close()

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        view = memoryview(bytearray(_RECV_BUFFER))
        capacity = max(16, self.rcvbuf // _TRUESIZE)
        pause = self._interval
        while True:
            n = self._pass(view)
            if n >= _READ_BATCH:
                pause = 0.0
            elif n >= capacity // 4:
                pause = max(_MIN_INTERVAL, pause / 2)
            elif n < capacity // 16:
                pause = min(self._interval, max(_MIN_INTERVAL, pause * 2))
            stopping = self._stop.wait(pause) if pause > 0 else self._stop.is_set()
            if stopping:
                break
        self._pass(view)  # what arrived before stop() is counted

    def _pass(self, view: memoryview) -> int:
        """Read what is waiting (up to _READ_BATCH), then publish. Returns datagrams read."""
        sock = self._sock
        if sock is None:
            return 0
        got: List[Datagram] = []
        n = 0
        recv_into = sock.recv_into
        trunc = socket.MSG_TRUNC
        while n < _READ_BATCH:
            try:
                size = recv_into(view, 0, trunc)  # with MSG_TRUNC: the datagram's real length
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.last_error = f"recv: {e.strerror or e}"
                break
            n += 1
            self._received += 1
            self._bytes += size
            try:
                d = decode(bytes(view[:min(size, _RECV_BUFFER)]))
                if type(d) is Datagram:
                    self._track(d.pid, d.seq)
                    got.append(d)
                    self._accepted += 1
                    self._events += len(d.requests) + len(d.inflight) + sum(
                        a.count for a in d.aggregates)
                else:
                    self._reject(d.reason)
            except Exception:  # noqa: BLE001 - one bad datagram must not stop the listener
                self._reject(LISTENER_ERROR)
        self._publish(got)
        return n

    def _reject(self, reason: object) -> None:
        key = reason if isinstance(reason, str) and len(reason) <= 40 else "other"
        rejected = self._rejected
        if key not in rejected and len(rejected) >= _MAX_REASONS:
            key = "other"
        rejected[key] = rejected.get(key, 0) + 1

    def _track(self, pid: int, seq: int) -> None:
        """Count sequence gaps per pid: losses, late arrivals, restarts."""
        pids = self._pids
        st = pids.get(pid)
        if st is None:
            self._senders += 1
            pids[pid] = _Sender(seq)
            if len(pids) > self._pid_limit:
                pids.popitem(last=False)
            return
        pids.move_to_end(pid)
        high = st.high
        if seq > high:
            if seq > high + 1:
                self._lost += seq - high - 1
                missing = st.missing
                missing.update(range(max(high + 1, seq - REORDER_WINDOW), seq))
                if len(missing) > REORDER_WINDOW:
                    floor = seq - REORDER_WINDOW
                    st.missing = {s for s in missing if s >= floor}
            st.high = seq
        elif seq in st.missing:
            st.missing.discard(seq)  # late, not lost
            self._lost -= 1
        elif high - seq > REORDER_WINDOW:
            # Far behind: a new process that got a recycled pid. Start over, count no loss.
            self._senders += 1
            st.high = seq
            st.missing = set()
        # else: a duplicate, or later than the window remembers; not a loss either way

    def _publish(self, got: List[Datagram]) -> None:
        rejected = tuple(sorted(self._rejected.items()))
        with self._lock:
            q = self._backlog
            if got:
                q.extend(got)
                self._queued_events += sum(map(_rows, got))
                while len(q) > self._backlog_limit or (
                        self._queued_events > self._event_limit and len(q) > 1):
                    old = q.popleft()
                    self._queued_events -= _rows(old)
                    self._dropped_backlog += 1
            self._published = (self._received, self._accepted, self._events, self._lost,
                               self._senders, self._bytes, rejected)

    # -- the consumer side ------------------------------------------------------------

    def drain(self, max_items: Optional[int] = None) -> List[Datagram]:
        """Take decoded datagrams, oldest first (at most ``max_items``). Thread-safe."""
        with self._lock:
            q = self._backlog
            if max_items is None or max_items >= len(q):
                self._backlog = collections.deque()
                self._queued_events = 0
                return list(q)
            out = []
            for _ in range(max(0, max_items)):
                d = q.popleft()
                self._queued_events -= _rows(d)
                out.append(d)
            return out

    def stats(self) -> ListenerStats:
        """Counters since start, as of the thread's last pass; kernel drops read now."""
        if self._sock is not None:
            self._drops = self._read_drops()
        with self._lock:
            received, accepted, events, lost, senders, nbytes, rejected = self._published
            dropped = self._dropped_backlog
        return ListenerStats(
            t=time.time(), address=self.address, received=received, accepted=accepted,
            events=events, rejected=rejected, lost=lost, kernel_drops=self._drops,
            senders=senders, bytes=nbytes, dropped_backlog=dropped)

    def _read_drops(self) -> Optional[int]:
        """The ``drops`` column of /proc/net/udp(6) for our socket; None where unreadable."""
        inode = self._inode
        if inode is None:
            return None
        for row in _proc_udp_rows():
            if row[9] == str(inode):
                try:
                    return int(row[12])
                except ValueError:
                    return None
        return None


def _rows(d: Datagram) -> int:
    """Decoded rows a datagram holds (requests, in-flight entries, aggregate rows): its weight
    in the backlog."""
    return len(d.requests) + len(d.inflight) + len(d.aggregates)


def _grow_rcvbuf(sock: socket.socket, want: int) -> int:
    """Ask for a ``want``-byte receive buffer (forced past rmem_max as root); return what we got."""
    if want > 0:
        forced = False
        if _RCVBUFFORCE is not None and os.geteuid() == 0:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _RCVBUFFORCE, want)
                forced = True
            except OSError:
                pass
        if not forced:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
            except OSError:
                pass
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def _proc_udp_rows() -> Iterator[List[str]]:
    """Rows of /proc/net/udp and /proc/net/udp6, split; unreadable files are skipped."""
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name, encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            row = line.split()
            if len(row) >= 13:
                yield row


_IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def _hex_address(text: str) -> Optional[Tuple[_IP, int]]:
    """Decode ``0100007F:25FF`` (kernel byte order, per 32-bit word) to (address, port)."""
    try:
        addr_hex, port_hex = text.split(":")
        raw = bytes.fromhex(addr_hex)
        if len(raw) not in (4, 16):
            return None
        swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        return ipaddress.ip_address(swapped), int(port_hex, 16)
    except ValueError:
        return None


def _port_in_use(host: str, port: int, family: int) -> PortInUse:
    """Build the error, naming the owner of the conflicting socket where /proc says."""
    try:
        ours = ipaddress.ip_address(host)
    except ValueError:
        ours = None
    best: Optional[List[str]] = None
    for row in _proc_udp_rows():
        parsed = _hex_address(row[1])
        if parsed is None or parsed[1] != port:
            continue
        addr = parsed[0]
        if ours is not None and addr == ours:
            best = row
            break
        if best is None and (addr.is_unspecified or ours is None or ours.is_unspecified
                             or addr.version != ours.version):
            best = row
    if best is None:
        return PortInUse(host, port)
    uid: Optional[int]
    try:
        uid = int(best[7])
    except ValueError:
        uid = None
    user = _user_name(uid) if uid is not None else None
    pid, command = _socket_owner(best[9])
    return PortInUse(host, port, uid, user, pid, command)


def _user_name(uid: int) -> Optional[str]:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError, OverflowError):
        return None


def _socket_owner(inode: str, budget_s: float = 0.5) -> Tuple[Optional[int], Optional[str]]:
    """The pid holding ``socket:[inode]``, if /proc lets us see it within ``budget_s``."""
    target = f"socket:[{inode}]"
    deadline = time.monotonic() + budget_s
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None, None
    for p in pids:
        if time.monotonic() > deadline:
            break
        fd_dir = f"/proc/{p}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:
                    continue
            except OSError:
                continue
            try:
                with open(f"/proc/{p}/comm", encoding="utf-8", errors="replace") as f:
                    command: Optional[str] = f.read().strip()[:32] or None
            except OSError:
                command = None
            if command is not None and not command.isprintable():
                command = None
            return int(p), command
    return None, None


__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Listener", "ListenerError", "PortInUse",
           "format_address", "parse_address"]
