"""The per-process half of the beacon: lanes, the record queue, the flusher thread, the socket.

The Flask fast path (``_fast``) leaves each ended request as four floats in its thread's
lane; the middleware and the slow path (``_middleware``) build one list per request,
append it to :attr:`Reporter.started` when the request begins and stamp its end time when
the server closes the response. Everything else happens on the flusher thread: it takes
the lanes' ended requests, moves records to its own in-flight table, notices which have
ended, reads the matched rule, parses the status, finds the size, clips labels, counts
busy flushes in aggregates, encodes and sends. The flusher starts with a gunicorn worker
(the beacon sees it on the stack that loads the app), else with the first request, and is
re-created after fork.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import math
import os
import socket
import struct
import sys
import threading
import time
from array import array
from bisect import bisect_right
from collections import _count_elements, deque  # type: ignore[attr-defined]
from itertools import accumulate, compress, count, groupby, repeat
from math import ceil
from math import log2
from operator import add, eq, ge, is_, itemgetter, lt, methodcaller, mul, not_, or_, sub, truth
from typing import Any, Deque, Dict, List, Optional, Tuple

from flasktop import protocol
from flasktop.beacon._address import Target, resolve

log = logging.getLogger("flasktop.beacon")

QUEUE_CAP = 10_000  # records not yet seen by the flusher; past it requests go unreported, counted
INFLIGHT_CAP = 10_000  # running requests tracked; past it the oldest are forgotten, counted
WAKE_AT = 4096  # a queue this long wakes the flusher early (the slow path's queue)
# Seconds between flushes: once a second, the in-flight report's period and the UI's
# refresh, so a request reaches the screen within about two seconds. A busy flush costs a
# fixed ~0.5 ms of a cold thread's CPU (the wake-up, the one-by-one events, the sends),
# whatever it carries: at 0.3 s a busy worker paid that 3.3 times a second
# (docs/benchmarks.md).
FLUSH_INTERVAL = 1.0
REPORT_INTERVAL = 1.0  # seconds between in-flight reports (the heartbeat)
REPORT_ROWS = 96  # at most this many in-flight rows are encoded (oldest first)
CACHE_CAP = 4096  # entries in each label / rule / status cache
CHUNK = 4096  # ended requests encoded per pass
# While nobody listens, the last few seconds of ended requests are held (not encoded) and
# sent when a listener answers: a flasktop that just bound its port (the beacon needs one
# to two in-flight reports to notice) loses none of them. Older ones are counted unheard.
HOLD_S = 5.0
HOLD_CAP = 20_000
_TABLE_BUDGET = 480  # bytes of string table a group of routes may share per datagram
# Each flush sends its first BUDGET ended requests one by one, and every slow or failed one;
# the rest (a busy worker's fast, successful requests) go as per-(route, method, status,
# thread) latency histograms, or, for a lane of one group, as the high bytes of their
# durations (kind "h", which flasktop buckets): one row per flush instead of one event per
# request, which is what the app would otherwise pay to encode and send. Every request is
# reported exactly once.
BUDGET = 64
# Seconds: a request at least this long is always sent on its own. 5/1024 s, about 5 ms,
# whose binary64 is 0x3F74 and then zeros, so that a duration's top two bytes alone tell
# a slow one from a fast one (see _slow_mask): no float is made of a busy flush's durations.
SLOW_S = 5 / 1024
_SLOW_B6, _SLOW_TOP = struct.pack("<d", SLOW_S)[6:]  # 0x74, 0x3F
_IS_SLOW_TOP = bytes(0xFF if i == _SLOW_TOP else 0 for i in range(256))  # translate tables
_IS_ABOVE_SLOW_TOP = bytes(0xFF if i > _SLOW_TOP else 0 for i in range(256))
_IS_SLOW_B6 = bytes(0xFF if i >= _SLOW_B6 else 0 for i in range(256))
# protocol.bucket_of's ceil(ln(d) / ln(gamma)) as ceil(log2(d) / log2(gamma)): the same key but
# within a rounding error of a bucket's edge, where either key is within AGG_ACCURACY (a
# million random durations all agree). log2 takes one argument, so map() calls it without
# building an argument tuple per duration: about 30% less flusher time per aggregated request.
_INV_LOG2_GAMMA = 1.0 / math.log2(protocol.AGG_GAMMA)
# The Flask fast path (``_fast``) keeps each thread's requests in a lane: a bytearray of QUAD
# records (start, group, size, duration as native doubles), each request's (status, rule,
# method, exception) as a group id into ``Reporter.group_info``.
QUAD = struct.Struct("4d")
_ONE_D = struct.Struct("d")
GROUPS_CAP = 2048
LANE_CAP = 100_000  # requests a lane may hold between two flushes; the oldest past it are dropped
UNTRACKED = -1.0  # the group of a request that left Flask unseen: status unknown, route unknown
_STALE: Dict[str, Any] = {}  # a lane's environ after fork: its next request re-registers it

# A record is a plain list, the cheapest thing to build on the request path. SIZE is
# the Content-Length value (a str), else the bytes iterated so far (an int), else None.
# At close the middleware drops ENVIRON, then stamps T1: a record with T1 has ended.
T0, ENVIRON, STATUS, SIZE, TID, EXC, T1, RULE, METHOD = range(9)

_METHODS = {m: m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                           "TRACE", "CONNECT", "PROPFIND", "PROPPATCH", "MKCOL", "COPY",
                           "MOVE", "LOCK", "UNLOCK", "REPORT", "SEARCH", "PURGE")}
_MAX_DUR_US = protocol._MAX_DUR_US
_MAX_AGE_MS = protocol._MAX_AGE_MS
_MAX_SIZE = protocol._MAX_SIZE
_MAX_TID = protocol._MAX_TID
_MAX_EVENTS = protocol._MAX_EVENTS
_MAX_STRINGS = protocol._MAX_STRINGS
_RESET_SOCKET = frozenset({errno.EBADF, errno.ENOTSOCK})
# Bytes of a requests datagram besides its header, strings and events: '[' '],"e":[' ']}'.
_FRAME = 1 + 8 + 2

Label = Tuple[str, str, int]  # (clipped label, its JSON form, bytes it adds to the table)

_first_failure_logged = False
_call = methodcaller("__call__")
_get_t1 = itemgetter(T1)
_get_t0 = itemgetter(T0)
_get_status = itemgetter(STATUS)
_get_exc = itemgetter(EXC)
_get_rule = itemgetter(RULE)
_get_method = itemgetter(METHOD)
_get_tid = itemgetter(TID)


class HasReporter:
    """What ``Beacon`` and ``BeaconMiddleware`` both say about their process's reporter."""

    __slots__ = ()
    reporter: Optional["Reporter"]

    @property
    def enabled(self) -> bool:
        return self.reporter is not None

    def stats(self) -> Dict[str, int]:
        """Counters of this process's reporter (sent, reported, dropped, send_errors, ...)."""
        return self.reporter.stats() if self.reporter is not None else {}

    def flush(self, timeout: float = 1.0) -> bool:
        """Send what has ended now, from the calling thread."""
        return self.reporter.flush(timeout) if self.reporter is not None else False


def _log_failure_once(what: str) -> None:
    global _first_failure_logged
    if not _first_failure_logged:
        _first_failure_logged = True
        log.warning("flasktop beacon: %s failed; the app is unaffected", what, exc_info=True)


def _json_label(text: str) -> Label:
    j = json.dumps(text, ensure_ascii=False)
    return text, j, len(j.encode("utf-8", "replace")) + 1


_NO_EXC: Label = ("", "", 0)


class Reporter:
    """Collects and sends one process's request events to one address."""

    def __init__(self, target: Target) -> None:
        self.family, self.sockaddr = target
        # The fast path's lanes and groups: made once, kept across fork (the request path
        # holds these very objects); lanes are re-registered by their thread after fork.
        self.lanes: List[Any] = []
        self.groups: Dict[tuple, float] = {(0, None, "OTHER", ""): UNTRACKED}
        # The request path's view of the groups: method -> route -> status code -> group id,
        # three dict subscripts (a tuple key costs it a hash and a compare of the tuple, cold
        # C code: 0.1-0.2 us a request in place, docs/benchmarks.md). A leaf is a group
        # without an exception whose method is a known one: no more leaves than groups.
        self.routes: Dict[str, Dict[str, Dict[int, float]]] = {}
        self.group_info: List[Any] = [None, (0, None, "OTHER", "")]
        # gunicorn's settings for this worker (protocol.gunicorn_fields), sent with every
        # in-flight report; kept across fork (a --preload master read them for its workers)
        self.gunicorn: Optional[tuple] = None
        self._reset()

    def _reset(self) -> None:
        self.started: Deque[list] = deque()
        self.flights: Dict[int, list] = {}  # flusher-owned: records seen still running
        self.dropped = 0
        self.send_errors = 0
        self.sent = 0
        self.reported = 0
        self.aggregated = 0  # requests reported as counts in aggregates (of reported)
        self.unheard = 0  # ended requests never sent: nobody listened while they were held
        self.held: Deque[list] = deque()  # ended while nobody listened, newest HOLD_S seconds
        self.held_lanes: Deque[Tuple[int, Any]] = deque()  # (tid, quads), likewise
        self.held_lane_count = 0
        self.group_lock = threading.Lock()
        self.listening = True  # until the kernel refuses a datagram
        self.probed = False
        self.running = False
        self.thread: Optional[threading.Thread] = None  # the flusher, once started
        self.woken = True  # no wake-ups until the flusher exists
        self.wake: Optional[Any] = None
        self.sock: Optional[socket.socket] = None
        self.encoder = protocol.Encoder(os.getpid())
        self.lock = threading.Lock()
        self.start_lock = threading.Lock()
        self.last_report = float("-inf")
        self.idle = False  # the last flush had nothing to send and nothing running
        self.labels: Dict[str, Label] = {}
        self.rules: Dict[int, Tuple[Any, Label, Label]] = {}
        self.codes: Dict[Any, int] = {}

    # -- request path helpers (rare branches only) --------------------------------

    def wakeup(self) -> None:
        try:
            if not self.woken:
                self.woken = True
                self.wake.set()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the app must never see the beacon fail
            _log_failure_once("waking the flusher")

    def start(self) -> None:
        """Start this process's flusher thread (once; again after fork). Never raises."""
        try:
            with self.start_lock:
                if self.running:
                    return
                self.running = True
                # Looked up now, not at import: under gevent these are the patched versions.
                self.wake = threading.Event()
                thread = threading.Thread(target=self._run, name="flasktop-beacon", daemon=True)
                thread.start()
                self.thread = thread  # its CPU clock is what bench/beacon_overhead.py reads
                self.woken = False
        except Exception:  # noqa: BLE001 - e.g. no threads at interpreter shutdown
            _log_failure_once("starting the flusher thread")

    def find(self, environ: Any) -> Optional[list]:
        """The running record for ``environ`` (exception path only: a scan)."""
        try:
            for rec in list(self.started) + list(self.flights.copy().values()):
                if rec[ENVIRON] is environ and not rec[T1]:
                    return rec
        except Exception:  # noqa: BLE001
            pass
        return None

    # -- flusher ----------------------------------------------------------------

    def _run(self) -> None:
        wake = self.wake
        assert wake is not None
        while True:
            try:
                # An idle worker's flusher wakes only for the in-flight report, should
                # FLUSH_INTERVAL ever be shorter than REPORT_INTERVAL: each wake-up of a
                # thread that slept costs about 0.2 ms of CPU here (its code and the
                # kernel's are cold again), and most workers are idle most of the time.
                wait = FLUSH_INTERVAL
                if self.idle:
                    wait = max(wait, self.last_report + REPORT_INTERVAL - time.perf_counter())
                wake.wait(wait)
                self.woken = False
                wake.clear()
                if not self.flush():
                    time.sleep(FLUSH_INTERVAL)
            except Exception:  # noqa: BLE001
                _log_failure_once("flushing")
                time.sleep(FLUSH_INTERVAL)

    def flush(self, timeout: float = -1) -> bool:
        """Send the requests that ended, and the in-flight report when it is due.

        False when the lock was not had within ``timeout`` or the flush failed. Never raises."""
        try:
            if not self.lock.acquire(timeout=timeout):
                return False
        except Exception:  # noqa: BLE001
            return False
        try:
            self._flush()
            return True
        except Exception:  # noqa: BLE001 - a flusher bug must not reach the app
            _log_failure_once("flushing")
            return False
        finally:
            self.lock.release()

    def _flush(self) -> None:
        started = self.started
        flights = self.flights
        ended: List[list] = []
        if flights:
            seen = list(flights.values())
            ended = list(compress(seen, map(_get_t1, seen)))
            for rec in ended:
                del flights[id(rec)]
        k = len(started)
        if k:
            # Only this thread pops, so k pops cannot fail; done in C, not per item in Python.
            batch = list(map(_call, repeat(started.popleft, k)))
            ends = list(map(_get_t1, batch))
            done = list(compress(batch, ends))
            if len(done) < k:
                running = list(compress(batch, map(not_, ends)))
                flights.update(zip(map(id, running), running))
            ended += done
        chunks = self._drain_lanes() if self.lanes else []
        self.idle = not (ended or chunks or flights)
        held = self.held
        held_lanes = self.held_lanes
        if self.listening:
            if held:
                ended = list(held) + ended
                held.clear()
            if held_lanes:
                chunks = list(held_lanes) + chunks
                held_lanes.clear()
                self.held_lane_count = 0
            budget = BUDGET
            for i in range(0, len(ended), CHUNK):
                budget = self._send_ended(ended[i:i + CHUNK], budget)
            for tid, quads in chunks:  # whole: one aggregate row per group and flush
                budget = self._send_lane(tid, quads, budget)
        else:  # nobody listens (the kernel said so): hold, don't encode
            held.extend(ended)
            horizon = time.perf_counter() - HOLD_S
            while held and (len(held) > HOLD_CAP or held[0][T1] < horizon):
                held.popleft()
                self.unheard += 1
            held_lanes.extend(chunks)
            self.held_lane_count += sum(len(q) for _, q in chunks) // 4
            while held_lanes and (self.held_lane_count > HOLD_CAP
                                  or held_lanes[0][1][-4] + held_lanes[0][1][-1] < horizon):
                gone = len(held_lanes.popleft()[1]) // 4
                self.held_lane_count -= gone
                self.unheard += gone
        if len(flights) > INFLIGHT_CAP:
            self._evict()
        now = time.perf_counter()
        if now - self.last_report >= REPORT_INTERVAL:
            self.last_report = now
            if self.lanes:
                with self.group_lock:
                    self.prune_lanes()
            self._report(now, int(time.time() * 1000))

    def _drain_lanes(self) -> List[Tuple[int, Any]]:
        """Take every lane's ended requests: (tid, whole quads as an ``array('d')``) per lane
        that has some.

        Only this thread deletes from a lane, and only whole quads from its front; its own
        thread only appends whole quads. Both are single operations under the GIL (deleting
        from a bytearray's front moves its start, not its bytes)."""
        out = []
        size = QUAD.size
        for lane in list(self.lanes):
            buf = lane.buf
            n = len(buf)
            n -= n % size
            if n:
                data = buf[:n]
                del buf[:n]
                if n > size * LANE_CAP:  # the flusher was held up: keep the newest
                    self.dropped += n // size - LANE_CAP
                    del data[:n - size * LANE_CAP]
                quads = array("d")
                quads.frombytes(data)
                out.append((lane.tid, quads))
        return out

    def prune_lanes(self) -> None:
        """Forget the lanes of threads that ended (a thread per request server). Called
        with ``group_lock`` held; a lane is dropped only once the flusher emptied it."""
        alive = [lane for lane in self.lanes if len(lane.buf) or lane.thread.is_alive()]
        if len(alive) < len(self.lanes):
            self.lanes[:] = alive

    def fork_lanes(self) -> None:
        """In a forked child: only the forking thread exists; its lane re-registers when
        its next request finds the lane stale."""
        me = threading.get_ident()
        mine = [lane for lane in self.lanes if lane.ident == me]
        del self.lanes[:]
        for lane in mine:
            lane.environ = _STALE
            lane.gk = 0.0

    def _lane_open(self) -> List[Tuple[float, str, str, Any, int]]:
        """(start, route, endpoint, method, tid) of each lane's running request."""
        out = []
        info = self.group_info
        for lane in list(self.lanes):
            environ = lane.environ
            if environ is None or environ is _STALE:
                continue
            t0, gk = lane.t0, lane.gk
            try:
                if gk:  # responding (a stream): its group knows the route
                    _, rule, method, _ = info[int(abs(gk))]
                    if rule is None:
                        route, endpoint = protocol.UNMATCHED, ""
                    else:
                        route, endpoint = rule.rule, rule.endpoint or ""
                else:
                    if environ.get("werkzeug.request") is None:
                        continue  # it left Flask unseen; its thread's next request settles it
                    route, endpoint = _live_route(environ)
                    method = environ.get("REQUEST_METHOD")
            except Exception:  # noqa: BLE001 - the lane moved on meanwhile
                continue
            out.append((t0, route, endpoint, method, lane.tid))
        return out

    # -- labels -----------------------------------------------------------------

    def _label(self, value: Any) -> Label:
        labels = self.labels
        try:
            return labels[value]
        except (KeyError, TypeError):
            pass
        label = _json_label(protocol.clip(value if type(value) is str else str(value)))
        if len(labels) >= CACHE_CAP:
            labels.clear()
        if type(value) is str:
            labels[value] = label
        return label

    def _rule(self, rule: Any) -> Tuple[Any, Label, Label]:
        """(rule, route label, endpoint label); Flask rules are cached by id (holding them)."""
        if rule is None:
            hit = (None, self._label(protocol.UNMATCHED), self._label(""))
        elif type(rule) is str:  # a non-Flask app's environ["flasktop.route"]
            return rule, self._label(rule), self._label("")
        elif type(rule) is tuple:  # ... with environ["flasktop.endpoint"]
            return rule, self._label(rule[0]), self._label(rule[1])
        else:
            hit = (rule, self._label(rule.rule), self._label(rule.endpoint or ""))
        if len(self.rules) >= CACHE_CAP:
            self.rules.clear()
        self.rules[id(rule)] = hit
        return hit

    def _code(self, status: Any) -> int:
        code = _status(status)
        if len(self.codes) >= CACHE_CAP:
            self.codes.clear()
        if type(status) is str or type(status) is int:
            self.codes[status] = code
        return code

    # -- requests and aggregates datagrams -------------------------------------------

    def _codes(self, statuses: Any) -> List[int]:
        """The status code of each status line (cached by the line; 0 when unparsable)."""
        codes = list(map(self.codes.get, statuses))
        if None in codes:
            codes = [self._code(st) if c is None else c for c, st in zip(codes, statuses)]
        return codes

    def _send_ended(self, recs: List[list], budget: int) -> int:
        """Send ``recs``: the first ``budget`` and the slow or failed ones as requests, the
        rest as aggregates. Returns the budget left. Per-request work is done in C."""
        n = len(recs)
        if n <= budget:
            self._send_requests(recs)
            return budget - n
        budget = max(budget, 0)
        durs = list(map(sub, map(_get_t1, recs), map(_get_t0, recs)))
        codes = self._codes(list(map(_get_status, recs)))
        if (max(durs) < SLOW_S and min(codes) > 0 and max(codes) < 500
                and not any(map(_get_exc, recs))):  # the busy common case: all fast and fine
            if budget:
                self._send_requests(recs[:budget])
            self._send_aggregates(recs[budget:], durs[budget:], codes[budget:])
            return 0
        # one by one: the budget, and every slow, 5xx, never started (0) or raising request
        loud = list(map(or_, map(or_, map(ge, durs, repeat(SLOW_S, n)), map(ge, codes, repeat(500, n))),
                        map(or_, map(not_, codes), map(truth, map(_get_exc, recs)))))
        loud[:budget] = repeat(True, budget)
        quiet = list(map(not_, loud))
        self._send_requests(list(compress(recs, loud)))
        self._send_aggregates(list(compress(recs, quiet)), list(compress(durs, quiet)),
                              list(compress(codes, quiet)))
        return 0

    def _send_aggregates(self, recs: List[list], durs: List[float], codes: List[int]) -> None:
        """Count ``recs`` per (rule, method, status, thread) in protocol latency buckets."""
        n = len(recs)
        if not n:
            return
        keys = _bucket_keys(durs)
        rules = list(map(_get_rule, recs))
        methods = list(map(_get_method, recs))
        tids = list(map(_get_tid, recs))
        r0, m0, c0, t0 = rules[0], methods[0], codes[0], tids[0]
        grouped: Dict[Tuple[int, Any, int, int], List[Tuple[int, int]]] = {}
        counts: Dict[Any, int] = {}
        if (all(map(is_, rules, repeat(r0, n))) and all(map(eq, methods, repeat(m0, n)))
                and codes.count(c0) == n and tids.count(t0) == n):
            _count_elements(counts, keys)  # one route, one thread: count the keys alone
            grouped[(id(r0), m0, c0, t0)] = list(counts.items())
            by_id = {id(r0): r0}
        else:
            ids = list(map(id, rules))
            by_id = dict(zip(ids, rules))
            _count_elements(counts, zip(ids, methods, codes, tids, keys))
            for (rid, method, code, tid, k), c in counts.items():
                grouped.setdefault((rid, method, code, tid), []).append((k, c))
        self._emit_aggregates([(by_id[rid], method, code, "", tid, buckets)
                               for (rid, method, code, tid), buckets in grouped.items()],
                              n, _get_t1(recs[0]), _get_t1(recs[-1]))

    def _send_lane(self, tid: int, quads: Any, budget: int) -> int:
        """Send one lane's ended requests (start, group, size, duration quads), like
        :meth:`_send_ended`: the budget and the slow or loud groups one by one (a group id
        below zero is a 5xx, never started or an exception), the rest as aggregates."""
        gks = quads[1::4]
        durs = quads[3::4]
        n = len(gks)
        budget = max(budget, 0)
        if n <= budget:
            self._lane_requests(tid, quads, range(n))
            return budget - n
        if budget:
            self._lane_requests(tid, quads, range(budget))
        # The busy common case, in as few passes as can be, none of which makes a Python
        # object per request: one group, none failed. Its slow requests (a GC pause is
        # enough) go one by one, found in C; flasktop buckets the rest from their high bytes.
        rest = gks[budget:]
        g0 = rest[0]
        # "all one group" as one memcmp: array.count() would make a float of every item
        if g0 > 0 and rest.tobytes() == _ONE_D.pack(g0) * (n - budget):
            quiet = durs[budget:]
            high = protocol.high_bytes(quiet)
            mask = _slow_mask(high)
            if mask is not None:
                slow = _positions(mask)
                self._lane_requests(tid, quads, [budget + i for i in slow])
                high = protocol.high_bytes(_without(quiet, slow))
            if high[1]:
                self._aggregate_lane(tid, {g0: high}, len(high[1]),
                                     quads[4 * budget] + quiet[0], quads[-4] + quiet[-1])
            return 0
        t0s = quads[0::4]
        loud = list(map(or_, map(ge, durs, repeat(SLOW_S, n)), map(lt, gks, repeat(0.0, n))))
        loud[:budget] = repeat(False, budget)  # sent above
        picked = list(compress(range(n), loud))
        if picked:
            self._lane_requests(tid, quads, picked)
        quiet = list(map(not_, loud))
        quiet[:budget] = repeat(False, budget)
        qd = list(compress(durs, quiet))
        if qd:
            t1s = list(compress(map(add, t0s, durs), quiet))
            self._aggregate_groups(tid, list(compress(gks, quiet)), qd, t1s[0], t1s[-1])
        return 0

    def _lane_requests(self, tid: int, quads: Any, picked: Any) -> None:
        """Send the requests at ``picked`` of a lane's quads one by one."""
        info = self.group_info
        recs = []
        for i in picked:
            t0, gk, size, dur = quads[4 * i:4 * i + 4]
            code, rule, method, exc = info[int(abs(gk))]
            recs.append([t0, None, code, size, tid, exc, t0 + dur, rule, method])
        self._send_requests(recs)

    def _aggregate_groups(self, tid: int, gks: Any, durs: Any, first_end: float,
                          last_end: float) -> None:
        """Count one lane's quiet requests per group in protocol latency buckets."""
        n = len(durs)
        keys = _bucket_keys(durs)
        grouped: Dict[float, List[Tuple[int, int]]] = {}
        counts: Dict[Any, int] = {}
        g0 = gks[0]
        if gks.count(g0) == n:
            _count_elements(counts, keys)
            grouped[g0] = list(counts.items())
        else:
            _count_elements(counts, zip(gks, keys))
            for (g, k), c in counts.items():
                grouped.setdefault(g, []).append((k, c))
        self._aggregate_lane(tid, grouped, n, first_end, last_end)

    def _aggregate_lane(self, tid: int, grouped: Dict[float, Any], n: int,
                        first_end: float, last_end: float) -> None:
        """Send a lane's (bucket, count) pairs, or its durations' words, per group id."""
        info = self.group_info
        groups = []
        for g, buckets in grouped.items():
            code, rule, method, exc = info[int(abs(g))]
            groups.append((rule, method, code, exc, tid, buckets))
        self._emit_aggregates(groups, n, first_end, last_end)

    def _emit_aggregates(self, groups: List[Tuple[Any, Any, int, str, int, Any]],
                         n: int, first_end: float, last_end: float) -> None:
        """Send an aggregate row per (rule, method, code, exc, tid, buckets) group: ``n``
        requests in all, which ended between ``first_end`` and ``last_end`` (perf_counter
        seconds; records are nearly in end order, so these are the first and the last).
        ``buckets`` is a list of (key, count) pairs (kind "a"), or the durations as
        ``protocol.high_bytes`` makes them (kind "h")."""
        now = time.perf_counter()
        t_ms = int(time.time() * 1000)
        span = int(min((now - min(first_end, last_end)) * 1000.0, _MAX_AGE_MS))
        rows = []
        raw = []
        for rule, method, code, exc, tid, buckets in groups:
            hit = self.rules.get(id(rule))
            if hit is None or hit[0] is not rule:
                hit = self._rule(rule)
            row = [hit[1][0], hit[2][0], _METHODS.get(method, "OTHER"), code, exc,
                   tid if 0 < tid < _MAX_TID else 1, span]
            if type(buckets) is tuple:
                raw.append(row + [buckets])
            else:
                rows.append(row + [sorted(buckets)])
        for data in self.encoder.aggregates(t_ms, rows) + self.encoder.high_bytes(t_ms, raw):
            self._send(data)
        self.reported += n
        self.aggregated += n

    def _send_requests(self, recs: List[list]) -> None:
        """Encode ended requests to the wire format of protocol.Encoder.requests.

        Column-wise, with map/zip/compress doing the per-request work in C: the flusher
        shares the GIL with the app, so its cost per request is the app's cost too.
        """
        n = len(recs)
        now = time.perf_counter()
        t_ms = int(time.time() * 1000)
        t0s, _, statuses, sizes, tids, excs, t1s, rules, methods = zip(*recs)
        # Microseconds and milliseconds stay floats: "%d" truncates them like int() would.
        # Both clocks are one monotonic clock, read in order: neither can be negative.
        durs = list(map(mul, map(sub, t1s, t0s), repeat(1e6, n)))
        if max(durs) > _MAX_DUR_US:
            durs = [min(d, _MAX_DUR_US) for d in durs]
        ages = list(map(mul, map(sub, repeat(now, n), t1s), repeat(1e3, n)))
        if max(ages) > _MAX_AGE_MS:
            ages = [min(a, _MAX_AGE_MS) for a in ages]
        codes = self._codes(statuses)
        try:
            sizes = list(map(int, sizes))  # Content-Length values and byte counts
        except (TypeError, ValueError):  # a None (size unknown) or a malformed header
            sizes = [_size(v) for v in sizes]
        if min(sizes) < -1 or max(sizes) > _MAX_SIZE:
            sizes = [v if -1 <= v <= _MAX_SIZE else -1 for v in sizes]
        if min(tids) < 1 or max(tids) >= _MAX_TID:
            tids = tuple(t if 0 < t < _MAX_TID else 1 for t in tids)
        hits = list(map(self.rules.get, map(id, rules)))
        if None in hits:
            hits = [self._rule(r) if h is None else h for h, r in zip(hits, rules)]
        meths = list(map(_METHODS.get, methods, repeat("OTHER", n)))
        nums = list(zip(codes, durs, sizes, tids, ages))
        # Cached labels are shared objects: count() matches them by identity, cheaply.
        if hits.count(hits[0]) == n and meths.count(meths[0]) == n and excs.count(excs[0]) == n:
            runs = [(0, n)]
        else:  # several routes: sort by route so each run shares its labels
            keys = list(zip(map(id, hits), meths, excs))
            order = sorted(range(n), key=keys.__getitem__)
            pick = itemgetter(*order)
            keys, hits, meths, excs, nums = pick(keys), pick(hits), pick(meths), pick(excs), pick(nums)
            runs = []
            pos = 0
            for _, run in groupby(keys):
                size = len(list(run))
                runs.append((pos, pos + size))
                pos += size
        head_fmt = '{"v":%d,"k":"%s","pid":%d,"seq":%%d,"t":%d,"s":[' % (
            protocol.VERSION, protocol.KIND_REQUESTS, self.encoder.pid, t_ms)
        # Runs are gathered into groups that share one string table, sent whole in each of
        # the group's datagrams; so every event is formatted once, with its final indexes.
        strings: List[str] = []
        index: Dict[str, int] = {}
        table = 0
        events: List[str] = []
        for a, b in runs:
            _, route, endpoint = hits[a]
            x = self._label(excs[a]) if excs[a] else _NO_EXC
            labels = [route, endpoint, self._label(meths[a])] + ([x] if x[1] else [])
            fresh = list({lab[0]: lab for lab in labels if lab[0] not in index}.values())
            added = sum(lab[2] for lab in fresh)
            if events and (table + added > _TABLE_BUDGET
                           or len(strings) + len(fresh) > _MAX_STRINGS):
                self._pack_group(head_fmt, strings, table, events)
                strings, index, table, events = [], {}, 0, []
                fresh = list({lab[0]: lab for lab in labels}.values())
                added = sum(lab[2] for lab in fresh)
            for lab in fresh:
                index[lab[0]] = len(strings)
                strings.append(lab[1])
            table += added
            fmt = "[%d,%d,%d,%%d,%%d,%%d,%s,%%d,%%d]" % (
                index[route[0]], index[endpoint[0]], index[labels[2][0]],
                index[x[0]] if x[1] else -1)
            events += map(fmt.__mod__, nums[a:b])
        if events:
            self._pack_group(head_fmt, strings, table, events)
        self.reported += n

    def _pack_group(self, head_fmt: str, strings: List[str], table: int, events: List[str]) -> None:
        """Send ``events`` in as few datagrams as fit, each with the whole string table."""
        room = protocol.MAX_DATAGRAM - (len(head_fmt) + 20 + _FRAME) - table
        # ends[j] - (ends[i-1] + i): bytes of events i..j with their separating commas
        ends = list(map(add, accumulate(map(len, events)), count()))
        total = len(events)
        pos = 0
        base = 0
        while pos < total:
            j = bisect_right(ends, base + pos + room, pos, min(total, pos + _MAX_EVENTS))
            j = max(j, pos + 1)
            self._pack(head_fmt, strings, events[pos:j])
            base = ends[j - 1] - (j - 1)
            pos = j

    def _pack(self, head_fmt: str, strings: List[str], parts: List[str]) -> None:
        self.encoder.seq += 1
        text = (head_fmt % self.encoder.seq + ",".join(strings) + '],"e":['
                + ",".join(parts) + "]}")
        self._send(text.encode("utf-8", "replace"))

    # -- in-flight report -----------------------------------------------------------

    def _report(self, now: float, t_ms: int) -> None:
        # Only what is still running now: one that ended since this flush began goes out
        # as completed in the next flush, and must not also be reported as in flight.
        snap = [rec for rec in self.flights.values() if not rec[T1]]
        lanes = self._lane_open() if self.lanes else []
        if lanes:
            snap += lanes
        snap.sort(key=itemgetter(T0))  # records and lanes' tuples both start with it
        rows: List[list] = []
        for rec in snap[:REPORT_ROWS]:
            try:
                # a lane's (start, route, endpoint, method, tid) already, or a record
                t0, route, endpoint, method, tid = rec if type(rec) is tuple else _running(rec)
                age = int((now - t0) * 1e6)
                age = 0 if age < 0 else (age if age < _MAX_DUR_US else _MAX_DUR_US)
                rows.append([self._label(route)[0], self._label(endpoint)[0],
                             _METHODS.get(method, "OTHER"), tid if 0 < tid < _MAX_TID else 1, age])
            except Exception:  # noqa: BLE001
                continue
        # "dropped" on the wire: every ended request that never went out, the buffer
        # being full or nobody listening; a flasktop that re-attaches sees the gap.
        for data in self.encoder.inflight(t_ms, rows, max(len(snap), len(rows)),
                                          self.dropped + self.unheard, self.send_errors,
                                          self.gunicorn):
            self._probe(data)

    def _evict(self) -> None:
        """Forget the oldest running entries past the cap (a server that never closes)."""
        flights = self.flights
        recs = sorted(flights.values(), key=itemgetter(T0))
        for rec in recs[:len(recs) - INFLIGHT_CAP]:
            del flights[id(rec)]
            self.dropped += 1

    # -- socket -------------------------------------------------------------------

    def _send(self, data: bytes) -> bool:
        """Send one datagram; False when it was refused (nobody listens) or failed."""
        sock = self.sock
        try:
            if sock is None:
                sock = socket.socket(self.family, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    # Connected, so the kernel reports "nobody listens" (ECONNREFUSED).
                    sock.connect(self.sockaddr)
                except OSError:
                    sock.close()
                    raise
                self.sock = sock
            sock.send(data)
            self.sent += 1
            return True
        except ConnectionRefusedError:
            self.send_errors += 1
            self.listening = False
            self.probed = False
            return False
        except OSError as e:
            self.send_errors += 1
            if e.errno in _RESET_SOCKET or (sock is not None and sock.fileno() < 0):
                self.sock = None  # closed under us: open a fresh one next time
            return False

    def _probe(self, data: bytes) -> None:
        """Send the in-flight report; while nobody listens it is also the probe.

        A refusal reports on an earlier datagram, so a probe that was sent and not
        refused one report later means someone is listening again."""
        if self.listening:
            self._send(data)
            return
        if self._send(data):
            if self.probed:
                self.listening = True
            self.probed = True
        else:
            self.probed = self._send(data)  # the refusal was for the last probe: resend

    def stats(self) -> Dict[str, int]:
        """Counters: datagrams sent, requests reported / never sent (nobody listened) /
        held (nobody listening yet) / dropped (queue full), send errors, queue sizes."""
        lanes = list(self.lanes)
        return {"sent": self.sent, "reported": self.reported, "aggregated": self.aggregated,
                "unheard": self.unheard,
                "held": len(self.held) + self.held_lane_count,
                "listening": int(self.listening), "dropped": self.dropped,
                "send_errors": self.send_errors,
                "queued": len(self.started) + sum(len(lane.buf) // QUAD.size for lane in lanes),
                "inflight": len(self.flights) + len(self._lane_open()),
                "lanes": len(lanes), "pid": self.encoder.pid}

    def close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


def _live_route(environ: Any) -> Tuple[str, str]:
    """Route and endpoint of a request still running: PENDING until Flask matched it."""
    route = environ.get("flasktop.route")
    if route is not None:
        return route, environ.get("flasktop.endpoint") or ""
    req = environ.get("werkzeug.request")
    rule = getattr(req, "url_rule", None)
    if rule is not None:
        return rule.rule, rule.endpoint or ""
    if getattr(req, "routing_exception", None) is not None:
        return protocol.UNMATCHED, ""
    return protocol.PENDING, ""


def _running(rec: list) -> Tuple[float, str, str, Any, int]:
    """(start, route, endpoint, method, tid) of a running record."""
    environ = rec[ENVIRON]
    route, endpoint = _live_route(environ)
    if rec[RULE] is None:
        # Keep the matched rule: a request that dies by an exception Flask does not catch
        # (gunicorn's timeout SIGABRT raises SystemExit) never reaches start_response, and
        # Flask forgets the request before we see it end.
        rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
        if rule is not None:
            rec[RULE] = rule
    return rec[T0], route, endpoint, rec[METHOD], rec[TID]


def _log_keys(durs: Any) -> Any:
    """An iterator of protocol.bucket_of over durations all above AGG_MIN_S, in C per item
    (ValueError, when iterated, for a zero)."""
    return map(ceil, map(mul, map(log2, durs), repeat(_INV_LOG2_GAMMA, len(durs))))


def _bucket_keys(durs: List[float]) -> List[int]:
    """protocol.bucket_of of each duration (seconds), done in C in the common case."""
    if min(durs) > protocol.AGG_MIN_S:
        return list(_log_keys(durs))
    return list(map(protocol.bucket_of, durs))  # rare: one at or below AGG_MIN_S (zero bucket)


def _slow_mask(high: Tuple[bytes, bytes, bytes]) -> Optional[bytes]:
    """0xFF for each duration of ``protocol.high_bytes`` at or over SLOW_S (or below zero),
    0 for the others; None when none is. Read from their top bytes and bytes 6, in C."""
    top, b6, _ = high
    if len(top) == 1:  # one top byte for all
        if top[0] != _SLOW_TOP:
            return None if top[0] < _SLOW_TOP else b"\xff" * len(b6)
        mask = b6.translate(_IS_SLOW_B6)
    else:
        above = int.from_bytes(top.translate(_IS_ABOVE_SLOW_TOP), "little")
        at = int.from_bytes(top.translate(_IS_SLOW_TOP), "little")
        mask = (above | at & int.from_bytes(b6.translate(_IS_SLOW_B6), "little")).to_bytes(
            len(b6), "little")
    return mask if 0xFF in mask else None


def _positions(mask: bytes) -> List[int]:
    """Where ``mask`` holds 0xFF: a C search for each (they are few)."""
    out = []
    i = mask.find(0xFF)
    while i >= 0:
        out.append(i)
        i = mask.find(0xFF, i + 1)
    return out


def _without(durs: Any, drop: List[int]) -> Any:
    """The ``array('d')`` ``durs`` but the items at ``drop`` (ascending): a slice each."""
    out = array("d")
    for a, b in zip([0] + [i + 1 for i in drop], drop + [len(durs)]):
        out += durs[a:b]
    return out


def _size(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _status(status: Any) -> int:
    if type(status) is int:  # the fast path's groups hold the code itself
        return status if 0 <= status <= 999 else 0
    try:
        code = int(status[:3])
    except Exception:  # noqa: BLE001 - None (never started) or garbage
        return 0
    return code if 0 <= code <= 999 else 0


_reporters: Dict[Tuple[Any, ...], Reporter] = {}
_registry_lock = threading.Lock()


def reporter_for(address: str) -> Optional[Reporter]:
    """The process's reporter for ``address``; None when it is off or unusable."""
    target = resolve(address)
    if target is None:
        return None
    key = (target[0],) + tuple(target[1])
    with _registry_lock:
        rep = _reporters.get(key)
        if rep is None:
            rep = _reporters[key] = Reporter(target)
        if rep.gunicorn is None:
            cfg, in_worker = _gunicorn_on_stack()
            if cfg is not None:
                rep.gunicorn = gunicorn_settings(cfg)
                if in_worker:  # the heartbeat from boot, not from the first request
                    rep.start()
        return rep


def _gunicorn_on_stack() -> Tuple[Any, bool]:
    """gunicorn's config object, found on the calling stack, and whether this is a worker.

    The beacon is made while gunicorn loads the app: in a worker (``Worker.load_wsgi``) or,
    with ``--preload``, in the master (``Arbiter.setup``, where no thread of ours may start:
    it would not survive the fork). Those frames' ``self`` holds ``cfg``. (None, False)
    outside gunicorn. Never raises."""
    found: Any = None
    try:
        frame: Any = sys._getframe(1)
        while frame is not None:
            if str(frame.f_globals.get("__name__", "")).startswith("gunicorn."):
                own = frame.f_locals.get("self")
                cfg = getattr(own, "cfg", None) if own is not None else None
                if type(cfg).__module__ == "gunicorn.config":
                    if type(own).__module__.startswith("gunicorn.workers."):
                        return cfg, True  # a worker's frame: below it, the app being loaded
                    found = found or cfg  # the application's or the arbiter's: look on
            frame = frame.f_back
    except Exception:  # noqa: BLE001
        pass
    return found, False


def gunicorn_settings(cfg: Any) -> Optional[tuple]:
    """gunicorn's settings (``protocol.gunicorn_fields``) from its config object, or None.
    Never raises.

    flasktop reads the same settings from the master's command line, its environment and
    its config file, but cannot where setproctitle has overwritten the first two (it does
    whenever it is installed) or where the file computes them; this is what gunicorn runs."""
    try:
        return protocol.gunicorn_fields(cfg.timeout, cfg.workers, cfg.threads,
                                        cfg.max_requests, cfg.worker_class_str)
    except Exception:  # noqa: BLE001 - not gunicorn's config after all: nothing to send
        return None


def find_record(environ: Any) -> Optional[list]:
    """The running record of ``environ`` in any reporter (exception path only)."""
    for rep in list(_reporters.values()):
        rec = rep.find(environ)
        if rec is not None:
            return rec
    return None


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for rep in list(_reporters.values()):
        try:
            rep.close_socket()
            rep._reset()
            rep.fork_lanes()
        except Exception:  # noqa: BLE001
            pass


def _at_exit() -> None:
    pid = os.getpid()
    for rep in list(_reporters.values()):
        try:
            if rep.encoder.pid == pid and (rep.started or rep.flights
                                           or any(len(lane.buf) >= QUAD.size for lane in rep.lanes)):
                rep.flush(timeout=0.2)
        except Exception:  # noqa: BLE001
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)
