"""The beacon wire format, version 1: encode in the app, decode in flasktop.

Standard library only: this module is imported inside the user's production app.
Every field, unit and limit is documented in docs/protocol.md; keep the two in step.

A datagram is one compact JSON object, UTF-8, at most MAX_DATAGRAM bytes::

    {"v":1,"k":"r","pid":4242,"seq":17,"t":1732190000123,
     "s":["/orders/<int:oid>","orders","GET","ValueError"],
     "e":[[0,1,2,500,41234,-1,3,4250,12], ...]}

``k`` is the kind: ``r`` carries completed requests one by one, ``a`` completed
requests aggregated per (route, status, thread) into latency histograms (one row
per flush instead of one event per request; slow, failed and sampled requests
still travel as ``r``, and each request is reported exactly once, in one kind or
the other), ``d`` the same rows with the durations themselves instead of their
histogram (32 bits each, base64: a busy flush leaves the bucketing to flasktop,
and :func:`decode` makes them ``a`` rows), ``h`` likewise with their high three
bytes in two or three (what a busy flush sends now: half the datagrams), ``f`` the
set of requests in flight (sent periodically, so a flasktop that attaches late still
learns of a request that began before it).
Strings travel once per datagram in the table ``s`` and events refer to them by
index, so a batch of requests to one route costs the route's bytes once.

Decoding trusts nothing. :func:`decode` never raises: it returns a
:class:`Datagram` or a :class:`Reject` with a short machine-readable reason.
"""

from __future__ import annotations

import binascii
import json
import math
import re
import sys
from array import array
from collections import Counter
from itertools import repeat
from operator import mul
from typing import Any, Callable, NamedTuple, Optional, Union

VERSION = 1
MAX_DATAGRAM = 1400
MAX_LABEL = 200  # characters
LABEL_BUDGET = 256  # bytes of one label in its JSON form
TRUNCATION_MARK = "\u2026"
UNMATCHED = "<unmatched>"
PENDING = "<pending>"

KIND_REQUESTS = "r"
KIND_INFLIGHT = "f"
KIND_AGGREGATES = "a"
KIND_DURATIONS = "d"
KIND_HIGH_BYTES = "h"
_ALL_TOPS = b"\xff"  # kind "h": a top byte per duration follows (0xFF is no duration's: NaN)

# The latency buckets of kind "a", shared by the beacon and the model: DDSketch buckets of
# relative accuracy 1 %, the same as flasktop/model/sketch.py's Sketch(0.01, min_value=1e-6),
# so a bucket key from the beacon is the model sketch's key (but for the zero bucket).
AGG_ACCURACY = 0.01
AGG_GAMMA = (1 + AGG_ACCURACY) / (1 - AGG_ACCURACY)
AGG_INV_LOG_GAMMA = 1 / math.log(AGG_GAMMA)
AGG_MIN_S = 1e-6  # durations at or below this share the zero bucket
AGG_ZERO = -1000  # the key of the zero bucket
AGG_MAX_KEY = 1000  # every other key k: -AGG_MAX_KEY < k <= AGG_MAX_KEY (1 us is -690, a week 666)
_AGG_TOP = AGG_GAMMA ** AGG_MAX_KEY  # durations from here on land in AGG_MAX_KEY

# Bounds every number is checked against. Anything outside is rejected, never clamped.
_MAX_PID = 1 << 22  # Linux pid_max ceiling
_MAX_TID = 1 << 32
_MAX_SEQ = 1 << 53
_MIN_T_MS = 946_684_800_000  # 2000-01-01
_MAX_T_MS = 7_258_118_400_000  # 2200-01-01
_MAX_DUR_US = 7 * 24 * 3600 * 1_000_000  # a week
_MAX_AGE_MS = 24 * 3600 * 1000  # how long before the header time an event may have ended
_MAX_SIZE = 1 << 53
_MAX_STRINGS = 256
_MAX_EVENTS = 256
_MAX_COUNTER = 1 << 53
_MAX_AGG_COUNT = 1 << 31  # requests in one bucket of one row
_MAX_AGG_BUCKETS = 2048  # buckets in one row

# Control characters and lone surrogates: no conforming encoder sends them (clip() replaces
# them, whatever the Unicode version), and a terminal must never receive them.
_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Bytes a clipped label may keep before its truncation mark: the budget less the
# two quotes of its JSON form and the three bytes of the mark.
_CLIP_BYTES = LABEL_BUDGET - 2 - len(TRUNCATION_MARK.encode("utf-8"))

_REQUEST_FIELDS = 9
_INFLIGHT_FIELDS = 5
_AGGREGATE_FIELDS = 8


def bucket_of(d: float) -> int:
    """The bucket key of a duration of ``d`` seconds (AGG_ZERO for d <= AGG_MIN_S)."""
    if not d > AGG_MIN_S:  # also NaN
        return AGG_ZERO
    if d >= _AGG_TOP:
        return AGG_MAX_KEY
    return min(math.ceil(math.log(d) * AGG_INV_LOG_GAMMA), AGG_MAX_KEY)


def bucket_value(k: int) -> float:
    """The representative duration (seconds) of bucket ``k``: within AGG_ACCURACY of every
    duration the bucket holds; 0.0 for the zero bucket."""
    if k == AGG_ZERO:
        return 0.0
    return 2 * AGG_GAMMA ** k / (AGG_GAMMA + 1)


class Request(NamedTuple):
    """One completed request. Times are wall-clock seconds since the epoch."""

    route: str
    endpoint: str
    method: str
    status: int  # 0 when the app never called start_response
    duration_s: float
    size: int  # response bytes, -1 when unknown
    exc: str  # exception type name, "" when none
    tid: int  # native thread id, as py-spy's os_thread_id
    end: float


class InFlight(NamedTuple):
    """One request still running when the beacon reported."""

    route: str  # PENDING until Flask has matched the URL
    endpoint: str
    method: str
    tid: int
    start: float  # wall-clock seconds since the epoch


class Aggregate(NamedTuple):
    """Completed requests of one (route, status, exception, thread), counted per latency
    bucket. Times are wall-clock seconds since the epoch: every request counted ended
    within [start, end]."""

    route: str
    endpoint: str
    method: str
    status: int
    exc: str  # exception type name, "" when none
    tid: int
    start: float
    end: float
    buckets: tuple  # tuple[tuple[int, int], ...]: (bucket key, requests), see bucket_of()

    @property
    def count(self) -> int:
        return sum(n for _, n in self.buckets)


class GunicornSettings(NamedTuple):
    """What gunicorn runs the sending worker with, as its own config object says (kind "f",
    key "g"): the truth where the master's command line and environment cannot be read."""

    timeout: float  # seconds; 0 is gunicorn's "no timeout"
    workers: int
    threads: int
    max_requests: int  # 0: never recycled
    worker_class: str  # "sync", "gthread", "gevent", or a dotted path


class Datagram(NamedTuple):
    kind: str
    pid: int
    seq: int
    t: float  # wall-clock seconds at which the beacon sent it
    requests: tuple  # tuple[Request, ...] for kind "r"
    inflight: tuple  # tuple[InFlight, ...] for kind "f"
    inflight_total: int  # kind "f": how many were in flight (may exceed len(inflight))
    dropped: int  # kind "f": events the beacon dropped since it started (buffer full)
    send_errors: int  # kind "f": sendto() failures since it started
    aggregates: tuple = ()  # tuple[Aggregate, ...] for kinds "a" and "d"
    gunicorn: Optional[GunicornSettings] = None  # kind "f", from a beacon inside gunicorn


class Reject(NamedTuple):
    reason: str


Decoded = Union[Datagram, Reject]


def clip(label: str) -> str:
    """Make ``label`` safe to send: at most MAX_LABEL characters and LABEL_BUDGET
    bytes once JSON-encoded, control characters replaced by U+FFFD, and a
    visible marker where it was cut. Route templates take the fast path."""
    if len(label) <= 120 and label.isascii() and label.isprintable():
        return label
    out = []
    used = 0
    for ch in label:
        if not ch.isprintable():
            ch = "\ufffd"
        cost = 2 if ch in '"\\' else len(ch.encode("utf-8", "replace"))
        if len(out) >= MAX_LABEL - 1 or used + cost > _CLIP_BYTES:
            out.append(TRUNCATION_MARK)
            break
        out.append(ch)
        used += cost
    return "".join(out)


# ---------------------------------------------------------------------------
# Encoding (the beacon side)


def _label_cost(s: str) -> int:
    """Bytes a label adds to the string table: its JSON form and a comma."""
    return len(json.dumps(s, ensure_ascii=False).encode("utf-8", "replace")) + 1


class Encoder:
    """Packs events into datagrams of at most MAX_DATAGRAM bytes.

    One per process; ``seq`` counts datagrams so the receiver can count losses.
    Not thread-safe: the beacon's flusher thread is its only user.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seq = 0

    def _pack(self, kind: str, t_ms: int, strings: list, events: list, extra: str) -> bytes:
        self.seq += 1
        body = json.dumps(strings, ensure_ascii=False, separators=(",", ":"))
        evs = json.dumps(events, separators=(",", ":"))
        head = '{"v":%d,"k":"%s","pid":%d,"seq":%d,"t":%d%s,"s":' % (
            VERSION, kind, self.pid, self.seq, t_ms, extra)
        return (head + body + ',"e":' + evs + "}").encode("utf-8", "replace")

    def _batches(self, kind: str, t_ms: int, rows: list, extra: str = "") -> list:
        """Split ``rows`` into datagrams that each fit MAX_DATAGRAM."""
        out: list = []
        strings: list = []
        index: dict = {}
        events: list = []
        base = 90 + len(extra)  # header, with room for the widest numbers it can hold
        size = base
        requests = kind == KIND_REQUESTS
        for row in rows:
            labels = [row[0], row[1], row[2]]
            if requests and row[6]:
                labels.append(row[6])
            fresh = [s for s in labels if s not in index]
            nums = [row[3], row[4], row[5], row[7], row[8]] if requests else list(row[3:])
            # compact JSON of the event: the ints, a comma each, the brackets; indexes < 1000
            cost = len(repr(nums)) - len(nums) + 2 + 4 * (len(labels) + (not requests or not row[6]))
            cost += sum(_label_cost(s) for s in fresh)
            if events and (size + cost > MAX_DATAGRAM or len(events) >= _MAX_EVENTS
                           or len(strings) + len(fresh) > _MAX_STRINGS):
                out.append(self._pack(kind, t_ms, strings, events, extra))
                strings, index, events, size = [], {}, [], base
                fresh = labels
                cost += sum(_label_cost(s) for s in labels)
            for s in fresh:
                if s not in index:
                    index[s] = len(strings)
                    strings.append(s)
            ev = [index[row[0]], index[row[1]], index[row[2]]]
            if requests:
                ev.extend((row[3], row[4], row[5], index[row[6]] if row[6] else -1, row[7], row[8]))
            else:
                ev.extend(row[3:])
            events.append(ev)
            size += cost
        if events or kind == KIND_INFLIGHT:
            out.append(self._pack(kind, t_ms, strings, events, extra))
        return out

    def requests(self, t_ms: int, rows: list) -> list:
        """Encode completed requests.

        Each row: ``[route, endpoint, method, status, dur_us, size, exc, tid, age_ms]``
        with ``age_ms`` how long before ``t_ms`` the request ended. Labels must
        already be clipped. Returns a list of datagrams (bytes).
        """
        return self._batches(KIND_REQUESTS, t_ms, rows)

    def inflight(self, t_ms: int, rows: list, total: int, dropped: int, send_errors: int,
                 gunicorn: Optional[tuple] = None) -> list:
        """Encode the set of requests in flight.

        Each row: ``[route, endpoint, method, tid, age_us]``. Always one datagram
        (an empty set is news too: nothing is running); rows past what fits are
        left out and ``total`` says how many there were. ``gunicorn``: the worker's
        settings as :func:`gunicorn_fields` makes them, or None.
        """
        extra = ',"n":%d,"x":[%d,%d]' % (total, dropped, send_errors)
        if gunicorn is not None:
            extra += ',"g":[%d,%d,%d,%d,"%s"]' % gunicorn
        datagrams = self._batches(KIND_INFLIGHT, t_ms, rows, extra)
        if len(datagrams) > 1:
            # Keep the first (the report is a sample); give back the unused sequence numbers.
            self.seq -= len(datagrams) - 1
            datagrams = datagrams[:1]
        return datagrams

    def aggregates(self, t_ms: int, rows: list) -> list:
        """Encode requests aggregated into latency histograms.

        Each row: ``[route, endpoint, method, status, exc, tid, span_ms, buckets]``:
        labels already clipped, ``exc`` "" for none, ``span_ms`` how long before ``t_ms``
        the first request counted may have ended, ``buckets`` a list of ``(k, n)``:
        ``n`` requests in bucket ``k`` (see :func:`bucket_of`). A row whose buckets do
        not fit one datagram is split into rows of the same fields with disjoint
        buckets; a row without buckets is left out. Returns a list of datagrams (bytes),
        each taking the next sequence number.
        """
        out: list = []
        strings: list = []
        index: dict = {}
        events: list = []
        base = 90  # header, with room for the widest numbers it can hold
        size = base
        for row in rows:
            route, ep, method, status, exc, tid, span, buckets = row
            if not buckets:
                continue
            labels = [route, ep, method]
            if exc:
                labels.append(exc)
            # "[" four indexes of at most 3 characters and their commas, the numbers and
            # their commas, "[]" of the buckets, "]" and the comma after the row
            fixed = 1 + 4 * 4 + len(str(status)) + len(str(tid)) + len(str(span)) + 3 + 4
            i = 0
            while i < len(buckets):
                fresh = [s for s in dict.fromkeys(labels) if s not in index]
                need = fixed + sum(_label_cost(s) for s in fresh)
                k, n = buckets[i]
                first = len(str(k)) + len(str(n)) + 4  # "[k,n],"
                if events and (size + need + first > MAX_DATAGRAM or len(events) >= _MAX_EVENTS
                               or len(strings) + len(fresh) > _MAX_STRINGS):
                    out.append(self._pack(KIND_AGGREGATES, t_ms, strings, events, ""))
                    strings, index, events, size = [], {}, [], base
                    continue
                for s in fresh:
                    index[s] = len(strings)
                    strings.append(s)
                size += need
                rest = buckets[i:] if i else buckets
                # The common case in one C call: the rest of the row fits. Its compact JSON
                # is one character longer than the sum of the per-bucket costs below.
                whole = (len(json.dumps(rest, separators=(",", ":"))) - 1
                         if len(rest) <= _MAX_AGG_BUCKETS else MAX_DATAGRAM)
                if size + whole <= MAX_DATAGRAM:
                    part = rest
                    size += whole
                    i = len(buckets)
                else:
                    part = []
                while i < len(buckets) and len(part) < _MAX_AGG_BUCKETS:
                    k, n = buckets[i]
                    cost = len(str(k)) + len(str(n)) + 4
                    if part and size + cost > MAX_DATAGRAM:
                        break
                    part.append([k, n])
                    size += cost
                    i += 1
                events.append([index[route], index[ep], index[method], status,
                               index[exc] if exc else -1, tid, span, part])
                if i < len(buckets):  # the rest of this row goes in the next datagram
                    out.append(self._pack(KIND_AGGREGATES, t_ms, strings, events, ""))
                    strings, index, events, size = [], {}, [], base
        if events:
            out.append(self._pack(KIND_AGGREGATES, t_ms, strings, events, ""))
        return out

    def durations(self, t_ms: int, rows: list) -> list:
        """Encode requests as their durations, for flasktop to count in latency buckets.

        Each row: ``[route, endpoint, method, status, exc, tid, span_ms, words]``, as for
        :meth:`aggregates` but ``words`` is the durations as :func:`duration_words` makes
        them. Each datagram holds one event with as many of a row's durations as fit; a
        row without any is left out. Returns a list of datagrams (bytes), each taking the
        next sequence number.

        What beacons before kind "h" sent for a busy flush (:meth:`high_bytes` takes half
        the datagrams); flasktop still decodes it."""
        def words(raw: bytes, room: int) -> list:
            per = room // 12 * 12  # whole words, no base64 padding
            return [raw[i:i + per] for i in range(0, len(raw) - len(raw) % 4, per)]
        return self._durations(KIND_DURATIONS, t_ms, rows, words)

    def high_bytes(self, t_ms: int, rows: list) -> list:
        """Encode requests as the high bytes of their durations (kind "h"): as
        :meth:`durations`, but each row's last item is :func:`high_bytes` of them: two or
        three bytes a duration instead of four, so fewer datagrams (each costs the app a
        system call, and with a busy request thread a handover of the GIL)."""
        def planes(high: tuple, room: int) -> list:
            top, b6, b5 = high
            if len(top) == 1:  # one top byte for all: it, then two planes
                per = (room - 1) // 2
                return [top + b6[i:i + per] + b5[i:i + per] for i in range(0, len(b6), per)]
            per = (room - 1) // 3  # a top byte each: 0xFF (no duration's), then three planes
            return [_ALL_TOPS + top[i:i + per] + b6[i:i + per] + b5[i:i + per]
                    for i in range(0, len(b6), per)]
        return self._durations(KIND_HIGH_BYTES, t_ms, rows, planes)

    def _durations(self, kind: str, t_ms: int, rows: list,
                   payloads: Callable[[Any, int], list]) -> list:
        """One event a datagram for each of ``payloads(durations, room)``: the raw bytes
        each datagram carries of a row's durations, ``room`` at most."""
        out: list = []
        for route, ep, method, status, exc, tid, span, durations in rows:
            strings = [route, ep, method, exc] if exc else [route, ep, method]
            table = json.dumps(strings, ensure_ascii=False, separators=(",", ":"))
            event = '[0,1,2,%d,%d,%d,%d,"' % (status, 3 if exc else -1, tid, span)
            fixed = (len(table.encode("utf-8", "replace")) + len(event) + 110)  # header, tail
            for raw in payloads(durations, (MAX_DATAGRAM - fixed) // 4 * 3):
                self.seq += 1
                b64 = binascii.b2a_base64(raw, newline=False).decode("ascii")
                out.append(('{"v":%d,"k":"%s","pid":%d,"seq":%d,"t":%d,"s":%s,"e":[%s%s"]]}' % (
                    VERSION, kind, self.pid, self.seq, t_ms, table, event, b64)
                ).encode("utf-8", "replace"))
        return out


def duration_words(durations: "array[float]") -> bytes:
    """Kind "d"'s durations: the high 32 bits of each one's IEEE 754 binary64 (sign,
    exponent and the top 20 bits of the fraction), little-endian. A strided copy in C: no
    Python object per duration (a float32 conversion would make one, five times slower)."""
    if sys.byteorder == "big":
        durations = array("d", durations)
        durations.byteswap()
    return memoryview(durations).cast("B").cast("I")[1::2].tobytes()


def high_bytes(durations: "array[float]") -> tuple:
    """Kind "h"'s durations: ``(top, b6, b5)``, three ``bytes`` of the durations' little-endian
    IEEE 754 binary64s: byte 7 of each (sign and the high 7 bits of the exponent), or just
    one byte when they all share it (all do from 30.5 us to 2 s: 0x3F); byte 6 of each
    (the low 4 bits of the exponent, the top 4 of the fraction); and byte 5 (the next 8).
    Strided copies in C: no Python object per duration."""
    if sys.byteorder == "big":
        durations = array("d", durations)
        durations.byteswap()
    raw = memoryview(durations).cast("B")
    top = raw[7::8].tobytes()
    if top and top.count(top[:1]) == len(top):
        top = top[:1]
    return top, raw[6::8].tobytes(), raw[5::8].tobytes()


# ---------------------------------------------------------------------------
# Decoding (the flasktop side)


def _reject_constant(name: str) -> None:
    raise ValueError("non-finite")


def _reject_float(text: str) -> None:
    raise ValueError("float")


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_reject_float)


def _int(v: object, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi  # type: ignore[operator]


_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
_MAX_DUR_S = _MAX_DUR_US / 1e6


def _bucket_pairs(buckets: object) -> Optional[tuple]:
    """Kind "a"'s buckets as (bucket key, requests) pairs, or None unless a list of 1 to
    _MAX_AGG_BUCKETS ``[k, n]`` pairs of integers within their limits."""
    if type(buckets) is not list or not 0 < len(buckets) <= _MAX_AGG_BUCKETS:
        return None
    pairs = []
    for b in buckets:
        if type(b) is not list or len(b) != 2:
            return None
        k, n = b
        if not (type(k) is int and (-AGG_MAX_KEY < k <= AGG_MAX_KEY or k == AGG_ZERO)
                and _int(n, 1, _MAX_AGG_COUNT)):
            return None
        pairs.append((k, n))
    return tuple(pairs)


def _duration_buckets(raw: object) -> Optional[tuple]:
    """Kind "d"'s durations (base64 of :func:`duration_words`) as sorted (bucket key,
    requests) pairs, or None unless every one is a finite duration of at most a week."""
    data = _base64(raw)
    if data is None or len(data) % 4:
        return None
    full = bytearray(2 * len(data))  # little-endian binary64s, their low halves zero
    memoryview(full).cast("I")[1::2] = memoryview(data).cast("I")
    return _counted(full)


def _high_byte_buckets(raw: object) -> Optional[tuple]:
    """Kind "h"'s durations (base64 of one top byte for all, or 0xFF and one each, then
    the durations' bytes 6, then their bytes 5: see :func:`high_bytes`) as sorted (bucket
    key, requests) pairs, or None unless every one is a finite duration of at most a week."""
    data = _base64(raw)
    if data is None:
        return None
    planes = 3 if data[:1] == _ALL_TOPS else 2
    n, odd = divmod(len(data) - 1, planes)
    if n < 1 or odd:
        return None
    full = bytearray(8 * n)  # little-endian binary64s, their bytes 0 to 4 zero
    full[7::8] = data[1:n + 1] if planes == 3 else data[:1] * n
    full[6::8] = data[len(data) - 2 * n:len(data) - n]
    full[5::8] = data[len(data) - n:]
    return _counted(full)


def _base64(raw: object) -> Optional[bytes]:
    """The bytes of ``raw``, a non-empty string of standard base64, else None."""
    if type(raw) is not str or not raw or not _B64.match(raw):
        return None
    return binascii.a2b_base64(raw)


def _counted(full: bytearray) -> Optional[tuple]:
    """Little-endian binary64 durations as sorted (bucket key, requests) pairs, or None
    unless every one is finite and from 0 to a week."""
    durs = array("d")
    durs.frombytes(full)
    if sys.byteorder == "big":
        durs.byteswap()
    if not all(map(math.isfinite, durs)) or not 0.0 <= min(durs) <= max(durs) <= _MAX_DUR_S:
        return None
    if min(durs) > AGG_MIN_S:  # bucket_of, in C per item
        keys = map(math.ceil, map(mul, map(math.log, durs), repeat(AGG_INV_LOG_GAMMA)))
    else:
        keys = map(bucket_of, durs)
    return tuple(sorted(Counter(keys).items()))


# The last item of an aggregate row, by kind: what reads it into (bucket key, requests) pairs
_BUCKET_READERS = {KIND_AGGREGATES: _bucket_pairs, KIND_DURATIONS: _duration_buckets,
                   KIND_HIGH_BYTES: _high_byte_buckets}


_MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # a week
_MAX_WORKERS = 1 << 20  # workers, or threads per worker
_WORKER_CLASS = re.compile(r"[A-Za-z0-9_.:#-]{1,64}\Z")


def gunicorn_fields(timeout: Any, workers: Any, threads: Any, max_requests: Any,
                    worker_class: Any) -> Optional[tuple]:
    """gunicorn's settings as key ``g`` carries them (``timeout`` in seconds), or None when
    any is out of the limits docs/protocol.md gives. gunicorn runs a "sync" worker class
    with more than one thread as "gthread", and so does this."""
    try:
        fields = (round(float(timeout) * 1000), int(workers), int(threads), int(max_requests),
                  "gthread" if worker_class == "sync" and int(threads) > 1 else str(worker_class))
    except (TypeError, ValueError, OverflowError):
        return None
    return fields if _gunicorn_settings(list(fields)) is not None else None


def _gunicorn_settings(g: Any) -> Optional[GunicornSettings]:
    if type(g) is not list or len(g) != 5:
        return None
    timeout_ms, workers, threads, max_requests, worker_class = g
    if not (_int(timeout_ms, 0, _MAX_TIMEOUT_MS) and _int(workers, 1, _MAX_WORKERS)
            and _int(threads, 1, _MAX_WORKERS) and _int(max_requests, 0, _MAX_COUNTER)
            and type(worker_class) is str and _WORKER_CLASS.match(worker_class)):
        return None
    return GunicornSettings(timeout_ms / 1000.0, workers, threads, max_requests, worker_class)


def decode(data: bytes) -> Decoded:
    """Decode one datagram. Never raises; garbage is a :class:`Reject`."""
    try:
        return _decode(data)
    except RecursionError:
        return Reject("too_deep")
    except Exception:  # noqa: BLE001 - any failure on untrusted input is a reject
        return Reject("malformed")


def _decode(data: bytes) -> Decoded:
    if len(data) > MAX_DATAGRAM:
        return Reject("oversized")
    if not data or data[:1] != b"{":
        return Reject("not_json")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Reject("bad_utf8")
    try:
        obj = _decoder.decode(text)
    except ValueError as e:
        return Reject("bad_number" if str(e) in ("float", "non-finite") else "not_json")
    if type(obj) is not dict:
        return Reject("not_object")
    if obj.get("v") != VERSION or type(obj.get("v")) is not int:
        return Reject("bad_version")
    kind = obj.get("k")
    pid = obj.get("pid")
    seq = obj.get("seq")
    t_ms = obj.get("t")
    strings = obj.get("s")
    events = obj.get("e")
    if not _int(pid, 1, _MAX_PID):
        return Reject("bad_pid")
    if not _int(seq, 0, _MAX_SEQ):
        return Reject("bad_seq")
    if not _int(t_ms, _MIN_T_MS, _MAX_T_MS):
        return Reject("bad_time")
    if type(strings) is not list or len(strings) > _MAX_STRINGS:
        return Reject("bad_strings")
    for s in strings:
        if type(s) is not str or len(s) > MAX_LABEL:
            return Reject("bad_strings")
        if not s.isprintable() and _FORBIDDEN.search(s):
            return Reject("bad_strings")
    if type(events) is not list or len(events) > _MAX_EVENTS:
        return Reject("bad_events")
    n_strings = len(strings)
    t = t_ms / 1000.0
    if kind == KIND_REQUESTS:
        out = []
        for ev in events:
            if type(ev) is not list or len(ev) != _REQUEST_FIELDS:
                return Reject("bad_event")
            r, ep, m, status, dur, size, exc, tid, age = ev
            if not (_int(r, 0, n_strings - 1) and _int(ep, 0, n_strings - 1)
                    and _int(m, 0, n_strings - 1) and _int(exc, -1, n_strings - 1)):
                return Reject("bad_index")
            if not (_int(status, 0, 999) and _int(dur, 0, _MAX_DUR_US)
                    and _int(size, -1, _MAX_SIZE) and _int(tid, 1, _MAX_TID)
                    and _int(age, 0, _MAX_AGE_MS)):
                return Reject("bad_field")
            end = t - age / 1000.0
            out.append(Request(strings[r], strings[ep], strings[m], status, dur / 1e6, size,
                               strings[exc] if exc >= 0 else "", tid, end))
        return Datagram(kind, pid, seq, t, tuple(out), (), 0, 0, 0)
    if kind == KIND_INFLIGHT:
        total = obj.get("n")
        x = obj.get("x")
        if not _int(total, 0, _MAX_COUNTER):
            return Reject("bad_field")
        if type(x) is not list or len(x) != 2 or not all(_int(c, 0, _MAX_COUNTER) for c in x):
            return Reject("bad_field")
        flights = []
        for ev in events:
            if type(ev) is not list or len(ev) != _INFLIGHT_FIELDS:
                return Reject("bad_event")
            r, ep, m, tid, age = ev
            if not (_int(r, 0, n_strings - 1) and _int(ep, 0, n_strings - 1)
                    and _int(m, 0, n_strings - 1)):
                return Reject("bad_index")
            if not (_int(tid, 1, _MAX_TID) and _int(age, 0, _MAX_DUR_US)):
                return Reject("bad_field")
            flights.append(InFlight(strings[r], strings[ep], strings[m], tid, t - age / 1e6))
        if total < len(flights):
            return Reject("bad_field")
        settings = None
        if "g" in obj:
            settings = _gunicorn_settings(obj["g"])
            if settings is None:
                return Reject("bad_field")
        return Datagram(kind, pid, seq, t, (), tuple(flights), total, x[0], x[1], (), settings)
    read_buckets = _BUCKET_READERS.get(kind)
    if read_buckets is not None:
        aggs = []
        for ev in events:
            if type(ev) is not list or len(ev) != _AGGREGATE_FIELDS:
                return Reject("bad_event")
            r, ep, m, status, exc, tid, span, buckets = ev
            if not (_int(r, 0, n_strings - 1) and _int(ep, 0, n_strings - 1)
                    and _int(m, 0, n_strings - 1) and _int(exc, -1, n_strings - 1)):
                return Reject("bad_index")
            if not (_int(status, 0, 999) and _int(tid, 1, _MAX_TID) and _int(span, 0, _MAX_AGE_MS)):
                return Reject("bad_field")
            pairs = read_buckets(buckets)
            if pairs is None:
                return Reject("bad_field")
            aggs.append(Aggregate(strings[r], strings[ep], strings[m], status,
                                  strings[exc] if exc >= 0 else "", tid, t - span / 1000.0, t,
                                  pairs))
        return Datagram(kind, pid, seq, t, (), (), 0, 0, 0, tuple(aggs))
    return Reject("bad_kind")

