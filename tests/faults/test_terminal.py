"""Issue 5, scenario 11: the terminal flasktop runs in is not what the UI expects.

- Not a terminal (``flasktop --pid N | cat`` from a terminal: stdin a tty, stdout a pipe):
  it says on stderr that it prints a report instead (and names ``snapshot``), prints one,
  exits 0, and no escape byte reaches either stream.
- ``TERM=dumb`` on a real tty (a pty): the same report, no escape byte on the tty.
- In tmux (a real terminal emulator), the real Textual UI on a real gunicorn:
  ``NO_COLOR=1`` gives no chromatic colour (what Textual emits is checked, see below);
  a 20x5 terminal from the start; rapid resizes (tmux ``resize-window`` in a bounded loop,
  down to 10x3 and up to 200x60): the process stays alive, redraws the overview at the
  size it ends at, and quits with status 0 on ``q``.

Under NO_COLOR, Textual's own Monochrome filter paints 256-colour greys (``38;5;253``,
``48;5;235``); the app swaps in Textual's NoColor filter, and the test below checks that
no colour code reaches the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import psutil
import pytest

from tests.support import Gunicorn, gunicorn, kill_tree, wait_until, written_line

ROOT = Path(__file__).resolve().parents[2]
TMUX = shutil.which("tmux")
SGR = re.compile(r"\x1b\[([0-9;:]*)m")
ESCAPE = re.compile(rb"[\x1b\x9b\x07]")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[Gunicorn]:
    tmp = tmp_path_factory.mktemp("term")
    with gunicorn("trouble_app:app", "-w", "2", env={"PYTHONPATH": str(ROOT),
                                                     "TROUBLE_RELEASE": str(tmp / "release")},
                  workers_expected=2) as g:
        yield g


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FLASKTOP_BEACON")}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _pty(cols: int, rows: int) -> Tuple[int, int]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return master, slave


def _read_all(fd: int, proc: subprocess.Popen, timeout: float) -> bytes:
    """Everything written to the pty until the child exits (bounded by ``timeout``)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child side is closed
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_not_a_terminal_and_term_dumb_print_a_report_without_escapes(app):
    """Both at once (each watches for 5 s): ``--pid N | cat`` from a terminal, and TERM=dumb."""
    # flasktop --pid N | cat: stdin is the terminal, stdout a pipe
    in_master, in_slave = _pty(100, 30)
    piped = subprocess.Popen([sys.executable, "-m", "flasktop", "--pid", str(app.pid), "--beacon", "off"],
                             stdin=in_slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT),
                             env=_env(TERM="xterm-256color"), start_new_session=True)
    os.close(in_slave)
    # TERM=dumb on a real tty: stdin, stdout and stderr all the pty
    tty_master, tty_slave = _pty(100, 30)
    dumb = subprocess.Popen([sys.executable, "-m", "flasktop", "--pid", str(app.pid), "--beacon", "off"],
                            stdin=tty_slave, stdout=tty_slave, stderr=tty_slave, cwd=str(ROOT),
                            env=_env(TERM="dumb"), start_new_session=True)
    os.close(tty_slave)
    try:
        on_tty = _read_all(tty_master, dumb, 40)
        dumb.wait(10)
        out, err = piped.communicate(timeout=40)
    finally:
        kill_tree(piped.pid)
        kill_tree(dumb.pid)
        os.close(in_master)
        os.close(tty_master)
    assert piped.returncode == 0, err
    assert not ESCAPE.search(out) and not ESCAPE.search(err), (out[:200], err)
    note = err.decode()
    assert "not a terminal" in note and "flasktop snapshot" in note, note
    assert out.decode().startswith(f"gunicorn master {app.pid}:") and b"WORKERS" in out
    assert dumb.returncode == 0, on_tty[-500:]
    assert not ESCAPE.search(on_tty), on_tty[:300]
    assert f"gunicorn master {app.pid}:".encode() in on_tty and b"WORKERS" in on_tty


class Tmux:
    """A tmux server of our own (its own socket), killed by pid at the end."""

    def __init__(self) -> None:
        assert TMUX is not None
        self.sock = f"flasktop-test-{os.getpid()}-{time.monotonic_ns()}"
        self.server_pid: Optional[int] = None

    def run(self, *args: str, check: bool = True) -> str:
        r = subprocess.run([TMUX, "-L", self.sock, "-f", "/dev/null", *args], capture_output=True,
                           text=True, timeout=10)
        if check and r.returncode != 0:
            raise AssertionError(f"tmux {args[0]} failed: {r.stderr}")
        return r.stdout

    def new(self, name: str, cols: int, rows: int, command: str) -> None:
        self.run("new-session", "-d", "-s", name, "-x", str(cols), "-y", str(rows), command)
        if self.server_pid is None:
            self.server_pid = int(self.run("display-message", "-p", "-t", name, "#{pid}").strip())

    def capture(self, name: str, escapes: bool = False) -> str:
        return self.run("capture-pane", "-p", "-t", name, *(["-e"] if escapes else []))

    def resize(self, name: str, cols: int, rows: int) -> None:
        self.run("resize-window", "-t", name, "-x", str(cols), "-y", str(rows))

    def flasktop(self, name: str) -> Optional[psutil.Process]:
        """The flasktop process running in ``name``'s pane (a child of the pane's shell)."""
        try:
            pane = int(self.run("display-message", "-p", "-t", name, "#{pane_pid}").strip())
            procs = [psutil.Process(pane)] + psutil.Process(pane).children(recursive=True)
        except (ValueError, psutil.Error, AssertionError):
            return None
        for p in procs:
            with contextlib.suppress(psutil.Error):
                argv = p.cmdline()
                if any(a == "-m" and b == "flasktop" for a, b in zip(argv, argv[1:])):
                    return p
        return None

    def kill(self) -> None:
        self.run("kill-server", check=False)
        if self.server_pid is not None:
            kill_tree(self.server_pid)
        folder = os.path.join(os.environ.get("TMUX_TMPDIR") or "/tmp", f"tmux-{os.getuid()}")
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, self.sock))  # the socket file of our own server


def _command(g: Gunicorn, rc: Path, unset: Tuple[str, ...] = (), **env: str) -> str:
    sets = " ".join([f"-u {k}" for k in unset] + [f"{k}={v}" for k, v in env.items()])
    return (f"cd {ROOT} && env {sets} PYTHONPATH={ROOT} {sys.executable} -m flasktop --pid {g.pid} "
            f"--beacon off --refresh 0.5 --no-pyspy; echo $? > {rc}")


def _colour_codes(screen: str) -> List[str]:
    """Every SGR parameter that sets a colour (3x/4x/9x/10x, 38;..., 48;...; not 39/49 resets)."""
    found = []
    for params in SGR.findall(screen):
        parts = [p for p in re.split("[;:]", params) if p != ""]
        i = 0
        while i < len(parts):
            n = int(parts[i])
            if n in (38, 48, 58):
                size = 3 if i + 1 < len(parts) and parts[i + 1] == "5" else 5
                found.append(";".join(parts[i:i + size]))
                i += size
                continue
            if 30 <= n <= 37 or 40 <= n <= 47 or 90 <= n <= 97 or 100 <= n <= 107:
                found.append(str(n))
            i += 1
    return found


def _grey(code: str) -> bool:
    parts = [int(p) for p in code.split(";")]
    if parts[0] in (38, 48, 58) and parts[1] == 5:
        return parts[2] in (0, 7, 8, 15, 16, 231) or 232 <= parts[2] <= 255
    if parts[0] in (38, 48, 58) and parts[1] == 2:
        return parts[2] == parts[3] == parts[4]
    return parts[0] in (30, 37, 40, 47, 90, 97, 100, 107)  # black, white, greys


def _overview(screen: str, g: Gunicorn) -> bool:
    return f"master {g.pid}" in screen and "Memory" in screen


@pytest.fixture(scope="module")
def tmux_runs(app, tmp_path_factory):
    """Two flasktops in tmux, at once: NO_COLOR at 100x30 then resized hard; colour at 20x5."""
    if TMUX is None:
        pytest.skip("tmux is not installed")
    tmp = tmp_path_factory.mktemp("tmux")
    t = Tmux()
    seen: dict = {}
    try:
        # One runs where a stale COLUMNS/LINES was exported (a script, a container, pytest
        # itself): flasktop must follow the terminal's real size, not those.
        t.new("nocolor", 100, 30, _command(app, tmp / "rc-nocolor", NO_COLOR="1", COLUMNS="80",
                                           LINES="24"))
        t.new("tiny", 20, 5, _command(app, tmp / "rc-tiny", unset=("COLUMNS", "LINES")))
        wait_until(lambda: _overview(t.capture("nocolor"), app), timeout=30,
                   message="the overview in tmux (NO_COLOR)")
        seen["nocolor"] = t.capture("nocolor", escapes=True)
        wait_until(lambda: t.flasktop("tiny") is not None and t.capture("tiny").strip(), timeout=30,
                   message="flasktop drawing at 20x5")
        tiny = t.flasktop("tiny")
        assert tiny is not None
        seen["tiny_alive"] = tiny.is_running() and tiny.status() != psutil.STATUS_ZOMBIE
        seen["tiny"] = t.capture("tiny")
        t.resize("tiny", 100, 30)
        wait_until(lambda: _overview(t.capture("tiny"), app), timeout=20, message="the redraw at 100x30")
        # rapid resizes of the NO_COLOR one, no pause between them (bounded: 40)
        proc = t.flasktop("nocolor")
        assert proc is not None
        sizes = [(20, 5), (200, 60), (10, 3), (120, 40), (80, 24), (33, 7), (160, 50), (20, 5)]
        for i in range(40):
            t.resize("nocolor", *sizes[i % len(sizes)])
        seen["resized_alive"] = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        t.resize("nocolor", 100, 30)
        try:
            wait_until(lambda: _overview(t.capture("nocolor"), app), timeout=20,
                       message="the redraw after the resizes")
        except AssertionError as e:
            size = t.run("display-message", "-p", "-t", "nocolor", "#{window_width}x#{window_height}")
            raise AssertionError(f"{e}: window {size.strip()}, alive {proc.is_running()}, "
                                 f"screen:\n{t.capture('nocolor')}") from None
        seen["after_resizes"] = t.capture("nocolor")
        seen["after_resizes_alive"] = proc.is_running()
        for name in ("nocolor", "tiny"):
            t.run("send-keys", "-t", name, "q")
        wait_until(lambda: all(written_line(tmp / f"rc-{n}") for n in ("nocolor", "tiny")),
                   timeout=20, message="both to quit on q")
        seen["rc"] = {n: written_line(tmp / f"rc-{n}") for n in ("nocolor", "tiny")}
    finally:
        for name in ("nocolor", "tiny"):
            p = t.flasktop(name)
            if p is not None:
                kill_tree(p.pid)
        t.kill()
    return seen


def test_tmux_tiny_terminal_and_rapid_resizes_keep_the_ui_alive_and_redrawing(tmux_runs):
    s = tmux_runs
    assert s["tiny_alive"] and s["resized_alive"] and s["after_resizes_alive"]
    assert all(len(line) <= 20 for line in s["tiny"].splitlines()) and s["tiny"].strip()
    assert "Traceback" not in s["after_resizes"] and "Slow routes" in s["after_resizes"]
    assert s["rc"] == {"nocolor": "0", "tiny": "0"}


def test_tmux_no_color_has_no_hue(tmux_runs):
    """What NO_COLOR guarantees with Textual: every colour is a grey (no hue at all)."""
    codes = _colour_codes(tmux_runs["nocolor"])
    assert [c for c in codes if not _grey(c)] == []
    assert "\x1b]" not in tmux_runs["nocolor"]  # no OSC (hyperlinks, titles) either


def test_tmux_no_color_emits_no_colour_codes(tmux_runs):
    assert _colour_codes(tmux_runs["nocolor"]) == []


def test_first_snapshot_delivered_at_start_renders_without_error(app):
    from flasktop.engine import Engine
    from flasktop.ui.app import FlasktopApp

    engine = Engine(app.pid, beacon=None, refresh=0.5, pyspy=False)
    engine.open()
    wait_until(lambda: engine.collect() >= 0 and engine.take_snapshot().workers, timeout=10,
               message="a first snapshot with the workers")
    first = engine.take_snapshot()

    class Eager:
        """The real engine, whose first snapshot is ready as the app starts the feed."""

        def start(self, cb):
            cb(first)
            engine.start(cb)

        def stop(self):
            engine.stop()

        def focus(self, pid):
            engine.focus(pid)

    ui = FlasktopApp(Eager(), attaching_to=f"gunicorn {app.pid}")
    errors: List[str] = []

    async def run() -> None:
        async with ui.run_test(size=(100, 30)) as pilot:
            for _ in range(5):
                await pilot.pause()
            errors.extend(ui.render_errors)
            assert ui.latest is not None

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert errors == []
