"""Shared test support: real gunicorn processes, free loopback ports, waiting on conditions.

Every process a test starts is killed by pid (and its children with it), even when
the test fails. Nothing here sleeps for luck: :func:`wait_until` polls a condition
against a deadline and fails with a message when the deadline passes.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, TypeVar

import psutil

FIXTURES = Path(__file__).parent / "fixtures"
T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that is free now (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def written_line(path: Path) -> str:
    """The first line of ``path`` once it has been written whole, else "".

    A shell's ``echo ... > file`` creates the file before it writes to it, so a reader
    that only waits for the file to exist can read it empty.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    return text.split("\n", 1)[0].strip() if "\n" in text else ""


def wait_until(cond: Callable[[], T], timeout: float = 15.0, interval: float = 0.05,
               message: str = "condition") -> T:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Optional[BaseException] = None
    while True:
        try:
            value = cond()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Kill ``pid`` and all its descendants, by pid, and reap what we can."""
    try:
        proc = psutil.Process(pid)
        procs = proc.children(recursive=True) + [proc]
    except psutil.Error:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
    psutil.wait_procs(procs, timeout=5)


class Gunicorn:
    """A real gunicorn master serving an app from tests/fixtures on a loopback port."""

    def __init__(self, app: str, *args: str, env: Optional[dict] = None,
                 cwd: Optional[Path] = None, titled: bool = False) -> None:
        self.port = free_port()
        self.app = app
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        if not titled:  # see fixtures/untitled/setproctitle.py
            path = self.env.get("PYTHONPATH")
            self.env["PYTHONPATH"] = str(FIXTURES / "untitled") + (
                os.pathsep + path if path else "")
        self.cwd = cwd or FIXTURES
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"flasktop-gunicorn-{self.port}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def launcher(self) -> List[str]:
        """How gunicorn is run; the rest of the command line is the same for every launcher."""
        return [sys.executable, "-m", "gunicorn"]

    def start(self, workers_expected: Optional[int] = None, timeout: float = 30.0) -> "Gunicorn":
        cmd = [*self.launcher(), "--bind", f"127.0.0.1:{self.port}", *self.args, self.app]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(self.cwd), env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        n = workers_expected
        wait_until(lambda: self._serving() and (n is None or len(self.worker_pids()) >= n),
                   timeout=timeout, message=f"gunicorn {self.app} to serve on {self.port}"
                   f" (log: {self.log_path})")
        return self

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}: {self.log()}")
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        return False

    def worker_pids(self) -> List[int]:
        try:
            return sorted(c.pid for c in psutil.Process(self.pid).children())
        except psutil.Error:
            return []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 30.0, method: str = "GET") -> "Response":
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return Response(r.status, r.read(), dict(r.getheaders()))
        finally:
            conn.close()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        kill_tree(self.proc.pid)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        with contextlib.suppress(Exception):
            self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> "Gunicorn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Response:
    def __init__(self, status: int, body: bytes, headers: dict) -> None:
        self.status = status
        self.body = body
        self.headers = headers


@contextlib.contextmanager
def gunicorn(app: str, *args: str, workers_expected: Optional[int] = None,
             env: Optional[dict] = None, cwd: Optional[Path] = None,
             cls: "type[Gunicorn]" = None,  # type: ignore[assignment]
             titled: bool = False) -> Iterator[Gunicorn]:
    """``with gunicorn("app_module:app", "-w", "2") as g:`` -- started, and always killed.
    ``titled``: gunicorn retitles its processes (setproctitle), as in many deployments."""
    g = (cls or Gunicorn)(app, *args, env=env, cwd=cwd, titled=titled)
    try:
        g.start(workers_expected=workers_expected)
        yield g
    finally:
        g.stop()


def in_background(fn: Callable[[], object]) -> threading.Thread:
    """Run ``fn`` on a daemon thread (e.g. a request that hangs) and return the thread."""
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    return th


def snapshot_until(engine: "object", cond: Callable[[object], object], timeout: float = 20.0,
                   message: str = "", interval: float = 0.25) -> "object":
    """Collect with a real Engine until ``cond(snapshot)`` holds; return that snapshot."""
    box: List[object] = []

    def check() -> bool:
        engine.collect()  # type: ignore[attr-defined]
        box[:] = [engine.take_snapshot()]  # type: ignore[attr-defined]
        return bool(cond(box[0]))
    wait_until(check, timeout=timeout, interval=interval, message=message)
    return box[0]
