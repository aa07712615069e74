"""Finding gunicorn: resolving a pid to its master, listing masters, reading the configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flasktop.sources.gunicorn import (
    NotGunicorn, cmdline, find_masters, gunicorn_args, looks_like_gunicorn, parse_cmdline,
    read_config, read_config_file, resolve_master,
)
from tests.support import Gunicorn, gunicorn, kill_tree, wait_until

PY = "/srv/app/venv/bin/python3"


# ----------------------------------------------------------------------------- command lines

@pytest.mark.parametrize("argv, rest", [
    (["gunicorn", "-w", "2", "app:app"], ["-w", "2", "app:app"]),
    (["/usr/local/bin/gunicorn", "app:app"], ["app:app"]),
    ([PY, "/srv/app/venv/bin/gunicorn", "-k", "gthread", "app:app"], ["-k", "gthread", "app:app"]),
    ([PY, "-m", "gunicorn", "app:app"], ["app:app"]),
    (["python3.11", "-u", "-X", "dev", "-m", "gunicorn", "-b", ":80", "wsgi"], ["-b", ":80", "wsgi"]),
    (["python", "-mgunicorn", "wsgi"], ["wsgi"]),
    # what `python -m gunicorn` looks like after a USR2 re-exec
    ([PY, "/srv/venv/lib/python3.11/site-packages/gunicorn/__main__.py", "wsgi"], ["wsgi"]),
    (["gunicorn: master [myapp]"], []),
    (["gunicorn:", "worker", "[myapp]"], []),
])
def test_gunicorn_command_lines_are_recognised(argv: list, rest: list) -> None:
    assert gunicorn_args(argv) == rest


@pytest.mark.parametrize("argv", [
    [], ["python3", "myscript.py"], ["sleep", "30"], ["bash", "gunicorn-start.sh"],
    ["python3", "-c", "import gunicorn"], ["/bin/sh", "-c", "gunicorn app:app"],
    ["python3", "-m", "gunicornish"], ["uwsgi", "--http", ":80"],
])
def test_other_command_lines_are_not_gunicorn(argv: list) -> None:
    assert not looks_like_gunicorn(argv)


def test_a_process_title_hides_the_arguments_and_the_timeout_is_marked_assumed() -> None:
    """With setproctitle installed gunicorn's command line becomes ``gunicorn: master [app]``:
    a ``--timeout`` given there cannot be read, so the default is a guess and says so,
    unless GUNICORN_CMD_ARGS or a config file gave the timeout."""
    titled = parse_cmdline(["gunicorn: master [myapp:app]"])
    assert titled.args_hidden and titled.timeout is None and titled.timeout_assumed
    assert titled.effective_timeout == 30.0
    from_env = parse_cmdline(["gunicorn: master [myapp:app]"], env_args="--timeout 17")
    assert from_env.args_hidden and from_env.timeout == 17.0 and not from_env.timeout_assumed
    from_file = parse_cmdline(["gunicorn: master [myapp:app]"], file_values={"timeout": 90})
    assert from_file.timeout == 90.0 and not from_file.timeout_assumed
    plain = parse_cmdline(["gunicorn", "myapp:app"])
    assert not plain.args_hidden and plain.timeout is None and not plain.timeout_assumed


def test_parse_cmdline_long_short_and_glued_forms() -> None:
    c = parse_cmdline(["gunicorn", "--worker-class=gthread", "-w4", "--threads", "8", "-t", "45",
                       "--graceful-timeout=12", "--max-requests", "1000", "--max-requests-jitter=50",
                       "-b", "127.0.0.1:8000", "--bind=unix:/run/app.sock", "-b0.0.0.0:9000",
                       "--preload", "-c", "conf.py", "--access-logfile", "-", "myproj.wsgi:app"])
    assert c.worker_class == "gthread"
    assert c.workers == 4
    assert c.threads == 8
    assert c.timeout == 45.0
    assert c.graceful_timeout == 12.0
    assert c.max_requests == 1000
    assert c.max_requests_jitter == 50
    assert c.bind == ("127.0.0.1:8000", "unix:/run/app.sock", "0.0.0.0:9000")
    assert c.preload is True
    assert c.config_file == "conf.py"
    assert c.app == "myproj.wsgi:app"
    assert c.effective_timeout == 45.0


def test_parse_cmdline_odd_forms() -> None:
    assert parse_cmdline(["gunicorn", "-kgevent", "a:b"]).worker_class == "gevent"
    assert parse_cmdline(["gunicorn", "-k", "egg:gunicorn#eventlet", "a:b"]).worker_class == "eventlet"
    assert parse_cmdline(["gunicorn", "-k", "gunicorn.workers.gthread.ThreadWorker"]).worker_class \
        == "gthread"
    assert parse_cmdline(["gunicorn", "-k", "uvicorn.workers.UvicornWorker"]).worker_class \
        == "uvicorn.workers.UvicornWorker"
    assert parse_cmdline(["gunicorn", "-w=3", "a:b"]).workers == 3
    assert parse_cmdline(["gunicorn", "--workers", "5"]).workers == 5
    # argparse's unique-prefix abbreviations, as gunicorn accepts them
    assert parse_cmdline(["gunicorn", "--threa", "6", "a:b"]).threads == 6
    assert parse_cmdline(["gunicorn", "--work", "6", "a:b"]).workers is None  # ambiguous
    # a cluster of short flags, then a short option with its value glued on
    c = parse_cmdline(["gunicorn", "-Dw2", "a:b"])
    assert (c.workers, c.app) == (2, "a:b")
    # values of unrelated options are not mistaken for the app
    c = parse_cmdline(["gunicorn", "--log-level", "debug", "--name", "shop", "shop.wsgi", "--reload"])
    assert c.app == "shop.wsgi"
    c = parse_cmdline(["gunicorn", "--", "app:app"])
    assert c.app == "app:app"


def test_parse_cmdline_leaves_unparsable_values_none() -> None:
    c = parse_cmdline(["gunicorn", "-w", "four", "-t", "soon", "--threads", "", "--bind"])
    assert (c.workers, c.timeout, c.threads, c.bind) == (None, None, None, ())
    assert c.effective_timeout == 30.0
    empty = parse_cmdline([])
    assert (empty.cmdline, empty.app, empty.workers, empty.bind) == ((), None, None, ())
    assert parse_cmdline(["python3", "script.py"]).workers is None


def test_parse_cmdline_precedence_cli_env_file() -> None:
    argv = ["gunicorn", "-w", "2", "app:app"]
    file_values = {"workers": 9, "timeout": 90, "threads": 3, "bind": "unix:/tmp/f.sock",
                   "preload_app": True, "max_requests": 7}
    c = parse_cmdline(argv, env_args="--workers 4 --timeout 60 --max-requests 100",
                      file_values=file_values, web_concurrency="11")
    assert c.workers == 2  # command line wins
    assert c.timeout == 60.0  # GUNICORN_CMD_ARGS beats the file
    assert c.max_requests == 100
    assert c.threads == 3  # only in the file
    assert c.bind == ("unix:/tmp/f.sock",)
    assert c.preload is True
    assert parse_cmdline(["gunicorn", "app:app"], web_concurrency="6").workers == 6
    assert parse_cmdline(["gunicorn"], env_args="'unbalanced").workers is None
    assert parse_cmdline(["gunicorn"], file_values={"wsgi_app": "pkg.wsgi:app"}).app == "pkg.wsgi:app"
    assert parse_cmdline(["gunicorn"], file_values={"workers": True, "timeout": "x"}).workers is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.sampled_from(["gunicorn", "-w", "-k", "-b", "--bind", "--workers=", "-t", "--threads", "--",
                     "-", "--preload", "-Dw", "--proxy-protocol", "--max-requests-jitter", "-c"]),
    st.text(max_size=12)), max_size=12))
def test_parse_cmdline_never_raises(argv: list) -> None:
    c = parse_cmdline(argv)
    assert c.cmdline == tuple(argv)


def test_config_file_is_read_as_literals_never_executed(tmp_path: Path) -> None:
    witness = tmp_path / "executed"
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(
        "import multiprocessing\n"
        f"open({str(witness)!r}, 'w').write('ran')\n"
        "workers = multiprocessing.cpu_count() * 2 + 1\n"
        "worker_class = 'gthread'\n"
        "threads: int = 4\n"
        "bind = ['127.0.0.1:8000', 'unix:/run/x.sock']\n"
        "timeout = 30\n"
        "timeout = 45\n"
        "preload_app = True\n")
    values = read_config_file(str(conf))
    assert not witness.exists()
    assert values == {"worker_class": "gthread", "threads": 4,
                      "bind": ["127.0.0.1:8000", "unix:/run/x.sock"], "timeout": 45,
                      "preload_app": True}
    bad = tmp_path / "bad.py"
    bad.write_text("workers = (\n")
    assert read_config_file(str(bad)) == {}
    assert read_config_file(str(tmp_path / "absent.py")) == {}


# ----------------------------------------------------------------------------- real gunicorn

@pytest.fixture(scope="module")
def sync_gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    conf = tmp_path_factory.mktemp("conf") / "poller_conf.py"
    conf.write_text("max_requests_jitter = 7\ngraceful_timeout = 9\nworkers = 5\n")
    with gunicorn("poller_app:app", "-w", "2", "-t", "20", "--max-requests", "1000",
                  "-c", str(conf), workers_expected=2,
                  env={"GUNICORN_CMD_ARGS": "--threads 1 --graceful-timeout 8"}) as g:
        yield g


def test_master_and_workers_resolve_to_the_master(sync_gunicorn: Gunicorn) -> None:
    g = sync_gunicorn
    assert resolve_master(g.pid) == (g.pid, None)
    workers = g.worker_pids()
    assert len(workers) == 2
    for w in workers:
        assert resolve_master(w) == (
            g.pid, f"{w} is a worker of gunicorn master {g.pid}; attached to the master")


def test_config_from_the_real_master(sync_gunicorn: Gunicorn) -> None:
    g = sync_gunicorn
    config, path = read_config(g.pid)
    assert config.app == "poller_app:app"
    assert config.workers == 2  # the command line beats the file's 5
    assert config.timeout == 20.0
    assert config.max_requests == 1000
    assert config.graceful_timeout == 8.0  # GUNICORN_CMD_ARGS beats the file's 9
    assert config.max_requests_jitter == 7  # from the file only
    assert config.threads == 1
    assert config.effective_worker_class == "sync"
    assert config.bind == (f"127.0.0.1:{g.port}",)
    assert path is not None and path.endswith("poller_conf.py")


def test_find_masters_lists_the_master_not_its_workers(sync_gunicorn: Gunicorn) -> None:
    g = sync_gunicorn
    masters = {m.pid: m for m in find_masters()}
    assert g.pid in masters
    assert not set(g.worker_pids()) & set(masters)
    m = masters[g.pid]
    assert m.bind == (f"127.0.0.1:{g.port}",)
    assert m.workers == 2
    assert m.parent_master is None
    assert "poller_app:app" in m.cmdline


def test_a_titled_master_is_found_and_its_hidden_arguments_are_said_to_be_hidden() -> None:
    """With setproctitle, gunicorn writes its title over its command line and pads the rest
    with NULs (read back as empty arguments), and its environment with them."""
    with gunicorn("poller_app:app", "-w", "2", "-t", "7", workers_expected=2, titled=True,
                  env={"GUNICORN_CMD_ARGS": "--max-requests 50"}) as g:
        title = ("gunicorn: master [poller_app:app]",)
        wait_until(lambda: tuple(cmdline(g.pid) or ()) == title, timeout=10,
                   message="gunicorn to retitle its master")
        assert psutil.Process(g.pid).cmdline()[1:2] == [""]  # the padding, dropped by cmdline()
        [m] = [m for m in find_masters() if m.pid == g.pid]
        assert m.cmdline == title and m.workers == 2 and m.bind == (f"127.0.0.1:{g.port}",)
        for w in g.worker_pids():
            assert resolve_master(w)[0] == g.pid
        config, _ = read_config(g.pid)
        assert config.args_hidden and config.cmdline == title
        # what the title hides and the process shows: its name and the sockets it holds
        assert config.app == "poller_app:app" and config.bind == (f"127.0.0.1:{g.port}",)
        # -t 7 is hidden, and so is GUNICORN_CMD_ARGS: the default is assumed, and says so
        assert (config.timeout, config.max_requests, config.timeout_assumed) == (None, None, True)


def test_gthread_config_from_the_real_command_line() -> None:
    with gunicorn("poller_app:app", "-k", "gthread", "--threads", "3", "-w", "1", "--timeout=7",
                  workers_expected=1) as g:
        config, _ = read_config(g.pid)
        assert (config.worker_class, config.threads, config.workers, config.timeout) == (
            "gthread", 3, 1, 7.0)
        [w] = g.worker_pids()
        assert resolve_master(w)[0] == g.pid


# ----------------------------------------------------------------------------- not gunicorn

def exec_done(pid: int, argv: List[str]) -> None:
    """Wait until ``pid`` runs ``argv``: just after fork it still has the parent's command
    line (pytest's), which would be named in the message instead."""
    want = "\0".join(argv).encode() + b"\0"
    wait_until(lambda: Path(f"/proc/{pid}/cmdline").read_bytes() == want, timeout=10,
               message=f"{pid} to exec {argv[0]}")


def test_a_plain_process_is_not_gunicorn() -> None:
    argv = ["sleep", "30"]
    proc = subprocess.Popen(argv)
    try:
        exec_done(proc.pid, argv)
        with pytest.raises(NotGunicorn) as e:
            resolve_master(proc.pid)
        assert str(e.value) == f"pid {proc.pid} (sleep 30) is not a gunicorn master or worker"
    finally:
        kill_tree(proc.pid)
        proc.wait(5)


def test_a_python_script_is_not_gunicorn() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    proc = subprocess.Popen(argv)
    try:
        exec_done(proc.pid, argv)
        with pytest.raises(NotGunicorn) as e:
            resolve_master(proc.pid)
        msg = str(e.value)
        assert msg.startswith(f"pid {proc.pid} (") and msg.endswith(
            ") is not a gunicorn master or worker")
        assert "\n" not in msg
    finally:
        kill_tree(proc.pid)
        proc.wait(5)


@pytest.mark.parametrize("pid", [2**22 + 1, 0, -5])
def test_no_such_process(pid: int) -> None:
    with pytest.raises(NotGunicorn) as e:
        resolve_master(pid)
    assert str(e.value) == f"no process with pid {pid}"


def test_a_zombie_is_not_gunicorn() -> None:
    proc = subprocess.Popen(["true"])
    try:
        wait_until(lambda: open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z",
                   timeout=10, message="the child to become a zombie")
        with pytest.raises(NotGunicorn) as e:
            resolve_master(proc.pid)
        assert "zombie" in str(e.value) and "\n" not in str(e.value)
    finally:
        proc.wait(5)
