"""Fixtures shared by the test modules that drive a real Engine."""

from __future__ import annotations

from typing import Iterator, List

import pytest

from flasktop.engine import Engine
from tests.support import Gunicorn


@pytest.fixture
def engine_for() -> Iterator:
    """``engine_for(g, udp_port, **engine_kw)``: an opened Engine on gunicorn ``g``, stopped after."""
    made: List[Engine] = []

    def make(g: Gunicorn, udp: int, **kw: object) -> Engine:
        kw.setdefault("refresh", 0.5)
        kw.setdefault("sample_interval", 0.5)
        e = Engine(g.pid, beacon=("127.0.0.1", udp), **kw)  # type: ignore[arg-type]
        made.append(e)
        e.open()
        return e
    yield make
    for e in made:
        e.stop()
