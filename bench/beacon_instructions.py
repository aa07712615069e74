"""Machine instructions the beacon adds to a Flask request, counted by callgrind.

Wall-clock and CPU-time differences of a few tenths of a microsecond drown in this machine's
noise (two processes of the same variant differ by up to 0.6 us a request). callgrind counts
instructions instead: repeatable whatever else the machine does, so it can tell which of two
versions of the request path does less. Instructions alone miss cache misses and branch mispredictions;
``--sim`` adds callgrind's simulated caches and branch predictor (a model, not this CPU), which
tells apart two request paths of the same count: the beacon before and after it stopped putting
Flask's method calls on the app back to the generic lookup (docs/benchmarks.md). A lower count
is a reason to measure with ``beacon_overhead.py``, not a result by itself.

Each variant runs in its own process under ``valgrind --tool=callgrind``, twice: serving
``--n1`` and then ``--n2`` hello-world requests in-process; the difference of the two totals
over ``n2 - n1`` is the count per request, free of start-up. Variants:

- bare Flask;
- the clock-only middleware of ``beacon_overhead.py`` (the floor of any middleware);
- the beacon's request path: ``Beacon(app)`` with its flusher thread not started and each
  thread's lane emptied between blocks of requests (the flusher's work is timed by
  ``beacon_flusher.py``; under callgrind every request looks slow, which would change it).

It also prints, for each variant, how many method loads a request executes in Flask's code
that CPython left unspecialized (read with ``dis`` after a warm-up, no valgrind needed).

    .venv/bin/python bench/beacon_instructions.py [--n1 1000] [--n2 3000] [--sim] [--templates]

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
    app, base, lanes = make(variant)
    from beacon_overhead import run_block

    for _ in range(1 + n // BLOCK):  # the first block is the warm-up
        run_block(app, base, BLOCK)
        for lane in lanes:
            del lane.buf[:]


def make(variant: str) -> Any:
    """(app, environ, lanes) of ``variant``."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    from beacon_overhead import ClockOnly, hello_app, hello_environ

    variant, _, extra = variant.partition("+")
    app: Any = hello_app()
    if extra == "templates":  # as an app that rendered a template: its 28th name, jinja_env
        app.jinja_env
    lanes: List[Any] = []
    if variant == "clock":
        app.wsgi_app = ClockOnly(app.wsgi_app)
    elif variant == "beacon":
        from flasktop.beacon import Beacon

        beacon = Beacon(app, address="127.0.0.1:9")
        assert beacon.hook is not None, "the fast path was not taken"
        beacon.reporter.start = lambda: None  # type: ignore[method-assign]  # no flusher thread
        lanes = beacon.reporter.lanes
    return app, hello_environ(), lanes


def is_generic_method_load(ins: Any) -> bool:
    """Whether ``ins`` (from ``dis.get_instructions(code, adaptive=True)``) is a method load
    left unspecialized: 3.11's LOAD_METHOD, or 3.12's and 3.13's LOAD_ATTR with the method bit."""
    return ins.opname in ("LOAD_METHOD", "LOAD_METHOD_ADAPTIVE") or (
        ins.opname == "LOAD_ATTR" and "NULL|self" in ins.argrepr)


def generic_method_loads(app: Any, base: Dict[str, Any]) -> int:
    """Method loads in Flask's code that one warm request of ``app`` executes unspecialized."""
    import dis

    from beacon_overhead import run_block

    executed: List[Any] = []
    run_block(app, base, 3 * BLOCK)
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None:  # 3.12+: opcode tracing is built on sys.monitoring there
        tool = monitoring.DEBUGGER_ID
        monitoring.use_tool_id(tool, "beacon_instructions")
        monitoring.register_callback(tool, monitoring.events.INSTRUCTION,
                                     lambda code, offset: executed.append((code, offset)))
        monitoring.set_events(tool, monitoring.events.INSTRUCTION)
        run_block(app, base, 1)
        monitoring.set_events(tool, 0)
        monitoring.free_tool_id(tool)
        run_block(app, base, 3 * BLOCK)  # specialize again what instrumenting reset
    else:
        def tracer(frame: Any, event: str, arg: Any) -> Any:
            frame.f_trace_opcodes = True
            if event == "opcode":
                executed.append((frame.f_code, frame.f_lasti))
            return tracer

        sys.settrace(tracer)
        run_block(app, base, 1)
        sys.settrace(None)
    forms: Dict[Any, Dict[int, bool]] = {}
    n = 0
    for code, offset in executed:
        if "flask" + os.sep not in code.co_filename:
            continue
        if code not in forms:
            forms[code] = {i.offset: is_generic_method_load(i)
                           for i in dis.get_instructions(code, adaptive=True)}  # type: ignore[call-arg]
        n += forms[code].get(offset, False)
    return n


def unspecialized(variant: str) -> int:
    """The child: method loads in Flask's code that one warm request executes unspecialized."""
    app, base, _lanes = make(variant)
    return generic_method_loads(app, base)


def callgrind(child: List[str], sim: bool = False) -> Dict[str, int]:
    """Callgrind's totals (Ir, and with ``sim`` the cache and branch events) for
    ``python *child``."""
    extra = ["--cache-sim=yes", "--branch-sim=yes"] if sim else []
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", *extra, f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, *child],
            env={**os.environ, "PYTHONHASHSEED": "0"}, capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"callgrind failed for {' '.join(child)}: {out.stderr.strip()[-400:]}")
        text = Path(tmp, "cg.out").read_text()
    events = re.search(r"^events: (.+)$", text, re.M)
    totals = re.search(r"^(?:summary|totals): (.+)$", text, re.M)
    if events is None or totals is None:
        raise SystemExit(f"callgrind wrote no totals for {' '.join(child)}")
    return dict(zip(events.group(1).split(), map(int, totals.group(1).split())))


def count(variant: str, n: int, sim: bool = False) -> Dict[str, int]:
    """Callgrind's totals for a child serving ``n`` requests of ``variant``."""
    return callgrind([__file__, "--child", variant, str(n)], sim)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n1", type=int, default=1000)
    p.add_argument("--n2", type=int, default=3000)
    p.add_argument("--sim", action="store_true",
                   help="also simulate caches and branch prediction (about 3x slower)")
    p.add_argument("--templates", action="store_true",
                   help="each app has rendered a template first, as most apps have: Flask "
                        "caches app.jinja_env on the app, its 28th attribute")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--unspecialized", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        serve(args.child[0], int(args.child[1]))
        return
    if args.unspecialized:
        print(unspecialized(args.unspecialized))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    n1, n2 = sorted((max(BLOCK, args.n1), max(2 * BLOCK, args.n2)))
    per: Dict[str, Dict[str, float]] = {}
    for variant in VARIANTS:
        child = variant + ("+templates" if args.templates else "")
        a, b = count(child, n1, args.sim), count(child, n2, args.sim)
        per[variant] = {k: (b[k] - a[k]) / (n2 - n1) for k in a}
    loads = {v: subprocess.run([sys.executable, __file__, "--unspecialized",
                                v + ("+templates" if args.templates else "")], check=True,
                               capture_output=True, text=True).stdout.strip() for v in VARIANTS}
    print(f"\nPer Flask hello-world request (callgrind, {n2 - n1} requests; "
          f"Python {sys.version.split()[0]}"
          + ("; each app has rendered a template" if args.templates else "") + ")")
    cols = ["Ir"] + (["I1mr", "D1mr", "D1mw", "Bcm", "Bim"] if args.sim else [])
    print(f"{'variant':<8} " + " ".join(f"{c:>16}" for c in cols)
          + f" {'unspecialized':>14}")
    for variant in VARIANTS:
        row = per[variant]
        print(f"{variant:<8} " + " ".join(
            f"{row[c]:>8,.0f} {row[c] - per['bare'][c]:>+7,.0f}" for c in cols)
            + f" {loads[variant]:>14}")
    print("(each: per request, then added to bare Flask. Ir instructions; I1mr, D1mr, D1mw "
          "simulated L1 misses; Bcm, Bim simulated mispredicted conditional and indirect "
          "branches; unspecialized: method loads in Flask's code left generic. Run to run "
          "the counts move by a few hundred instructions: type-cache and dict layouts)")


if __name__ == "__main__":
    main()
