"""Issue 5, scenario 6: flasktop run as an unprivileged user against root's gunicorn.

gunicorn runs as root (as the tests do); ``flasktop snapshot`` runs as ``nobody``
(``setpriv --reuid=65534 --regid=65534 --clear-groups``). The kernel then refuses
py-spy's ptrace and hides the workers' fds, smaps (USS/PSS) and heartbeat file,
while RSS (``/proc/PID/statm``) and the beacon's UDP traffic still get through.

What this proves: each thing that cannot be read is named, with the reason and the
fix, in one line (the JSON ``sources`` and ``workers[].missing``, and the human
report); and what can be read still is (RSS of every worker; the routes from the
beacon, counted, none invented).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.support import Gunicorn, free_port, gunicorn, kill_tree, wait_until

ROOT = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _nobody_env() -> Dict[str, str]:
    purelib = sysconfig.get_paths()["purelib"]
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    return {"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
            "PYTHONPATH": f"{ROOT}:{purelib}", "PYTHONDONTWRITEBYTECODE": "1",
            "FLASKTOP_PY_SPY": os.path.join(venv_bin, "py-spy")}


def _nobody_python() -> Optional[str]:
    """An interpreter nobody can run that imports flasktop and its dependencies.

    The venv's python may live under /root (mode 0700 here); a system python of the
    same minor version reads the same site-packages (psutil's extension is built for it).
    """
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"):
        return None
    v = sys.version_info
    for exe in (sys.executable, f"/usr/bin/python{v.major}.{v.minor}", f"/usr/local/bin/python{v.major}.{v.minor}"):
        if not os.path.exists(exe):
            continue
        try:
            r = subprocess.run([*NOBODY, exe, "-c", "import flasktop.cli, psutil, flask; print('ok')"],
                               env=_nobody_env(), cwd="/tmp", capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip() == "ok":
            return exe
    return None


def _udp_bound(port: int) -> bool:
    """Whether some socket is bound to UDP ``port`` (read from /proc; never binds it ourselves)."""
    want = f":{port:04X}"
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        if any(r.split()[1].endswith(want) for r in rows if len(r.split()) > 2):
            return True
    return False


class Run:
    def __init__(self, rc: int, out: str, err: str, made: int, held: int = 0) -> None:
        self.rc, self.out, self.err, self.made = rc, out, err, made
        self.held = held  # earlier requests the beacon may still hold for a listener


def _held_before(app: "App", bound_at: float) -> int:
    """Requests made on ``app`` before a flasktop bound its port at ``bound_at`` that the
    beacon may deliver to it: ended while nobody listened (after an earlier flasktop had
    closed its socket), a beacon holds them for HOLD_S seconds, pruned at its next flush."""
    from flasktop.beacon._reporter import FLUSH_INTERVAL, HOLD_S
    horizon = bound_at - HOLD_S - 2 * FLUSH_INTERVAL
    return sum(1 for t in app.stamps if t >= horizon)


def _snapshot_as_nobody(python: str, app: "App", seconds: float, as_json: bool) -> Run:
    """Run ``flasktop snapshot`` as nobody; once it listens, make requests until it reports.

    Requests go on for the whole window: a beacon that was refused before flasktop listened
    sends nothing for 1-2 s (tests/faults/test_hostile_input.py, the re-attach test), so
    only a bound can be checked here: some counted, none invented."""
    g, udp = app.g, app.udp
    cmd = [*NOBODY, python, "-m", "flasktop", "snapshot", "--pid", str(g.pid),
           "--beacon", f"127.0.0.1:{udp}", "--seconds", str(seconds), "--sample-interval", "0.5"]
    if as_json:
        cmd.append("--json")
    proc = subprocess.Popen(cmd, env=_nobody_env(), cwd="/tmp", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    made = 0
    try:
        wait_until(lambda: _udp_bound(udp) or proc.poll() is not None, timeout=20,
                   message="flasktop (as nobody) to listen on the beacon port")
        held = _held_before(app, time.monotonic())
        while proc.poll() is None:
            app.fast(made)
            made += 1
        out, err = proc.communicate(timeout=seconds + 30)
    finally:
        kill_tree(proc.pid)
    return Run(proc.returncode, out, err, made, held)


class App:
    def __init__(self, g: Gunicorn, udp: int) -> None:
        self.g, self.udp, self.pid = g, udp, g.pid
        self.stamps: List[float] = []  # when each /fast request made on it ended

    def fast(self, n: int) -> None:
        assert self.g.get(f"/fast/{n}").status == 200
        self.stamps.append(time.monotonic())


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    """One root gunicorn (2 workers, the beacon on), shared by this module's tests in turn."""
    tmp = tmp_path_factory.mktemp("perm")
    udp = free_port(socket.SOCK_DGRAM)
    env = {"FLASKTOP_BEACON": f"127.0.0.1:{udp}", "TROUBLE_RELEASE": str(tmp / "release"),
           "PYTHONPATH": str(ROOT)}
    with gunicorn("trouble_app:app", "-w", "2", "--timeout", "30", env=env, workers_expected=2) as g:
        yield App(g, udp)


@pytest.fixture(scope="module")
def runs(app):
    python = _nobody_python()
    if python is None:
        pytest.skip("no interpreter that user nobody can run with flasktop importable "
                    "(needs root, setpriv, and a python of this version readable by nobody)")
    g = app.g
    assert psutil_uid(g.pid) == 0
    as_json = _snapshot_as_nobody(python, app, 4.0, True)
    human = _snapshot_as_nobody(python, app, 3.0, False)
    return {"json": as_json, "human": human, "workers": g.worker_pids(), "master": g.pid}


def psutil_uid(pid: int) -> int:
    import psutil

    return psutil.Process(pid).uids().real


def test_json_names_each_missing_source_and_field_with_its_reason(runs):
    r = runs["json"]
    assert r.rc == 0, r.err
    assert "Traceback" not in r.err
    doc = json.loads(r.out)
    src = doc["sources"]
    # py-spy: refused by the kernel, and how to fix it, in one line
    py = src["pyspy"]
    assert py["state"] == "denied", py  # every worker refused: not merely "degraded"
    assert "refused" in py["detail"] and "CAP_SYS_PTRACE" in py["detail"] and "\n" not in py["detail"]
    # psutil: which fields, why, and what to do, in one line
    ps = src["psutil"]
    assert ps["state"] == "degraded", ps
    for word in ("fds", "uss", "access denied", "run as"):
        assert word in ps["detail"], ps
    assert "\n" not in ps["detail"]
    # every worker: RSS read; USS and fds absent (null, not 0) and named with the reason
    assert sorted(w["pid"] for w in doc["workers"]) == runs["workers"]
    for w in doc["workers"]:
        assert isinstance(w["rss_bytes"], int) and w["rss_bytes"] > 1 << 20, w
        assert w["uss_bytes"] is None and w["num_fds"] is None, w
        for field in ("uss", "num_fds"):
            assert f"{field}: access denied" in w["missing"], w["missing"]
        assert all("\n" not in m for m in w["missing"])


def test_json_still_counts_requests_from_the_beacon(runs):
    r = runs["json"]
    assert r.rc == 0, r.err
    doc = json.loads(r.out)
    assert doc["sources"]["beacon"]["state"] == "ok", doc["sources"]["beacon"]
    routes = {(x["route"], x["method"]): x for x in doc["routes"]}
    assert 0 < routes[("/fast/<int:n>", "GET")]["count"] <= r.made + r.held
    assert set(routes) == {("/fast/<int:n>", "GET")}


def test_human_report_says_what_is_missing_and_why_one_line_each(runs):
    r = runs["human"]
    assert r.rc == 0, r.err
    lines = r.out.splitlines()
    assert "\x1b" not in r.out
    py = [ln for ln in lines if ln.startswith("  pyspy: ")]
    ps = [ln for ln in lines if ln.startswith("  psutil: ")]
    assert len(py) == 1 and "refused" in py[0] and py[0].rstrip().endswith("CAP_SYS_PTRACE"), py
    assert len(ps) == 1 and "access denied" in ps[0] and ps[0].rstrip().endswith("root)"), ps
    for pid in runs["workers"]:
        row = next(i for i, ln in enumerate(lines) if ln.split()[:1] == [str(pid)])
        assert lines[row].split()[2].endswith("M"), lines[row]  # RSS shown
        missing = [ln for ln in lines[row + 1:row + 3] if "missing:" in ln]
        assert len(missing) == 1 and "uss" in missing[0] and "num_fds" in missing[0] \
            and missing[0].rstrip().endswith("access denied"), lines[row:row + 3]
    assert any(ln.strip().startswith("GET /fast/<int:n>") for ln in lines), r.out


# ---------------------------------------------------------------------------------------
# Scenario 7: py-spy not installed or not runnable; the beacon port taken by another process


def _cli(args: List[str], env: Dict[str, str], python: str = sys.executable) -> subprocess.Popen:
    return subprocess.Popen([python, "-m", "flasktop", *args], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> Run:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_tree(proc.pid)
    return Run(proc.returncode, out, err, 0)


def _no_pyspy_python() -> Optional[str]:
    """A python that imports flasktop but has no py-spy beside it nor on PATH=/usr/bin:/bin."""
    v = sys.version_info
    exe = f"/usr/bin/python{v.major}.{v.minor}"
    if not os.path.exists(exe) or any(os.path.exists(os.path.join(d, "py-spy"))
                                      for d in ("/usr/bin", "/bin")):
        return None
    return exe


def test_pyspy_missing_or_not_runnable_is_one_line_and_the_rest_works(app, tmp_path):
    """Three ways py-spy is unusable, each a one-line 'missing' source state; the rest works.

    - not installed: a python with no py-spy beside it and none on PATH (default discovery);
    - FLASKTOP_PY_SPY names a file that is not executable (mode 0644);
    - FLASKTOP_PY_SPY names a path that does not exist.
    The first also listens to the beacon: the requests it hears are counted.
    """
    bare = _no_pyspy_python()
    purelib = sysconfig.get_paths()["purelib"]
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8",
            "PYTHONPATH": f"{ROOT}:{purelib}"}
    not_exec = tmp_path / "py-spy"
    not_exec.write_bytes(Path(os.path.dirname(sys.executable), "py-spy").read_bytes()[:4096])
    not_exec.chmod(0o644)
    g, udp = app.g, app.udp
    common = ["--sample-interval", "0.5"]
    procs = {}
    procs["badmode"] = _cli(["snapshot", "--pid", str(g.pid), "--beacon", "off", "--seconds", "2",
                             "--json", *common], {**base, "FLASKTOP_PY_SPY": str(not_exec)})
    procs["nopath"] = _cli(["snapshot", "--pid", str(g.pid), "--beacon", "off", "--seconds", "2",
                            "--json", *common],
                           {**base, "FLASKTOP_PY_SPY": str(tmp_path / "nowhere" / "py-spy")})
    made = 0
    if bare is not None:
        procs["absent"] = _cli(["snapshot", "--pid", str(g.pid), "--beacon", f"127.0.0.1:{udp}",
                                "--seconds", "4", "--json", *common], base, python=bare)
        absent = procs["absent"]
        wait_until(lambda: _udp_bound(udp) or absent.poll() is not None, timeout=20,
                   message="flasktop to listen on the beacon port")
        held = _held_before(app, time.monotonic())
        while absent.poll() is None:  # all along the window: see _snapshot_as_nobody
            app.fast(made)
            made += 1
    runs = {name: _finish(p, 40) for name, p in procs.items()}
    workers = g.worker_pids()

    expect = {
        "absent": ("py-spy not found", "pip install py-spy"),
        "badmode": (f"py-spy at {not_exec} cannot be run", "Permission denied", "chmod +x"),
        "nopath": (f"py-spy not found at '{tmp_path / 'nowhere' / 'py-spy'}' (FLASKTOP_PY_SPY)",),
    }
    for name, r in runs.items():
        assert r.rc == 0, (name, r.err)
        assert "Traceback" not in r.err
        doc = json.loads(r.out)
        py = doc["sources"]["pyspy"]
        assert py["state"] == "missing", (name, py)
        assert "\n" not in py["detail"] and all(part in py["detail"] for part in expect[name]), (name, py)
        # the rest works: psutil reads every worker (root), nothing else is marked missing
        assert doc["sources"]["psutil"]["state"] == "ok", (name, doc["sources"]["psutil"])
        assert sorted(w["pid"] for w in doc["workers"]) == workers
        assert all(w["rss_bytes"] and w["num_fds"] for w in doc["workers"])
    if bare is None:
        pytest.skip("no system python without py-spy beside it: 'not installed' not exercised "
                    "(the other two cases passed)")
    doc = json.loads(runs["absent"].out)
    assert doc["sources"]["beacon"]["state"] == "ok"
    fast = next(r for r in doc["routes"] if r["route"] == "/fast/<int:n>")
    # none invented: what it heard, plus what the beacon held from the module's earlier runs
    assert 0 < fast["count"] <= made + held, (fast["count"], made, held)


def test_snapshot_help_documents_flasktop_py_spy():
    r = subprocess.run([sys.executable, "-m", "flasktop", "snapshot", "--help"], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert "FLASKTOP_PY_SPY" in " ".join(r.stdout.split())


def _hold_udp(host: str, port: int) -> subprocess.Popen:
    """Another process holding UDP ``host:port`` (bounded: exits by itself after 60 s)."""
    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.bind((sys.argv[1], int(sys.argv[2])))\n"
            "print('bound', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, host, str(port)], stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "bound"
    return p


def _udp_rows(port: int) -> List[List[str]]:
    want = f":{port:04X}"
    out = []
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with open(name) as f:
            out += [r.split() for r in f.read().splitlines()[1:] if r.split()[1].endswith(want)]
    return out


def _own_udp_inodes() -> set:
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            mine.add(link[8:-1])
    udp = set()
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with open(name) as f:
            udp |= {r.split()[9] for r in f.read().splitlines()[1:]}
    return mine & udp


def test_port_taken_is_one_line_naming_the_owner_and_exit_2(app):
    """Another process holds the beacon port: flasktop says so in one line with the port and
    its owner (uid, user, pid), exits 2 from every command, and binds no other port."""
    from flasktop.engine import Engine
    from flasktop.sources.listener import PortInUse

    g = app.g
    port = free_port(socket.SOCK_DGRAM)
    holder = _hold_udp("127.0.0.1", port)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        runs = {
            "snapshot": _cli(["snapshot", "--pid", str(g.pid), "--beacon", f"127.0.0.1:{port}",
                              "--seconds", "1"], env),
            "top": _cli(["--pid", str(g.pid), "--beacon", f"127.0.0.1:{port}"], env),
            "env": _cli(["snapshot", "--pid", str(g.pid), "--seconds", "1", "--json"],
                        {**env, "FLASKTOP_BEACON": f"127.0.0.1:{port}"}),
        }
        results = {k: _finish(p, 30) for k, p in runs.items()}
        for name, r in results.items():
            assert r.rc == 2, (name, r.rc, r.err)
            lines = r.err.strip().splitlines()
            assert len(lines) == 1, (name, r.err)
            line = lines[0]
            assert f"UDP port {port}" in line and "already in use" in line, line
            assert f"pid {holder.pid}" in line and "uid 0, root" in line, line
            assert "--beacon" in line and "Traceback" not in r.err
            assert r.out == "", (name, r.out)
        # nobody moved to another port: the only socket on it is still the holder's
        rows = _udp_rows(port)
        assert len(rows) == 1 and holder.poll() is None
    finally:
        kill_tree(holder.pid)
    # In-process, with the port held on its address and on the wildcard: open() refuses
    # with the same line, this process holds no new UDP socket, the poller never started.
    for owner_host in ("127.0.0.1", "0.0.0.0"):
        port = free_port(socket.SOCK_DGRAM)
        holder = _hold_udp(owner_host, port)
        try:
            before = _own_udp_inodes()
            engine = Engine(g.pid, beacon=("127.0.0.1", port), pyspy=False)
            try:
                with pytest.raises(PortInUse) as info:
                    engine.open()
                assert _own_udp_inodes() == before
                assert not engine.poller.running
            finally:
                engine.stop()
            text = str(info.value)
            assert f"UDP port {port}" in text and f"pid {holder.pid}" in text, text
        finally:
            kill_tree(holder.pid)
