"""A Snapshot as plain text, for ``flasktop snapshot`` and for a stdout that is not a terminal."""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

from flasktop.fmt import fmt_bytes, fmt_duration, fmt_ms
from flasktop.model.snapshot import Snapshot, WorkerView
from flasktop.textsafe import sanitize

DETAIL_LIMIT = 300  # a source's or a worker's one-line explanation


def _request(w: WorkerView) -> str:
    f = w.in_flight
    if f is None:
        return ""
    bound = "at least " if f.source == "stack" else ""
    return f"{sanitize(f.method)} {sanitize(f.route, 80)} for {bound}{fmt_duration(f.elapsed_s)}"


def _missing(items: Tuple[str, ...]) -> str:
    """``("uss: access denied", "pss: access denied")`` as ``uss, pss: access denied``."""
    by_reason: Dict[str, List[str]] = {}
    for item in items:
        field, sep, reason = item.partition(": ")
        by_reason.setdefault(reason if sep else "", []).append(field)
    return "; ".join(", ".join(fields) + (f": {reason}" if reason else "")
                     for reason, fields in by_reason.items())


def render(snap: Snapshot, width: int = 100) -> str:
    """The report a person reads: problems first, then routes, workers, events, sources."""
    out: List[str] = []
    m = snap.master
    if m is not None:
        alive = len(snap.workers)
        conf = "?" if m.workers is None else str(m.workers)
        state = "" if m.alive else "  (MASTER EXITED: last data shown)"
        out.append(f"gunicorn master {m.pid}: {sanitize(m.worker_class)}, {alive}/{conf} workers, "
                   f"timeout {f'{m.timeout:.0f}s' if m.timeout > 0 else 'none'}"
                   f"{'?' if m.timeout_assumed else ''}, "
                   f"watched {snap.attached_s:.1f}s{state}")
        if m.timeout_assumed:
            out.append(f"  timeout {m.timeout:.0f}s is gunicorn's default, assumed: the master's process "
                       "title (setproctitle) hides its arguments and environment, its config file did "
                       "not set it, and no beacon has reported gunicorn's settings")
        if m.new_master_pid:
            out.append(f"  a new master {m.new_master_pid} was started (USR2 upgrade): "
                       f"run flasktop --pid {m.new_master_pid} to follow it")
    out.append(f"{snap.rps:.1f} req/s, {snap.error_rate * 100:.1f}% errors   "
               + "   ".join(f"{s.name}: {s.state}" for s in snap.sources))
    for s in snap.sources:
        if s.state not in ("ok",) and s.detail:
            # One line, never cut to the terminal's width: its end says why and what to do.
            out.append(f"  {s.name}: {sanitize(s.detail, DETAIL_LIMIT)}")
    b = snap.beacon
    reasons = ", ".join(f"{sanitize(r, 40)} {n}" for r, n in b.rejected)
    out.append(f"beacon {sanitize(b.address)}: {b.received} datagrams, {b.events} events, "
               f"{sum(n for _, n in b.rejected)} rejected" + (f" ({reasons})" if reasons else "")
               + f", {b.lost} lost"
               + (f", {b.kernel_drops} dropped by the kernel" if b.kernel_drops else "")
               + (f", {b.dropped_backlog} dropped by flasktop (it fell behind)"
                  if b.dropped_backlog else "")
               + (f", {b.app_dropped} dropped in the app" if b.app_dropped else "")
               + (f", {b.ignored} from pids that are not workers" if b.ignored else ""))

    out.append("")
    out.append("PROBLEMS" if snap.problems else "PROBLEMS: none seen")
    for p in snap.problems:
        out.append(f"  ! {p.kind:<15} {sanitize(p.summary, width)}")

    out.append("")
    if snap.routes:
        out.append(f"ROUTES {'':<34} {'req/s':>6} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"
                   f" {'err':>5} {'share':>6}")
        for r in snap.routes[:25]:
            name = sanitize(f"{r.method} {r.route}", 40)
            mark = "*" if r.slow else " "
            out.append(f" {mark}{name:<40} {r.rate:>6.1f} {fmt_ms(r.p50_ms):>7} {fmt_ms(r.p95_ms):>7}"
                       f" {fmt_ms(r.p99_ms):>7} {fmt_ms(r.max_ms):>7} {r.errors:>5} {r.share * 100:>5.0f}%")
            for hf in r.hot_frames[:3]:
                out.append(f"      {hf.share * 100:>3.0f}%  {sanitize(hf.frame, width - 12)}")
        if len(snap.routes) > 25:
            out.append(f"  ... and {len(snap.routes) - 25} more routes")
    elif b.accepted:
        out.append("ROUTES: no request completed while watching (the beacon is reporting)")
    else:
        out.append("ROUTES: none reported. Add the beacon to the app: "
                   "Beacon(app) from flasktop.beacon (see docs/beacon.md)")

    out.append("")
    out.append(f"WORKERS {'pid':>7} {'state':<8} {'rss':>6} {'MB/min':>7} {'leak':<5} request")
    for w in snap.workers:
        growth = "-" if w.growth_mb_per_min is None else f"{w.growth_mb_per_min:+.1f}"
        out.append(f"        {w.pid:>7} {w.state:<8} {fmt_bytes(w.rss_bytes):>6} {growth:>7} "
                   f"{'LEAK' if w.leak_suspected else '':<5} {_request(w)}")
        if w.stack and (w.state in ("stuck", "busy")):
            for frame in w.stack[:4]:
                out.append(f"                 {sanitize(frame, width - 20)}")
        if w.missing:
            out.append(f"                 missing: {sanitize(_missing(w.missing), DETAIL_LIMIT)}")

    if snap.events:
        out.append("")
        out.append("EVENTS")
        for e in snap.events[-15:]:
            when = time.strftime("%H:%M:%S", time.localtime(e.t))
            out.append(f"  {when} {e.kind:<15} {sanitize(e.summary, width - 26)}")
    return "\n".join(out) + "\n"
