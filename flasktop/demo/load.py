"""A bounded synthetic load for the demo, sent only to the demo's loopback port."""

from __future__ import annotations

import http.client
import random
import threading
import time
from typing import List, Optional, Tuple

# (method, path template, weight): fast reads dominate; the slow report eats worker time.
MIX: Tuple[Tuple[str, str, float], ...] = (
    ("GET", "/api/items/{n}", 10.0),
    ("GET", "/", 2.0),
    ("GET", "/reports/{name}", 1.2),
    ("GET", "/cache/{n}", 2.0),
    ("POST", "/checkout", 1.0),
    ("GET", "/missing/{n}", 0.3),
)
HANG_EVERY_S = 45.0  # one request to /export, which hangs until gunicorn's timeout


class Load:
    """Drives ``rate`` requests/s at 127.0.0.1:``port`` for at most ``duration`` seconds."""

    def __init__(self, port: int, rate: float = 16.0, duration: float = 1800.0,
                 threads: int = 6, hang: bool = True) -> None:
        self.port = port
        self.rate = rate
        self.duration = duration
        self.threads = threads
        self.hang = hang
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._workers: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._rng = random.Random(7)

    def start(self) -> None:
        end = time.monotonic() + self.duration
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, args=(end, self.rate / self.threads),
                                 name=f"demo-load-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.hang:
            t = threading.Thread(target=self._hang_loop, args=(end,), name="demo-hang", daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self) -> None:
        self._stop.set()

    def _pick(self) -> Tuple[str, str]:
        with self._lock:
            total = sum(w for _, _, w in MIX)
            x = self._rng.uniform(0, total)
            n = self._rng.randint(1, 500)
        for method, path, w in MIX:
            x -= w
            if x <= 0:
                break
        return method, path.format(n=n, name=random.choice(["daily", "weekly", "annual"]))

    def _request(self, method: str, path: str, timeout: float) -> Optional[int]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        except (OSError, http.client.HTTPException):
            with self._lock:
                self.failed += 1
            return None
        finally:
            conn.close()
            with self._lock:
                self.sent += 1

    def _loop(self, end: float, rate: float) -> None:
        interval = 1.0 / rate if rate > 0 else 1.0
        while not self._stop.is_set() and time.monotonic() < end:
            t0 = time.monotonic()
            self._request(*self._pick(), timeout=10.0)
            self._stop.wait(max(0.0, interval - (time.monotonic() - t0)) * random.uniform(0.5, 1.5))

    def _hang_loop(self, end: float) -> None:
        if self._stop.wait(8.0):
            return
        while not self._stop.is_set() and time.monotonic() < end:
            self._request("GET", "/export", timeout=60.0)
            self._stop.wait(HANG_EVERY_S)
