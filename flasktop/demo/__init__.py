"""``flasktop demo``: a real Flask app under a real gunicorn, a bounded load, and flasktop on it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import psutil

from flasktop.demo.load import Load

DEMO_APP = "flasktop.demo.app:app"


class DemoError(Exception):
    """One line for the user: why the demo cannot start."""


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_requirements() -> None:
    missing = []
    for mod in ("flask", "gunicorn"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise DemoError(f"the demo needs {' and '.join(missing)}: pip install 'flasktop[demo]'")


class Demo:
    """The demo app under gunicorn on free loopback ports, its load, and its cleanup (by pid)."""

    def __init__(self, workers: int = 4, timeout: int = 20, load: bool = True,
                 rate: float = 16.0, duration: float = 1800.0, hang: bool = True) -> None:
        self.workers = workers
        self.timeout = timeout
        self.http_port = _free_port(socket.SOCK_STREAM)
        self.beacon_port = _free_port(socket.SOCK_DGRAM)
        self.proc: Optional[subprocess.Popen] = None
        self.load = Load(self.http_port, rate=rate, duration=duration, hang=hang) if load else None
        self.log = tempfile.NamedTemporaryFile(prefix="flasktop-demo-", suffix=".log", delete=False)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def beacon(self) -> str:
        return f"127.0.0.1:{self.beacon_port}"

    def start(self, wait: float = 20.0) -> "Demo":
        check_requirements()
        env = {**os.environ, "FLASKTOP_BEACON": self.beacon, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "gunicorn", "--workers", str(self.workers),
               "--timeout", str(self.timeout), "--graceful-timeout", "3",
               "--bind", f"127.0.0.1:{self.http_port}", "--name", "flasktop-demo", DEMO_APP]
        # Its own session: a Ctrl-C in flasktop's terminal must not reach gunicorn first;
        # we stop it ourselves, by pid.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + wait
        while not self._serving():
            if self.proc.poll() is not None:
                raise DemoError(f"the demo's gunicorn exited with status {self.proc.returncode}; "
                                f"log: {self.log.name}")
            if time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"the demo's gunicorn did not serve within {wait:.0f} s; "
                                f"log: {self.log.name}")
            time.sleep(0.1)
        if self.load is not None:
            self.load.start()
        return self

    def _serving(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the load and every process the demo started; idempotent."""
        if self.load is not None:
            self.load.stop()
        if self.proc is None:
            return
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=2.0)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=2.0)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1.0)
        self.proc = None
        with contextlib.suppress(OSError):
            self.log.close()
            os.unlink(self.log.name)

    def __enter__(self) -> "Demo":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
