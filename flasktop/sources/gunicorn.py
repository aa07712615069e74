"""Finding gunicorn: which process is the master, who its workers are, how it was configured.

Roles come from structure, not names: a worker is a child of a master that
shares the master's listening sockets (inherited across fork, compared by
socket inode through ``/proc/<pid>/fd``) or holds a ``wgunicorn-*`` heartbeat
file. A USR2 upgrade makes the new master a *child* of the old one; it is told
apart by its environment (``GUNICORN_PID`` = its parent, set by gunicorn's
``reexec``), or, when that is unreadable, by having gunicorn children of its
own. Configuration is read from the command line, ``GUNICORN_CMD_ARGS`` and
simple ``name = literal`` assignments in the config file (parsed with ``ast``,
never executed). Linux only: everything here reads ``/proc``.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import socket
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import psutil

from flasktop.model.events import GunicornConfig

PROC = "/proc"
HEARTBEAT_PREFIX = "wgunicorn-"
CONFIG_FILE_LIMIT = 1 << 20  # bytes of a config file we are willing to parse
_NAME_RE = re.compile(r"^gunicorn[\d.]*(\.py)?$")
_TITLE_RE = re.compile(r"^gunicorn: (master|worker) \[(.*)\]")
_PYTHON_RE = re.compile(r"^(python|pypy)[\d.]*[dmu]*$")


class NotGunicorn(Exception):
    """The pid is not a gunicorn master or worker; ``str()`` is one line for a person."""


@dataclass(frozen=True)
class MasterInfo:
    """A gunicorn master found on this machine (for the picker)."""

    pid: int
    cmdline: Tuple[str, ...]
    bind: Tuple[str, ...]
    parent_master: Optional[int] = None  # set for a USR2 new master: the old master's pid
    workers: int = 0


# --------------------------------------------------------------------------- command lines

def gunicorn_args(argv: Sequence[str]) -> Optional[List[str]]:
    """The arguments gunicorn itself parses, or None when ``argv`` is not a gunicorn command.

    Recognises ``gunicorn ...``, ``python /path/gunicorn ...``, ``python -m gunicorn ...``
    and setproctitle titles (``gunicorn: master [app]``, which keep no arguments).
    """
    argv = [str(a) for a in argv]
    if not argv:
        return None
    if is_process_title(argv):
        return []
    first = os.path.basename(argv[0])
    if _NAME_RE.match(first):
        return argv[1:]
    if not _PYTHON_RE.match(first):
        return None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "-m" and i + 1 < len(argv):
            return argv[i + 2:] if _is_gunicorn_module(argv[i + 1]) else None
        if a.startswith("-m") and len(a) > 2:
            return argv[i + 1:] if _is_gunicorn_module(a[2:]) else None
        if a in ("-c", "--"):
            return None
        if a.startswith("-"):
            if a in ("-W", "-X", "--check-hash-based-pycs"):
                i += 1
            i += 1
            continue
        return argv[i + 1:] if _is_gunicorn_script(a) else None
    return None


def is_process_title(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is gunicorn's setproctitle title (``gunicorn: master [app]``), which
    replaces the command line and keeps none of its arguments."""
    return _title(argv) is not None


def _title(argv: Sequence[str]) -> Optional["re.Match[str]"]:
    return _TITLE_RE.match(" ".join(str(a) for a in argv))


def _is_gunicorn_script(path: str) -> bool:
    """``.../bin/gunicorn``, or a file of the gunicorn package (``python -m gunicorn`` re-exec'd
    by USR2 shows as ``python .../gunicorn/__main__.py``)."""
    if _NAME_RE.match(os.path.basename(path)):
        return True
    parts = path.replace("\\", "/").split("/")
    return path.endswith(".py") and "gunicorn" in parts[:-1]


def _is_gunicorn_module(name: str) -> bool:
    return name == "gunicorn" or name.startswith("gunicorn.")


def looks_like_gunicorn(argv: Sequence[str]) -> bool:
    return gunicorn_args(argv) is not None


# gunicorn's options that take no value (as of 27.0; older releases have a subset).
_FLAGS = frozenset("""
--reload --spew --check-config --print-config --preload --no-sendfile --reuse-port --daemon
--initgroups --disable-redirect-access-to-syslog --capture-output --log-syslog
--enable-stdio-inheritance --enable-backlog-metric --suppress-ragged-eofs --do-handshake-on-connect
--permit-obsolete-folding --strip-header-spaces --permit-unconventional-http-method
--permit-unconventional-http-version --casefold-http-method --no-control-socket --version --help
""".split())
_OPTIONAL_VALUE = frozenset(["--proxy-protocol"])
_VALUES = frozenset("""
--config --bind --backlog --workers --worker-class --threads --worker-connections --max-requests
--max-requests-jitter --timeout --graceful-timeout --keep-alive --limit-request-line
--limit-request-fields --limit-request-field_size --reload-engine --reload-extra-file --chdir --env
--pid --worker-tmp-dir --user --group --umask --forwarded-allow-ips --access-logfile
--access-logformat --error-logfile --log-file --log-level --logger-class --log-config
--log-config-json --log-syslog-to --log-syslog-prefix --log-syslog-facility --statsd-host
--dogstatsd-tags --statsd-prefix --name --pythonpath --paste --paster --proxy-allow-from --protocol
--uwsgi-allow-from --keyfile --certfile --ssl-version --cert-reqs --ca-certs --ciphers
--http-protocols --http2-cleartext --http2-max-concurrent-streams --http2-initial-window-size
--http2-max-frame-size --http2-max-header-list-size --paste-global --forwarder-headers --header-map
--asgi-loop --asgi-lifespan --asgi-disconnect-grace-period --websocket-max-message-size
--http-parser --root-path --dirty-app --dirty-workers --dirty-timeout --dirty-threads
--dirty-graceful-timeout --control-socket --control-socket-mode
""".split())
_LONG = _FLAGS | _OPTIONAL_VALUE | _VALUES
_SHORT_FLAGS = {"-D": "--daemon", "-R": "--enable-stdio-inheritance", "-v": "--version", "-h": "--help"}
_SHORT_VALUES = {"-c": "--config", "-b": "--bind", "-w": "--workers", "-k": "--worker-class",
                 "-t": "--timeout", "-e": "--env", "-p": "--pid", "-u": "--user", "-g": "--group",
                 "-m": "--umask", "-n": "--name"}
# long option -> (setting name, kind)
_SETTINGS = {
    "--config": ("config", "str"), "--bind": ("bind", "append"), "--workers": ("workers", "int"),
    "--worker-class": ("worker_class", "str"), "--threads": ("threads", "int"),
    "--max-requests": ("max_requests", "int"), "--max-requests-jitter": ("max_requests_jitter", "int"),
    "--timeout": ("timeout", "float"), "--graceful-timeout": ("graceful_timeout", "float"),
    "--preload": ("preload_app", "flag"), "--chdir": ("chdir", "str"), "--paste": ("paste", "str"),
    "--paster": ("paste", "str"),
}
_WORKER_CLASSES = {
    "gunicorn.workers.sync.SyncWorker": "sync",
    "gunicorn.workers.ggevent.GeventWorker": "gevent",
    "gunicorn.workers.ggevent.GeventPyWSGIWorker": "gevent_pywsgi",
    "gunicorn.workers.gtornado.TornadoWorker": "tornado",
    "gunicorn.workers.gthread.ThreadWorker": "gthread",
    "gunicorn.workers.geventlet.EventletWorker": "eventlet",
    "gunicorn.workers.gasgi.ASGIWorker": "asgi",
}


def _long_option(name: str) -> Optional[str]:
    """An exact long option, or argparse's unique-prefix abbreviation of one."""
    if name in _LONG:
        return name
    hits = [o for o in _LONG if o.startswith(name)]
    return hits[0] if len(hits) == 1 else None


def _parse_args(tokens: Sequence[str]) -> Tuple[Dict[str, object], List[str]]:
    """Settings found in gunicorn-style arguments (raw strings) and the positionals."""
    found: Dict[str, object] = {}
    positionals: List[str] = []

    def record(opt: str, value: Optional[str]) -> None:
        setting = _SETTINGS.get(opt)
        if setting is None:
            return
        name, kind = setting
        if kind == "flag":
            found[name] = True
        elif value is not None:
            if kind == "append":
                found.setdefault(name, [])
                found[name].append(value)  # type: ignore[union-attr]
            else:
                found[name] = value

    toks = [str(t) for t in tokens]
    i, n = 0, len(toks)
    while i < n:
        tok = toks[i]
        i += 1
        if tok == "--":
            positionals.extend(toks[i:])
            break
        if tok.startswith("--"):
            name, eq, val = tok.partition("=")
            opt = _long_option(name)
            if opt is None or opt in _FLAGS:
                if opt is not None:
                    record(opt, None)
                continue
            if eq:
                record(opt, val)
            elif opt in _OPTIONAL_VALUE:
                if i < n and not toks[i].startswith("-"):
                    i += 1
            elif i < n:
                record(opt, toks[i])
                i += 1
            continue
        if tok.startswith("-") and len(tok) > 1:
            j = 1
            while j < len(tok):
                short = "-" + tok[j]
                if short in _SHORT_FLAGS:
                    record(_SHORT_FLAGS[short], None)
                    j += 1
                    continue
                if short in _SHORT_VALUES:
                    rest = tok[j + 1:]
                    if rest.startswith("="):
                        rest = rest[1:]
                    if rest:
                        record(_SHORT_VALUES[short], rest)
                    elif i < n:
                        record(_SHORT_VALUES[short], toks[i])
                        i += 1
                break
            continue
        positionals.append(tok)
    return found, positionals


def _as_int(v: object) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _as_float(v: object) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _worker_class(v: object) -> Optional[str]:
    if not isinstance(v, str) or not v.strip():
        return None
    name = v.strip()
    if name.startswith("egg:gunicorn#"):
        name = name.split("#", 1)[1]
    return _WORKER_CLASSES.get(name, name)


def _binds(v: object) -> Tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(b for b in v if isinstance(b, str))
    return ()


def _pick_app(positionals: Sequence[str]) -> Optional[str]:
    for p in positionals:
        if re.match(r"^[A-Za-z_][\w.]*(:.+)?$", p):
            return p
    return positionals[0] if positionals else None


def parse_cmdline(argv: Sequence[str], env_args: Optional[str] = None,
                  file_values: Optional[Mapping[str, object]] = None,
                  web_concurrency: Optional[str] = None) -> GunicornConfig:
    """What gunicorn was told, from its command line (and optionally its other sources).

    ``argv`` is the master's full command line (``gunicorn ...`` or ``python -m gunicorn ...``)
    or just gunicorn's own arguments. Precedence is gunicorn's: the command line beats
    ``GUNICORN_CMD_ARGS`` (``env_args``) beats the config file (``file_values``); an unset
    worker count falls back to ``WEB_CONCURRENCY``. Anything unparsable is None; never raises.
    """
    hidden = False
    try:
        hidden = is_process_title(argv)
        args = gunicorn_args(argv)
        if args is None:
            args = [str(a) for a in argv]
        cli, positionals = _parse_args(args)
        env: Dict[str, object] = {}
        if env_args:
            try:
                env, _ = _parse_args(shlex.split(env_args))
            except ValueError:
                env = {}
        merged: Dict[str, object] = dict(file_values or {})
        merged.update(env)
        merged.update(cli)
        app = _pick_app(positionals)
        if app is None:
            app_v = merged.get("wsgi_app") or merged.get("paste")
            app = app_v if isinstance(app_v, str) else None
        workers = _as_int(merged.get("workers"))
        if workers is None and web_concurrency is not None:
            workers = _as_int(web_concurrency)
        config = merged.get("config")
        preload = merged.get("preload_app")
        return GunicornConfig(
            cmdline=tuple(str(a) for a in argv),
            app=app,
            worker_class=_worker_class(merged.get("worker_class")),
            workers=workers,
            threads=_as_int(merged.get("threads")),
            timeout=_as_float(merged.get("timeout")),
            graceful_timeout=_as_float(merged.get("graceful_timeout")),
            max_requests=_as_int(merged.get("max_requests")),
            max_requests_jitter=_as_int(merged.get("max_requests_jitter")),
            bind=_binds(merged.get("bind")),
            preload=preload is True or (isinstance(preload, str) and preload.lower() == "true"),
            config_file=config if isinstance(config, str) else None,
            args_hidden=hidden,
        )
    except Exception:  # noqa: BLE001 - a hostile command line must not take us down
        return GunicornConfig(cmdline=tuple(str(a) for a in argv), args_hidden=hidden)


def read_config_file(path: str) -> Dict[str, object]:
    """Top-level ``name = literal`` assignments of a gunicorn config file, never executing it."""
    try:
        with open(path, "rb") as f:
            source = f.read(CONFIG_FILE_LIMIT + 1)
        if len(source) > CONFIG_FILE_LIMIT:
            return {}
        tree = ast.parse(source, filename=path)
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return {}
    out: Dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        try:
            literal = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            for t in targets:
                if isinstance(t, ast.Name):
                    out.pop(t.id, None)  # assigned something we cannot know: forget the older value
            continue
        for t in targets:
            if isinstance(t, ast.Name):
                out[t.id] = literal
    return out


def read_config(pid: int) -> Tuple[GunicornConfig, Optional[str]]:
    """The configuration of master ``pid`` and the config file read for it (if any).

    Reads the command line, and where permitted the environment (``GUNICORN_CMD_ARGS``,
    ``WEB_CONCURRENCY``) and the config file named by ``-c`` or ``gunicorn.conf.py`` in
    the master's working directory. Never raises for a live or dead pid.
    """
    try:
        proc = psutil.Process(pid)
        argv = _argv(proc)
    except psutil.Error:
        return GunicornConfig(), None
    try:
        environ: Mapping[str, str] = proc.environ()
    except psutil.Error:
        environ = {}
    try:
        cwd: Optional[str] = proc.cwd()
    except psutil.Error:
        cwd = None
    env_args = environ.get("GUNICORN_CMD_ARGS")
    first = parse_cmdline(argv, env_args, web_concurrency=environ.get("WEB_CONCURRENCY"))
    path = _config_path(first.config_file, cwd)
    values = read_config_file(path) if path is not None else {}
    config = parse_cmdline(argv, env_args, values, environ.get("WEB_CONCURRENCY")) \
        if values else first
    return _from_process(pid, argv, config), path


def _from_process(pid: int, argv: Sequence[str], config: GunicornConfig) -> GunicornConfig:
    """Fill in what a process title hides and the process itself shows: the addresses of the
    listening sockets the master holds (``bind``), and the name in the title (``app``:
    gunicorn's ``proc_name``, the app's module unless ``--name`` set another)."""
    changes: Dict[str, object] = {}
    if config.args_hidden and config.app is None:
        m = _title(argv)
        name = m.group(2).strip() if m else ""
        if name:
            changes["app"] = name
    if not config.bind:
        try:
            bind = _Probe().bind(pid)
        except OSError:
            bind = ()
        if bind:
            changes["bind"] = bind
    return dataclasses.replace(config, **changes) if changes else config  # type: ignore[arg-type]


def _config_path(config: Optional[str], cwd: Optional[str]) -> Optional[str]:
    if config is not None:
        if config.startswith("python:"):
            return None
        if not os.path.isabs(config):
            if cwd is None:
                return None
            config = os.path.join(cwd, config)
        return config if os.path.isfile(config) else None
    if cwd is None:
        return None
    default = os.path.join(cwd, "gunicorn.conf.py")
    return default if os.path.isfile(default) else None


# --------------------------------------------------------------------------- /proc

def read_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state letter, ppid, start time in clock ticks) from ``/proc/<pid>/stat``, None if gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        fields = data[data.rfind(b")") + 2:].split()
        return fields[0].decode(), int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def process_table() -> Dict[int, Tuple[str, int, int]]:
    """Every process: pid -> (state, ppid, start ticks), from one pass over /proc."""
    table: Dict[int, Tuple[str, int, int]] = {}
    try:
        names = os.listdir(PROC)
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def children_map(table: Mapping[int, Tuple[str, int, int]]) -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for pid, (_, ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    return kids


def fd_targets(pid: int) -> Dict[int, str]:
    """fd number -> readlink target. Raises PermissionError / FileNotFoundError."""
    out: Dict[int, str] = {}
    base = f"{PROC}/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except (OSError, ValueError):
            continue
    return out


def socket_inodes(targets: Iterable[str]) -> Set[int]:
    out: Set[int] = set()
    for t in targets:
        if t.startswith("socket:["):
            try:
                out.add(int(t[8:-1]))
            except ValueError:
                pass
    return out


def is_heartbeat_target(target: str) -> bool:
    return os.path.basename(target.replace(" (deleted)", "")).startswith(HEARTBEAT_PREFIX)


def _hex_addr(h: str) -> str:
    host, port = h.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
        return f"{ip}:{int(port, 16)}"
    words = struct.unpack("<4I", raw)
    ip = socket.inet_ntop(socket.AF_INET6, struct.pack(">4I", *words))
    return f"[{ip}]:{int(port, 16)}"


def listening_sockets(pid: int) -> Dict[int, str]:
    """Listening sockets in ``pid``'s network namespace: inode -> address ("host:port", "unix:path")."""
    out: Dict[int, str] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"{PROC}/{pid}/net/{name}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":
                try:
                    out[int(parts[9])] = _hex_addr(parts[1])
                except (ValueError, OSError, struct.error):
                    continue
    try:
        with open(f"{PROC}/{pid}/net/unix") as f:
            lines = f.readlines()[1:]
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 7:
            try:
                if int(parts[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                    out[int(parts[6])] = "unix:" + (parts[7] if len(parts) > 7 else "")
            except ValueError:
                continue
    return out


def _environ(pid: int) -> Optional[Dict[str, str]]:
    try:
        return psutil.Process(pid).environ()
    except psutil.Error:
        return None


def new_master_verdict(child: int, parent: int) -> Optional[bool]:
    """Is ``child`` a USR2 replacement master of ``parent``? None when its environment is unreadable."""
    env = _environ(child)
    if env is None or not env:
        return None
    return env.get("GUNICORN_PID") == str(parent)


def cmdline(pid: int) -> Optional[List[str]]:
    """``pid``'s command line (as :func:`_argv` reads it), or None when it cannot be read."""
    try:
        return _argv(psutil.Process(pid))
    except psutil.Error:
        return None


def _argv(proc: psutil.Process) -> List[str]:
    """``proc``'s command line. setproctitle (gunicorn uses it when installed) writes its
    title over the first argument and pads the rest of the old command line with NULs, which
    read back as empty arguments: those are dropped."""
    argv = proc.cmdline()
    while argv and not argv[-1]:
        argv.pop()
    return argv


def _describe(pid: int) -> str:
    try:
        p = psutil.Process(pid)
        cmd = " ".join(_argv(p)) or f"[{p.name()}]"
    except psutil.Error:
        return "?"
    cmd = "".join(c if c.isprintable() else "?" for c in cmd)
    return cmd if len(cmd) <= 80 else cmd[:77] + "..."


class _Probe:
    """Structural facts about processes, read lazily and remembered for one resolution."""

    def __init__(self) -> None:
        self.table = process_table()
        self.kids = children_map(self.table)
        self._fds: Dict[int, Optional[Dict[int, str]]] = {}
        self._listen: Dict[int, Dict[int, str]] = {}

    def fds(self, pid: int) -> Optional[Dict[int, str]]:
        if pid not in self._fds:
            try:
                self._fds[pid] = fd_targets(pid)
            except OSError:
                self._fds[pid] = None
        return self._fds[pid]

    def listeners(self, pid: int) -> Optional[Set[int]]:
        """Inodes of the listening sockets ``pid`` holds; None when its fds are unreadable."""
        fds = self.fds(pid)
        if fds is None:
            return None
        if pid not in self._listen:
            self._listen[pid] = listening_sockets(pid)
        return socket_inodes(fds.values()) & set(self._listen[pid])

    def bind(self, pid: int) -> Tuple[str, ...]:
        """Addresses of the listeners the workers share (not e.g. gunicorn 27's control socket)."""
        inodes = self.listeners(pid)
        if not inodes:
            return ()
        shared: Set[int] = set()
        for k in self.live_kids(pid)[:8]:
            fds = self.fds(k)
            if fds is not None:
                shared |= inodes & socket_inodes(fds.values())
        return tuple(sorted({self._listen[pid][i] for i in (shared or inodes)}))

    def has_heartbeat(self, pid: int) -> Optional[bool]:
        fds = self.fds(pid)
        return None if fds is None else any(is_heartbeat_target(t) for t in fds.values())

    def live_kids(self, pid: int) -> List[int]:
        return [k for k in self.kids.get(pid, []) if self.table[k][0] not in "ZX"]

    def shares_listener(self, child: int, parent: int) -> Optional[bool]:
        """Does ``child`` look like a worker of ``parent`` by what it holds? None if unreadable."""
        theirs = self.listeners(parent)
        mine = self.fds(child)
        if theirs is None or mine is None:
            return None
        return bool(theirs & socket_inodes(mine.values())) or bool(self.has_heartbeat(child))

    def is_gunicorn(self, pid: int) -> bool:
        argv = cmdline(pid)
        if argv is not None and looks_like_gunicorn(argv):
            return True
        return self.structural_master(pid) or self.structural_worker(pid)

    def structural_worker(self, pid: int) -> bool:
        """Holds a heartbeat file and shares a listening socket with its parent (any launcher)."""
        st = self.table.get(pid)
        if st is None or not self.has_heartbeat(pid):
            return False
        theirs = self.listeners(st[1])
        mine = self.fds(pid)
        return bool(theirs and mine and theirs & socket_inodes(mine.values()))

    def structural_master(self, pid: int) -> bool:
        return any(self.structural_worker(k) for k in self.live_kids(pid)[:8])

    def is_new_master(self, child: int, parent: int) -> bool:
        verdict = new_master_verdict(child, parent)
        if verdict is not None:
            return verdict
        # environment unreadable: a master has gunicorn children that share its sockets
        for k in self.live_kids(child)[:8]:
            argv = cmdline(k)
            if argv is not None and looks_like_gunicorn(argv) and self.shares_listener(k, child) is not False:
                return True
        return False

    def worker_of(self, pid: int) -> Optional[int]:
        """The master ``pid`` is a worker of, or None when ``pid`` is a master itself."""
        st = self.table.get(pid)
        if st is None:
            return None
        parent = st[1]
        if parent <= 0 or parent not in self.table or not self.is_gunicorn(parent):
            return None
        if self.is_new_master(pid, parent):
            return None
        if self.shares_listener(pid, parent) is False:
            return None
        return parent


def resolve_master(pid: int) -> Tuple[int, Optional[str]]:
    """The gunicorn master to attach to for ``pid`` (a master or a worker), and a note when it differs.

    Raises :class:`NotGunicorn` with one line when ``pid`` is neither.
    """
    if not isinstance(pid, int) or pid <= 0:
        raise NotGunicorn(f"no process with pid {pid}")
    try:
        proc = psutil.Process(pid)
        status = proc.status()
    except psutil.NoSuchProcess:
        raise NotGunicorn(f"no process with pid {pid}") from None
    except psutil.AccessDenied:
        raise NotGunicorn(f"pid {pid}: permission denied reading /proc/{pid} "
                          "(run as the app's user or root)") from None
    if status == psutil.STATUS_ZOMBIE:
        raise NotGunicorn(f"pid {pid} has exited (a zombie not yet reaped by its parent); "
                          "it is not a running gunicorn master or worker")
    probe = _Probe()
    if pid not in probe.table:
        raise NotGunicorn(f"no process with pid {pid}")
    if not probe.is_gunicorn(pid):
        raise NotGunicorn(f"pid {pid} ({_describe(pid)}) is not a gunicorn master or worker")
    master = probe.worker_of(pid)
    if master is None:
        parent = probe.table[pid][1]
        if parent > 0 and parent in probe.table and probe.is_gunicorn(parent) \
                and probe.is_new_master(pid, parent):
            return pid, (f"{pid} is the new gunicorn master of a USR2 upgrade "
                         f"(old master {parent}); attached to it")
        return pid, None
    grand = probe.worker_of(master)
    if grand is not None:
        return grand, (f"{pid} is a child process of gunicorn worker {master}; "
                       f"attached to its master {grand}")
    return master, f"{pid} is a worker of gunicorn master {master}; attached to the master"


def find_masters() -> List[MasterInfo]:
    """Every gunicorn master on this machine, USR2 new masters included (with ``parent_master``)."""
    probe = _Probe()
    gunicorns: Dict[int, List[str]] = {}
    for pid, (state, _, _) in probe.table.items():
        if state in "ZX" or pid == os.getpid():
            continue
        argv = cmdline(pid)
        if argv is not None and looks_like_gunicorn(argv):
            gunicorns[pid] = argv
    out: List[MasterInfo] = []
    for pid, argv in sorted(gunicorns.items()):
        parent = probe.table[pid][1]
        parent_master: Optional[int] = None
        if parent in gunicorns:
            if not probe.is_new_master(pid, parent):
                continue  # a worker (or a worker's child)
            parent_master = parent
        bind = probe.bind(pid) or parse_cmdline(argv).bind
        workers = sum(1 for k in probe.live_kids(pid) if k in gunicorns
                      and not probe.is_new_master(k, pid))
        out.append(MasterInfo(pid=pid, cmdline=tuple(argv), bind=bind,
                              parent_master=parent_master, workers=workers))
    return out


__all__ = [
    "MasterInfo", "NotGunicorn", "cmdline", "find_masters", "gunicorn_args", "looks_like_gunicorn",
    "parse_cmdline", "read_config", "read_config_file", "resolve_master",
]
