"""Plain, immutable events that the sources produce and the model folds.

Sources (psutil poller, py-spy sampler, UDP listener) do I/O and nothing else;
they turn what they read into these values. The model never does I/O. Times
are wall-clock seconds since the epoch (``time.time()``), the clock the beacon
uses too. Beacon traffic reaches the model as :class:`flasktop.protocol.Datagram`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class GunicornConfig:
    """What could be read of gunicorn's settings from the master's command line.

    ``None`` means "not given on the command line"; :meth:`effective_*` apply
    gunicorn's own defaults.
    """

    cmdline: Tuple[str, ...] = ()
    app: Optional[str] = None
    worker_class: Optional[str] = None  # "sync", "gthread", "gevent", or a dotted path
    workers: Optional[int] = None
    threads: Optional[int] = None
    timeout: Optional[float] = None
    graceful_timeout: Optional[float] = None
    max_requests: Optional[int] = None
    max_requests_jitter: Optional[int] = None
    bind: Tuple[str, ...] = ()
    preload: bool = False
    config_file: Optional[str] = None  # -c/--config; its values are not read
    # The command line is gunicorn's process title (``gunicorn: master [app]``, set when
    # setproctitle is installed): settings given as arguments cannot be read from it.
    args_hidden: bool = False

    @property
    def effective_timeout(self) -> float:
        return self.timeout if self.timeout is not None else 30.0

    @property
    def timeout_assumed(self) -> bool:
        """The timeout is gunicorn's default only because the arguments that may have set
        it are hidden: stuck and killed-by-timeout judgements rest on a guess."""
        return self.args_hidden and self.timeout is None

    @property
    def effective_worker_class(self) -> str:
        if self.worker_class:
            return self.worker_class
        return "gthread" if (self.threads or 1) > 1 else "sync"


@dataclass(frozen=True)
class ProcStats:
    """One psutil reading of one process. A field that could not be read is
    ``None`` and named in ``missing`` with the reason (never a zero)."""

    pid: int
    create_time: float
    t: float
    rss: Optional[int] = None
    uss: Optional[int] = None  # slower cadence; None between USS readings
    pss: Optional[int] = None
    cpu_percent: Optional[float] = None
    num_threads: Optional[int] = None
    num_fds: Optional[int] = None
    num_connections: Optional[int] = None
    heartbeat_age_s: Optional[float] = None  # age of gunicorn's wgunicorn-* temp file
    status: str = ""  # psutil status: "running", "sleeping", "stopped", "tracing-stop", "zombie" ...
    missing: Tuple[Tuple[str, str], ...] = ()  # (field, reason), e.g. ("num_fds", "access denied")


@dataclass(frozen=True)
class TopologyTick:
    """The poller's view of one gunicorn master and its workers at time ``t``.

    ``workers`` are exactly the live workers (children of the master that are
    not a USR2 replacement master). ``new_master_pid`` is set when a child of
    the master is itself a gunicorn master (a USR2 upgrade in progress or done).
    """

    t: float
    master_pid: int
    master_alive: bool
    master: Optional[ProcStats]
    workers: Tuple[ProcStats, ...]
    config: GunicornConfig
    new_master_pid: Optional[int] = None


@dataclass(frozen=True)
class Frame:
    name: str
    filename: str
    line: int
    short_filename: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.short_filename or self.filename}:{self.line})"


@dataclass(frozen=True)
class ThreadDump:
    tid: int  # native (OS) thread id: py-spy's os_thread_id, the beacon's tid
    name: str
    active: bool
    owns_gil: bool
    frames: Tuple[Frame, ...]  # innermost first, as py-spy prints them
    py_thread_id: int = 0


@dataclass(frozen=True)
class StackSample:
    """One ``py-spy dump`` of one worker."""

    t: float
    pid: int
    threads: Tuple[ThreadDump, ...]
    dump_s: float = 0.0  # how long the dump took (the worker was paused about this long)


@dataclass(frozen=True)
class SourceState:
    """The health of one source, or of one source for one pid.

    ``state`` is one of: "ok", "waiting", "degraded", "denied", "missing",
    "error", "off". ``detail`` is one line for a person, saying what to do when
    something is wrong (e.g. "permission denied: run as the workers' user or
    root, or grant CAP_SYS_PTRACE").
    """

    source: str  # "psutil", "pyspy", "beacon"
    state: str
    detail: str = ""
    pid: Optional[int] = None
    t: float = 0.0


@dataclass(frozen=True)
class ListenerStats:
    """Cumulative counters of the UDP listener since it started."""

    t: float
    address: str  # "127.0.0.1:9711"
    received: int  # datagrams read from the socket
    accepted: int  # datagrams decoded
    events: int  # requests (an aggregate row's count included) and in-flight entries decoded
    rejected: Tuple[Tuple[str, int], ...] = ()  # (reason, count)
    lost: int = 0  # gaps in the beacons' sequence numbers
    kernel_drops: Optional[int] = None  # /proc/net/udp drops for the socket
    senders: int = 0  # distinct beacon pids heard from
    bytes: int = 0
    dropped_backlog: int = 0  # decoded datagrams the listener threw away because the model lagged


Event = object  # TopologyTick | StackSample | SourceState | ListenerStats | protocol.Datagram

__all__ = [
    "Event", "Frame", "GunicornConfig", "ListenerStats", "ProcStats", "SourceState",
    "StackSample", "ThreadDump", "TopologyTick",
]
