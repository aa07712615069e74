"""Machine instructions the beacon adds to a Flask request, counted by callgrind.

Wall-clock and CPU-time differences of a few tenths of a microsecond drown in this machine's
noise (two processes of the same variant differ by up to 0.6 us a request). callgrind counts
instructions instead: repeatable whatever else the machine does, so it can tell which of two
versions of the request path does less. It does not see cache misses or branch mispredictions,
so a lower count is a reason to measure with ``beacon_overhead.py``, not a result by itself.

Each variant runs in its own process under ``valgrind --tool=callgrind``, twice: serving
``--n1`` and then ``--n2`` hello-world requests in-process; the difference of the two totals
over ``n2 - n1`` is the count per request, free of start-up. Variants:

- bare Flask;
- the clock-only middleware of ``beacon_overhead.py`` (the floor of any middleware);
- the beacon's request path: ``Beacon(app)`` with its flusher thread not started and each
  thread's lane emptied between blocks of requests (the flusher's work is timed by
  ``beacon_flusher.py``; under callgrind every request looks slow, which would change it).

    .venv/bin/python bench/beacon_instructions.py [--n1 1000] [--n2 3000]

Needs valgrind (Debian's package). Takes about a minute per variant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 500
VARIANTS = ("bare", "clock", "beacon")


def serve(variant: str, n: int) -> None:
    """The child: ``n`` requests of ``variant`` (after a warm-up of the same size as a block)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from werkzeug.test import EnvironBuilder

    from beacon_overhead import ClockOnly, hello_app, run_block

    app: Any = hello_app()
    lanes: List[Any] = []
    if variant == "clock":
        app.wsgi_app = ClockOnly(app.wsgi_app)
    elif variant == "beacon":
        from flasktop.beacon import Beacon

        beacon = Beacon(app, address="127.0.0.1:9")
        assert beacon.hook is not None, "the fast path was not taken"
        beacon.reporter.start = lambda: None  # type: ignore[method-assign]  # no flusher thread
        lanes = beacon.reporter.lanes
    base = EnvironBuilder(path="/", base_url="http://127.0.0.1:8000").get_environ()
    for _ in range(1 + n // BLOCK):  # the first block is the warm-up
        run_block(app, base, BLOCK)
        for lane in lanes:
            del lane.buf[:]


def count(variant: str, n: int) -> int:
    """Total instructions callgrind counts for a child serving ``n`` requests."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, __file__, "--child", variant, str(n)],
            env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode != 0 or found is None:
        raise SystemExit(f"callgrind failed for {variant}: {out.stderr.strip()[-400:]}")
    return int(found.group(1))


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n1", type=int, default=1000)
    p.add_argument("--n2", type=int, default=3000)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        serve(args.child[0], int(args.child[1]))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    n1, n2 = sorted((max(BLOCK, args.n1), max(2 * BLOCK, args.n2)))
    per: Dict[str, float] = {}
    for variant in VARIANTS:
        per[variant] = (count(variant, n2) - count(variant, n1)) / (n2 - n1)
    print(f"\nInstructions per Flask hello-world request (callgrind, {n2 - n1} requests; "
          f"Python {sys.version.split()[0]})")
    for variant in VARIANTS:
        added = per[variant] - per["bare"]
        print(f"{variant:<8} {per[variant]:>10,.0f}   added {added:>+8,.0f} "
              f"({added / per['bare'] * 100:+.1f}%)")
    print("(run to run the counts move by a few hundred: type-cache and dict layouts)")


if __name__ == "__main__":
    main()
