"""The UDP listener against real datagrams on 127.0.0.1."""

from __future__ import annotations

import collections
import contextlib
import os
import pwd
import socket
import threading
import time
from typing import Iterator, List

import pytest

from flasktop.protocol import Datagram, Encoder
from flasktop.sources import listener as listener_mod
from flasktop.sources.listener import (
    LISTENER_ERROR, REORDER_WINDOW, Listener, ListenerError, PortInUse, parse_address,
)
from tests.support import kill_tree, wait_until

T_MS = int(time.time() * 1000)
ROW = ["/orders/<int:oid>", "orders", "GET", 200, 41234, 120, "", 4250, 12]


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener(port=0)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        yield s


def one_per_seq(pid: int, n: int, rows_each: int = 1) -> List[bytes]:
    """``n`` datagrams from one Encoder: element i carries seq i + 1."""
    enc = Encoder(pid)
    out = []
    for _ in range(n):
        (data,) = enc.requests(T_MS, [ROW] * rows_each)
        out.append(data)
    return out


def send_all(sock: socket.socket, lst: Listener, datagrams: List[bytes]) -> None:
    for d in datagrams:
        sock.sendto(d, (lst.host, lst.port))


def received(lst: Listener, n: int) -> bool:
    return lst.stats().received >= n


def test_valid_and_garbage_are_all_accounted_for(listener: Listener, sender: socket.socket) -> None:
    valid = one_per_seq(4242, 30, rows_each=3)
    garbage = [
        (b"hello", "not_json"),
        (b"{" + b" " * 1500, "oversized"),  # longer than the cap, shorter than the read buffer
        (b"{" + b"x" * 9000, "oversized"),  # read truncated
        (b'{"v":1.5}', "bad_number"),
        (b'{"v":NaN}', "bad_number"),
        (b'{"v":2}', "bad_version"),
        (b"{\"v\":\xc3}", "bad_utf8"),
        (b'{"v":1,"k":"r","pid":7,"seq":1,"t":1732190000123,"s":["a"],"e":[[0,0,5,200,1,1,-1,1,1]]}',
         "bad_index"),
        (b"", "not_json"),
    ]
    expected_reasons: collections.Counter = collections.Counter()
    sent_bytes = 0
    order = []
    for i, data in enumerate(valid):
        order.append(data)
        g, reason = garbage[i % len(garbage)]
        if i % 2:
            order.append(g)
            expected_reasons[reason] += 1
    for data in order:
        sender.sendto(data, (listener.host, listener.port))
        sent_bytes += len(data)
    wait_until(lambda: received(listener, len(order)), 10, message="every datagram read")
    st = listener.stats()
    assert st.received == len(order)
    assert st.accepted == len(valid)
    assert dict(st.rejected) == dict(expected_reasons)
    assert st.accepted + sum(n for _, n in st.rejected) == st.received
    assert st.events == 3 * len(valid)
    assert st.bytes == sent_bytes
    assert (st.senders, st.lost, st.dropped_backlog, st.kernel_drops) == (1, 0, 0, 0)
    assert st.address == listener.address == f"127.0.0.1:{listener.port}"
    got = listener.drain()
    assert [d.seq for d in got] == list(range(1, 31))
    assert all(isinstance(d, Datagram) and d.requests[0].route == ROW[0] for d in got)
    assert listener.drain() == []


def test_sequence_gaps_are_losses_late_and_duplicate_are_not(listener: Listener,
                                                            sender: socket.socket) -> None:
    a = one_per_seq(1001, 20)
    b = one_per_seq(1002, 20)
    # pid 1001: 5, 6 and 10 never come; 12 comes after 13; 12 comes twice
    seqs_a = [1, 2, 3, 4, 7, 8, 9, 11, 13, 12, 12, 14]
    # pid 1002: first heard at 3 (the base, no loss before it), then 4, 8 (5-7 lost)
    seqs_b = [3, 4, 8]
    order = [a[s - 1] for s in seqs_a] + [b[s - 1] for s in seqs_b]
    send_all(sender, listener, order)
    wait_until(lambda: received(listener, len(order)), 10, message="every datagram read")
    st = listener.stats()
    assert st.accepted == len(order)
    assert st.lost == 3 + 3
    assert st.senders == 2


def test_a_recycled_pid_restarts_its_count(listener: Listener, sender: socket.socket) -> None:
    first = one_per_seq(2001, REORDER_WINDOW + 20)
    second = one_per_seq(2001, 5)  # a new process with the same pid starts again at 1
    order = first + second[:2] + second[3:]  # then loses its seq 3
    send_all(sender, listener, order)
    wait_until(lambda: received(listener, len(order)), 10, message="every datagram read")
    st = listener.stats()
    assert st.lost == 1
    assert st.senders == 2


def test_backlog_is_bounded_and_counts_what_it_drops(sender: socket.socket) -> None:
    lst = Listener(port=0, backlog=10)
    lst.start()
    try:
        send_all(sender, lst, one_per_seq(3001, 50))
        wait_until(lambda: received(lst, 50), 10, message="every datagram read")
        st = lst.stats()
        assert (st.accepted, st.dropped_backlog) == (50, 40)
        assert [d.seq for d in lst.drain()] == list(range(41, 51))  # the newest are kept
    finally:
        lst.stop()


def test_backlog_is_bounded_in_events_too(sender: socket.socket) -> None:
    lst = Listener(port=0, backlog_events=100)
    lst.start()
    try:
        send_all(sender, lst, one_per_seq(3002, 20, rows_each=30))
        wait_until(lambda: received(lst, 20), 10, message="every datagram read")
        kept = lst.drain()
        assert sum(len(d.requests) for d in kept) <= 100 and len(kept) == 3
        assert lst.stats().dropped_backlog == 17
    finally:
        lst.stop()


def test_drain_in_parts_keeps_order(listener: Listener, sender: socket.socket) -> None:
    send_all(sender, listener, one_per_seq(3003, 25))
    wait_until(lambda: received(listener, 25), 10, message="every datagram read")
    parts = [listener.drain(10), listener.drain(10), listener.drain(10), listener.drain(0)]
    assert [len(p) for p in parts] == [10, 10, 5, 0]
    assert [d.seq for p in parts for d in p] == list(range(1, 26))


def test_concurrent_drains_see_each_datagram_once(listener: Listener, sender: socket.socket) -> None:
    datagrams = one_per_seq(3004, 2000)
    seen: List[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def consume() -> None:
        while True:
            finished = done.is_set()
            got = listener.drain(7)
            with lock:
                seen.extend(d.seq for d in got)
            if finished and not got:
                return
            time.sleep(0.001)

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(0, len(datagrams), 100):
        send_all(sender, listener, datagrams[i:i + 100])
        wait_until(lambda: received(listener, i + 100), 10, message="a block read")
    done.set()
    for t in threads:
        t.join(10)
    assert sorted(seen) == list(range(1, 2001))


def test_many_pids_keep_the_table_bounded(sender: socket.socket) -> None:
    lst = Listener(port=0, pid_table=32)
    lst.start()
    try:
        encoders = [Encoder(pid) for pid in range(5000, 5200)]
        for enc in encoders:
            sender.sendto(enc.requests(T_MS, [ROW])[0], (lst.host, lst.port))
        wait_until(lambda: received(lst, 200), 10, message="every datagram read")
        assert lst.tracked_pids == 32
        assert lst.stats().senders == 200
        # an evicted pid that comes back after a gap starts a new base: not a loss
        enc = encoders[0]
        enc.requests(T_MS, [ROW])
        sender.sendto(enc.requests(T_MS, [ROW])[0], (lst.host, lst.port))
        wait_until(lambda: received(lst, 201), 10, message="the late one read")
        st = lst.stats()
        assert (st.lost, st.senders, lst.tracked_pids) == (0, 201, 32)
    finally:
        lst.stop()


def test_an_exception_handling_one_datagram_is_counted_and_the_next_is_read(
        listener: Listener, sender: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    real = listener_mod.decode

    def fragile(data: bytes):  # fault injection: the real decoder, except for one payload
        if data == b"{boom}":
            raise MemoryError("injected")
        return real(data)

    monkeypatch.setattr(listener_mod, "decode", fragile)
    good = one_per_seq(6001, 3)
    send_all(sender, listener, [good[0], b"{boom}", good[1], b"{boom}", good[2]])
    wait_until(lambda: received(listener, 5), 10, message="every datagram read")
    st = listener.stats()
    assert st.accepted == 3 and dict(st.rejected) == {LISTENER_ERROR: 2}
    assert listener.running


def test_kernel_drops_are_read_from_proc(sender: socket.socket) -> None:
    lst = Listener(port=0, rcvbuf=1, interval=3600)  # tiny buffer, and it reads only at start and stop
    lst.start()
    try:
        datagrams = one_per_seq(7001, 300, rows_each=20)
        send_all(sender, lst, datagrams)
        st = lst.stats()
        assert st.kernel_drops is not None and st.kernel_drops > 0
    finally:
        lst.stop()
    st = lst.stats()
    assert st.kernel_drops is not None
    assert st.received + st.kernel_drops == len(datagrams)


def test_stop_is_prompt_and_idempotent(sender: socket.socket) -> None:
    lst = Listener(port=0, interval=3600)  # stop() must not wait out the pause
    lst.start()
    assert lst.running
    lst.stop()
    assert not lst.running  # join() gives up after 5 s; still running would mean it waited
    lst.stop()
    with pytest.raises(RuntimeError):
        lst.start()
    again = Listener(port=lst.port)  # the port is free again
    again.start()
    again.stop()


def test_no_reuse_options_and_a_second_listener_is_refused(listener: Listener) -> None:
    sock = listener._sock
    assert sock is not None
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    if hasattr(socket, "SO_REUSEPORT"):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    with pytest.raises(PortInUse):
        Listener(port=listener.port).start()


def test_rcvbuf_is_raised_and_read_back(listener: Listener) -> None:
    assert listener._sock is not None
    assert listener.rcvbuf == listener._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if os.geteuid() == 0:
        assert listener.rcvbuf >= listener.requested_rcvbuf  # SO_RCVBUFFORCE


def test_port_in_use_names_the_port_and_our_uid() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as info:
            Listener(port=port).start()
    msg = str(info.value)
    assert "\n" not in msg and f"UDP port {port} on 127.0.0.1" in msg and "--beacon" in msg
    me = pwd.getpwuid(os.getuid()).pw_name
    assert f"uid {os.getuid()}, {me}" in msg
    assert f"pid {os.getpid()}" in msg
    assert (info.value.port, info.value.uid, info.value.pid) == (port, os.getuid(), os.getpid())


def test_port_in_use_on_the_wildcard_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as info:
            Listener(port=port).start()
    assert f"UDP port {port}" in str(info.value) and info.value.uid == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_port_in_use_by_another_user_names_them() -> None:
    try:
        other = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, hold a UDP port until the parent lets go
        try:
            os.close(ready_r)
            os.close(hold_w)
            os.setgid(other.pw_gid)
            os.setuid(other.pw_uid)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            os.write(ready_w, b"%d\n" % s.getsockname()[1])
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        with os.fdopen(ready_r, "rb") as ready:
            port = int(ready.readline())
        with pytest.raises(PortInUse) as info:
            Listener(port=port).start()
        assert f"uid {other.pw_uid}, nobody" in str(info.value)
        assert info.value.pid == pid
    finally:
        os.close(hold_w)
        kill_tree(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_bad_addresses_are_one_line_listener_errors() -> None:
    for host in ("192.0.2.1", "no-such-host.invalid"):
        with pytest.raises(ListenerError) as info:
            Listener(host, 0).start()
        assert not isinstance(info.value, PortInUse)
        assert "\n" not in str(info.value) and host in str(info.value)


def test_ipv6_loopback() -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    lst = Listener("::1", 0)
    lst.start()
    try:
        assert lst.address == f"[::1]:{lst.port}"
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.sendto(one_per_seq(8001, 1)[0], ("::1", lst.port))
        wait_until(lambda: received(lst, 1), 10, message="the datagram read")
        st = lst.stats()
        assert st.accepted == 1 and st.kernel_drops == 0
    finally:
        lst.stop()


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9711", ("127.0.0.1", 9711)),
    (" localhost:1 ", ("localhost", 1)),
    ("[::1]:9711", ("::1", 9711)),
    (":9712", ("127.0.0.1", 9712)),
    ("9713", ("127.0.0.1", 9713)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_address(text: str, expected: tuple) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("127.0.0.1", "missing port"),
    ("127.0.0.1:", "missing port"),
    ("[::1]", "missing port"),
    ("[::1]:", "missing port"),
    ("[::1", "']'"),
    ("[zz]:1", "not an IPv6"),
    ("::1:9711", "brackets"),
    ("127.0.0.1:0", "out of range"),
    ("127.0.0.1:65536", "out of range"),
    ("127.0.0.1:99999999", "1 to 65535"),
    ("127.0.0.1:-1", "1 to 65535"),
    ("127.0.0.1:+5", "1 to 65535"),
    ("127.0.0.1:\u0663", "1 to 65535"),  # an Arabic-Indic digit int() would accept
    ("127.0.0.1:1_000", "1 to 65535"),
    ("300.1.1.1:9711", "not an IPv4"),
    ("bad host:9711", "not a host name"),
    ("a\nb:9711", "not a host name"),
    ("x" * 500 + ":1", "not a host name"),
])
def test_parse_address_errors_are_one_line(text: str, says: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    msg = str(info.value)
    assert says in msg and "\n" not in msg and len(msg) < 200
