"""What a Flask app's extra attributes cost a request: is the two-attribute beacon worth it?

On CPython 3.11 a class's instances share one table of attribute names, with room for
29; a Flask 3.1 app has 27. The beacon sets two attributes on the app and hooks the rest
on its class so as not to go past it (docs/beacon.md): past it, the method loads Flask makes
on the app each request are left unspecialized (19 of them instead of 5). This measures
what that costs, on apps that differ in nothing else: a hello world with 0, 2 and 3
attributes of no use added (27, 29 and 30 names), each app of a class of its own.

- unspecialized: method loads in Flask's code that one warm request executes generic
  (read with ``dis`` after a warm-up);
- CPU per request: the variants alternate in turns of ``--requests`` for ``--rounds``
  rounds in one process; the median over rounds, and the median of each round's difference
  to the 27-name app;
- with ``--callgrind``, machine instructions per request counted by valgrind (as
  ``beacon_instructions.py`` counts them): repeatable, whatever else the machine does.

    .venv/bin/python bench/app_attributes.py [--rounds 60] [--requests 5000] [--callgrind]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from beacon_instructions import callgrind, generic_method_loads  # noqa: E402
from beacon_overhead import hello_app, hello_environ, run_block  # noqa: E402

EXTRA = (0, 2, 3)  # attributes added to a 27-name app


def make(extra: int) -> Any:
    app = hello_app()
    for i in range(extra):
        setattr(app, f"unused{i}", None)
    return app


def instructions(extra: int, n1: int = 1000, n2: int = 3000) -> float:
    """Instructions per request of the ``extra``-attribute app, from two callgrind runs."""
    a, b = (callgrind([__file__, "--child", str(extra), str(n)])["Ir"] for n in (n1, n2))
    return (b - a) / (n2 - n1)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--requests", type=int, default=5000, help="per variant per turn")
    p.add_argument("--callgrind", action="store_true", help="also count instructions (valgrind)")
    p.add_argument("--child", nargs=2, type=int, metavar=("EXTRA", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    base = hello_environ()
    if args.child:
        app = make(args.child[0])
        for _ in range(1 + args.child[1] // 500):  # the first block is the warm-up
            run_block(app, base, 500)
        return
    apps = {extra: make(extra) for extra in EXTRA}
    names = {extra: len(vars(app)) for extra, app in apps.items()}
    loads = {extra: generic_method_loads(app, base) for extra, app in apps.items()}
    cpu: Dict[int, List[float]] = {extra: [] for extra in EXTRA}
    for r in range(args.rounds):
        order = EXTRA if r % 2 else EXTRA[::-1]
        for extra in order:
            cpu[extra].append(run_block(apps[extra], base, args.requests) / args.requests * 1e6)
    counted = {}
    if args.callgrind:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
        counted = {extra: instructions(extra) for extra in EXTRA}
    print(f"\nFlask hello world in-process, {args.rounds} rounds x {args.requests} requests "
          f"(Python {sys.version.split()[0]}, load {os.getloadavg()[0]:.1f})")
    print(f"{'names':>5} {'unspecialized':>13} {'CPU/request':>11} {'vs 27 names':>11}"
          + (f" {'instructions':>12} {'vs 27':>7}" if counted else ""))
    for extra in EXTRA:
        diff = statistics.median(a - b for a, b in zip(cpu[extra], cpu[EXTRA[0]]))
        line = (f"{names[extra]:>5} {loads[extra]:>13} {statistics.median(cpu[extra]):>8.2f} us"
                f" {diff:>+8.2f} us")
        if counted:
            line += f" {counted[extra]:>12,.0f} {counted[extra] - counted[EXTRA[0]]:>+7,.0f}"
        print(line)
    print("(names: the app's attributes; unspecialized: method loads in Flask's code a request "
          "executes generic; vs 27 names: median of each round's difference)")


if __name__ == "__main__":
    main()
