"""The command line: ``flasktop [--pid PID]``, ``flasktop snapshot``, ``flasktop demo``.

Every error the user can cause or meet (not gunicorn, the port taken, bad
arguments, py-spy missing) is one line on stderr and a non-zero exit, never a
traceback. Set FLASKTOP_DEBUG=1 to see the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import List, Optional, Sequence, Tuple

from flasktop import __version__

EXIT_USAGE = 2
ENVIRONMENT = ("environment: FLASKTOP_BEACON=HOST:PORT where to listen for the beacon (as "
               "--beacon); FLASKTOP_PY_SPY=PATH the py-spy binary to run (default: the py-spy "
               "next to this Python, then the one on PATH); FLASKTOP_DEBUG=1 shows the "
               "traceback of an internal error.")


class CliError(Exception):
    """A one-line message for the user; exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _positive_pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"not a pid: {text!r}")
    return pid


def _ranged(lo: float, hi: float, unit: str, whole: bool = False):
    """A number from ``lo`` to ``hi`` (a whole one with ``whole``), refused in one line
    (argparse's ``choices`` would list every allowed value)."""
    kind = "whole number" if whole else "number"

    def parse(text: str) -> float:
        try:
            v = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind} of {unit}: {text!r}") from None
        if not (lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({lo:g} to {hi:g} {unit})")
        return v
    return parse


def _seconds(lo: float, hi: float):
    return _ranged(lo, hi, "seconds")


def _beacon(text: str) -> Optional[Tuple[str, int]]:
    if text.strip().lower() == "off":
        return None
    from flasktop.sources.listener import parse_address

    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _default_beacon() -> Optional[Tuple[str, int]]:
    from flasktop.beacon import DEFAULT_ADDRESS

    env = os.environ.get("FLASKTOP_BEACON", "").strip()
    try:
        return _beacon(env) if env else _beacon(DEFAULT_ADDRESS)
    except argparse.ArgumentTypeError as e:
        raise CliError(f"FLASKTOP_BEACON={env!r}: {e}") from None


def _common(p: argparse.ArgumentParser, pid_required: bool) -> None:
    p.add_argument("--pid", type=_positive_pid, required=pid_required,
                   help="gunicorn master pid (a worker pid resolves to its master)")
    p.add_argument("--beacon", type=_beacon, default=None, metavar="HOST:PORT",
                   help="where to listen for the app's beacon (default 127.0.0.1:9711, "
                        "or $FLASKTOP_BEACON; 'off' to not listen)")
    p.add_argument("--no-pyspy", action="store_true", help="do not sample stacks with py-spy")
    p.add_argument("--sample-interval", type=_seconds(0.2, 600), default=2.0, metavar="S",
                   help="seconds between py-spy dumps of one worker (default 2; stuck or "
                        "focused workers are sampled faster)")


def build_parsers() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    main = argparse.ArgumentParser(
        prog="flasktop",
        description="top for Flask under gunicorn: slow routes, memory leaks and stuck workers.",
        epilog="commands: 'flasktop snapshot --pid PID' prints a report; "
               "'flasktop demo' runs a demo app and watches it. " + ENVIRONMENT)
    main.add_argument("--version", action="version", version=f"flasktop {__version__}")
    _common(main, pid_required=False)
    main.add_argument("--refresh", type=_seconds(0.2, 60), default=1.0, metavar="S",
                      help="seconds between screen updates (default 1)")

    snap = argparse.ArgumentParser(prog="flasktop snapshot",
                                   description="Attach for a few seconds, print a report, exit.",
                                   epilog=ENVIRONMENT)
    _common(snap, pid_required=True)
    snap.add_argument("--seconds", type=_seconds(0.5, 3600), default=5.0,
                      help="how long to watch before reporting (default 5)")
    snap.add_argument("--json", action="store_true", help="one JSON object (docs/snapshot.md)")

    demo = argparse.ArgumentParser(prog="flasktop demo",
                                   description="Start a demo Flask app under gunicorn with a bounded "
                                               "synthetic load, and watch it.")
    demo.add_argument("--workers", type=_ranged(1, 16, "workers", whole=True), default=4,
                      metavar="N", help="gunicorn workers (1-16, default 4)")
    demo.add_argument("--timeout", type=_ranged(5, 300, "seconds", whole=True), default=20,
                      metavar="S", help="gunicorn --timeout (5-300, default 20)")
    demo.add_argument("--seconds", type=_seconds(1, 3600), default=15.0,
                      help="when stdout is not a terminal: watch this long, print a report")
    demo.add_argument("--json", action="store_true", help="with a non-terminal stdout: print JSON")
    return main, snap, demo


def _make_engine(pid: int, beacon: Optional[Tuple[str, int]], pyspy: bool,
                 sample_interval: float, refresh: float = 1.0):
    from flasktop.engine import Engine
    from flasktop.sources.gunicorn import NotGunicorn, resolve_master
    from flasktop.sources.listener import ListenerError, PortInUse

    try:
        master, note = resolve_master(pid)
    except NotGunicorn as e:
        raise CliError(str(e)) from None
    if note:
        print(f"flasktop: {note}", file=sys.stderr)
    engine = Engine(master, beacon=beacon, refresh=refresh, sample_interval=sample_interval,
                    pyspy=pyspy)
    try:
        engine.open()
    except (PortInUse, ListenerError) as e:
        engine.stop()
        raise CliError(str(e)) from None
    return engine


def _print_report(engine, seconds: float, as_json: bool) -> None:
    from flasktop.report import render

    snap = engine.run_for(seconds)
    if as_json:
        sys.stdout.write(snap.to_json() + "\n")
    else:
        width = 100
        try:
            width = max(60, min(160, os.get_terminal_size().columns))
        except OSError:
            pass
        sys.stdout.write(render(snap, width=width))
    sys.stdout.flush()


def _is_terminal() -> bool:
    return sys.stdout.isatty() and sys.stdin.isatty() and os.environ.get("TERM", "") != "dumb"


def _stop_children() -> None:
    try:
        from flasktop.sources.pyspy import kill_children

        kill_children()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def _forget_fixed_size() -> None:
    """Drop COLUMNS and LINES from the environment before the UI starts.

    Textual sizes the screen with ``shutil.get_terminal_size()``, which takes exported
    COLUMNS/LINES over the terminal's own size: set once (by a script, a container, a
    test runner), they pin the UI to that size and every resize is ignored. The UI only
    runs on a real terminal, whose size (TIOCGWINSZ) is always the true one.
    """
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)


def run_ui(engine, attaching_to: str, on_exit=None) -> None:
    """Run the Textual app on ``engine``; SIGTERM and SIGHUP restore the terminal and exit."""
    from flasktop.ui.app import FlasktopApp

    _forget_fixed_size()

    app = FlasktopApp(engine, title="flasktop", attaching_to=attaching_to)

    def leave(signum: int, frame: object) -> None:
        _stop_children()

        def ask() -> None:
            try:
                app.call_from_thread(app.exit)
            except Exception:  # noqa: BLE001 - the app may already be gone
                pass

        threading.Thread(target=ask, daemon=True).start()
        # If the app cannot exit promptly (a wedged terminal), do not linger.
        timer = threading.Timer(1.5, lambda: os._exit(128 + signum))
        timer.daemon = True
        timer.start()

    old = {s: signal.signal(s, leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        app.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        engine.stop()
        if on_exit is not None:
            on_exit()


def _pick_master() -> int:
    from flasktop.sources.gunicorn import find_masters

    masters = find_masters()
    if not masters:
        raise CliError("no gunicorn master found on this machine; pass --pid PID, "
                       "or try 'flasktop demo'", code=1)
    if len(masters) == 1:
        return masters[0].pid
    from flasktop.picker import pick

    chosen = pick(masters) if _is_terminal() else None
    if chosen is None:
        from flasktop.textsafe import sanitize

        # A command line is anyone's text (gunicorn --name, argv): never raw to a terminal.
        listing = "; ".join(f"{m.pid} ({sanitize(' '.join(m.cmdline), 120)})" for m in masters)
        raise CliError(f"{len(masters)} gunicorn masters found, pick one with --pid: {listing}")
    return chosen


def cmd_top(args: argparse.Namespace) -> int:
    pid = args.pid or _pick_master()
    beacon = args.beacon if args.beacon_given else _default_beacon()
    engine = _make_engine(pid, beacon, not args.no_pyspy, args.sample_interval, args.refresh)
    try:
        if not _is_terminal():
            print("flasktop: standard output is not a terminal; printing a 5-second report "
                  "instead (see 'flasktop snapshot --help')", file=sys.stderr)
            _print_report(engine, 5.0, as_json=False)
            return 0
        run_ui(engine, attaching_to=f"gunicorn {engine.master_pid}")
    finally:
        engine.stop()
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    beacon = args.beacon if args.beacon_given else _default_beacon()
    engine = _make_engine(args.pid, beacon, not args.no_pyspy, args.sample_interval)
    try:
        _print_report(engine, args.seconds, args.json)
    finally:
        engine.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flasktop.demo import Demo, DemoError

    demo = Demo(workers=args.workers, timeout=args.timeout)
    try:
        if _is_terminal():
            print(f"flasktop demo: starting a Flask app under gunicorn ({args.workers} workers) "
                  "on 127.0.0.1 ...", file=sys.stderr)
        demo.start()
    except DemoError as e:
        demo.stop()
        raise CliError(str(e), code=1) from None
    try:
        host, port = "127.0.0.1", demo.beacon_port
        engine = _make_engine(demo.pid, (host, port), True, 2.0)
        try:
            if not _is_terminal():
                print(f"flasktop demo: standard output is not a terminal; watching the demo for "
                      f"{args.seconds:g} s and printing a report", file=sys.stderr)
                _print_report(engine, args.seconds, args.json)
                return 0
            run_ui(engine, attaching_to=f"the demo (gunicorn {demo.pid})")
        finally:
            engine.stop()
    finally:
        demo.stop()
    return 0


def _parse(argv: Sequence[str]) -> Tuple[str, argparse.Namespace]:
    main, snap, demo = build_parsers()
    argv = list(argv)
    if argv and argv[0] == "snapshot":
        cmd, parser, rest = "snapshot", snap, argv[1:]
    elif argv and argv[0] == "demo":
        cmd, parser, rest = "demo", demo, argv[1:]
    elif argv and not argv[0].startswith("-"):
        main.error(f"unknown command {argv[0]!r} (commands: snapshot, demo)")
    else:
        cmd, parser, rest = "top", main, argv
    args = parser.parse_args(rest)
    args.beacon_given = any(a == "--beacon" or a.startswith("--beacon=") for a in rest)
    return cmd, args


def main(argv: Optional[List[str]] = None) -> int:
    cmd, args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        if cmd == "snapshot":
            return cmd_snapshot(args)
        if cmd == "demo":
            return cmd_demo(args)
        return cmd_top(args)
    except CliError as e:
        print(f"flasktop: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, unless asked
        if os.environ.get("FLASKTOP_DEBUG"):
            raise
        print(f"flasktop: internal error: {type(e).__name__}: {e} "
              "(run with FLASKTOP_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        _stop_children()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
