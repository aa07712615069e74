"""Verdicts: which routes are slow, and the ranked list of what is wrong right now."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from flasktop.model.churn import Churn
from flasktop.model.config import ModelConfig
from flasktop.model.series import Trend
from flasktop.model.snapshot import STUCK, Problem, RouteView, WorkerView

# Severity bands: higher is worse; the list is sorted by it.
SEV_MASTER = 100
SEV_DOWN = 95
SEV_CRASH = 90
SEV_TIMEOUT = 80
SEV_STUCK = 70
SEV_ERRORS = 55
SEV_LEAK = 50
SEV_FD = 45
SEV_SLOW = 35


class Notes(NamedTuple):
    """What the worker views do not carry but the problem summaries need."""

    stuck_why: Optional[str] = None
    leak: Optional[Trend] = None
    fd: Optional[str] = None


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return f"{x / 1000:.1f} s" if x >= 1000 else f"{x:.0f} ms"


def _age(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _label(method: str, route: str) -> str:
    return f"{method} {route}".strip()


class Judge:
    def __init__(self, cfg: ModelConfig, now: float, timeout: float) -> None:
        self.cfg = cfg
        self.now = now
        self.timeout = timeout
        self.why_slow: Dict[Tuple[str, str], Tuple[int, str]] = {}

    def routes(self, views: Sequence[RouteView], util: Optional[float],
               counts: Dict[Tuple[str, str], int]) -> List[RouteView]:
        """Flag slow routes: slow for users, or eating the workers' capacity, or far slower
        than the other routes while the workers are not idle."""
        cfg = self.cfg
        judged = [v for v in views if counts.get((v.route, v.method), 0) >= cfg.slow_min_count
                  and v.p95_ms is not None]
        typical = sorted(v.p95_ms or 0.0 for v in judged)
        ids = {id(v) for v in judged}
        out = []
        for v in views:
            reason = None
            if id(v) in ids:
                reason = self._slow(v, typical, util)
            if reason is not None:
                self.why_slow[(v.route, v.method)] = reason
                v = replace(v, slow=True)
            out.append(v)
        return out

    def _slow(self, v: RouteView, p95s: List[float],
              util: Optional[float]) -> Optional[Tuple[int, str]]:
        cfg = self.cfg
        p95 = v.p95_ms or 0.0
        if p95 < cfg.slow_floor_ms:
            return None
        busy = f"{v.share:.0%} of the workers' busy time"
        load = f", workers {util:.0%} busy" if util is not None else ""
        head = f"{_label(v.method, v.route)}: p95 {_ms(p95)}"
        weight = int(round(20 * v.share * min(1.0, util if util is not None else 0.5)))
        if util is not None and v.share >= cfg.slow_share and util >= cfg.slow_util:
            return SEV_SLOW + 10 + weight, f"{head}, takes {busy}{load}"
        if p95 >= cfg.slow_abs_p95_ms:
            return SEV_SLOW + 5 + weight, f"{head} ({v.rate:.1f}/s, {busy})"
        others = list(p95s)
        others.remove(p95)  # the other routes' p95s, sorted
        if len(others) >= 2 and (util is None or util >= cfg.slow_rel_util):
            typical = others[len(others) // 2]
            if p95 >= cfg.slow_rel_multiple * max(typical, 1e-3):
                return (SEV_SLOW + weight,
                        f"{head}, {p95 / max(typical, 1e-3):.0f}x the typical route's "
                        f"{_ms(typical)} ({busy}{load})")
        return None

    def problems(self, routes: Sequence[RouteView], workers: Sequence[WorkerView],
                 notes: Dict[int, Notes], churn: Churn, counts: Dict[Tuple[str, str], int],
                 errors: Dict[Tuple[str, str], int], last_exc: Dict[Tuple[str, str], str]
                 ) -> Tuple[Problem, ...]:
        cfg = self.cfg
        now = self.now
        out: List[Problem] = []
        if churn.master_exited_t is not None:
            out.append(Problem("master_exited", SEV_MASTER,
                               "the gunicorn master exited: nothing is serving requests"))
        short = churn.short_since
        if churn.master_exited_t is None and short is not None \
                and now - short >= cfg.starting_grace_s:
            out.append(Problem(
                "workers_down", SEV_DOWN if churn.alive == 0 else SEV_FD + 10,
                (f"only {churn.alive} of {churn.expected} workers alive" if churn.expected
                 else "no worker alive") + f" for {_age(now - short)}: "
                "gunicorn's workers die or hang while starting (see its log)"))
        if churn.crash_t is not None and now - churn.crash_t <= cfg.problem_recent_s:
            out.append(Problem("crash_loop", SEV_CRASH,
                               f"crash loop: {churn.crash_count} workers died within "
                               f"{_age(cfg.crash_lifetime_s)} of starting "
                               f"({_age(now - churn.crash_t)} ago)"))
        for ev in churn.timeouts:
            if now - ev.t <= cfg.problem_recent_s:
                out.append(Problem("worker_timeout", SEV_TIMEOUT,
                                   f"{ev.summary} ({_age(now - ev.t)} ago)", pid=ev.pid,
                                   route=ev.route))
        for w in workers:
            note = notes.get(w.pid, Notes())
            if w.state == STUCK and w.stuck_for_s is not None:
                out.append(self._stuck(w, note))
            if w.leak_suspected and note.leak is not None:
                rate = (note.leak.rate_per_s or 0.0) * 60.0 / 1048576.0
                culprits = ", ".join(f"{r} {s:.0%}" for r, s in w.leak_routes[:3])
                rss = f", now {w.rss_bytes / 1048576:.0f} MB" if w.rss_bytes else ""
                out.append(Problem(
                    "memory_leak", SEV_LEAK + min(15, int(rate / 10)),
                    f"worker {w.pid} memory grows {rate:.1f} MB/min for "
                    f"{note.leak.window_s / 60:.0f} min (R\u00b2 {note.leak.r2:.2f}){rss}"
                    + (f"; while serving {culprits}" if culprits else ""),
                    pid=w.pid, route=w.leak_routes[0][0] if w.leak_routes else None))
            if note.fd is not None:
                out.append(Problem("fd_leak", SEV_FD, f"worker {w.pid}: {note.fd}", pid=w.pid))
        for v in routes:
            key = (v.route, v.method)
            n, e = counts.get(key, 0), errors.get(key, 0)
            if e >= cfg.error_min_count and n and e / n >= cfg.error_rate_threshold:
                exc = last_exc.get(key)
                out.append(Problem(
                    "error_rate", SEV_ERRORS + int(20 * min(1.0, e / n)),
                    f"{_label(v.method, v.route)}: {e / n:.0%} of {n} requests failed in the last "
                    f"{cfg.window_s:.0f} s" + (f" ({exc})" if exc else ""), route=v.route))
            why = self.why_slow.get(key)
            if why is not None:
                out.append(Problem("slow_route", why[0], why[1], route=v.route))
        out.sort(key=lambda p: (-p.severity, p.kind, p.pid or 0, p.route or "", p.summary))
        return tuple(out[:cfg.max_problems])

    def _stuck(self, w: WorkerView, note: Notes) -> Problem:
        v = w.in_flight
        age = w.stuck_for_s or 0.0
        where = f", in {w.stack[0]}" if w.stack else ""
        vs = f" (timeout {self.timeout:.0f} s)" if math.isfinite(self.timeout) else " (no timeout)"
        if v is None:
            text = f"worker {w.pid} stuck: {note.stuck_why or 'no heartbeat'}{where}"
            return Problem("stuck_worker", SEV_STUCK, text, pid=w.pid)
        if v.source == "stack":
            text = (f"worker {w.pid} stuck for at least {_age(age)} in one request{vs} "
                    f"(no beacon: unchanged stack){where}")
        else:
            text = (f"worker {w.pid} stuck {_age(age)} on {_label(v.method, v.route)}{vs}"
                    f"{where}")
        sev = SEV_STUCK + min(9, int(9 * age / max(self.timeout, 1e-3)))
        return Problem("stuck_worker", sev, text, pid=w.pid,
                       route=v.route if v.source == "beacon" else None)
