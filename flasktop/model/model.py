"""The model: folds events into bounded state; :meth:`Model.snapshot` reads it out, unchanged."""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import replace
from typing import Callable, Deque, Dict, List, Optional, Tuple, TypeVar

from flasktop.model.churn import Arrival, Churn, Departure
from flasktop.model.config import ModelConfig
from flasktop.model.events import (
    Frame, ListenerStats, ProcStats, SourceState, StackSample, TopologyTick,
)
from flasktop.model.problems import Judge, Notes
from flasktop.model.routes import (
    OTHER, OTHER_METHOD, QS, DistinctCounter, RouteKey, RouteStats, Slot, slot_point,
    slowest_records, window_counts,
)
from flasktop.model.series import finite, trend
from flasktop.model.sketch import ZERO_KEY, Sketch, merge_counts, quantiles_of, summary_of
from flasktop.model.snapshot import (
    BUSY, IDLE, STARTING, STOPPED, STUCK, UNKNOWN, BeaconView, HotFrame, InFlightView,
    LatencyPoint, MasterView, RequestRecord, RouteView, Snapshot, SourceView, ThreadView,
    WorkerView,
)
from flasktop.model.workers import (
    MAX_TIDS, MB, Pending, ThreadState, WorkerState, request_cut, running_at, same_request,
)
from flasktop.protocol import (
    AGG_ACCURACY, AGG_MAX_KEY, AGG_MIN_S, AGG_ZERO, KIND_AGGREGATES, KIND_DURATIONS,
    KIND_HIGH_BYTES, KIND_INFLIGHT, KIND_REQUESTS, PENDING, UNMATCHED, Datagram,
    GunicornSettings, InFlight, Request, bucket_value,
)

T = TypeVar("T")


def _judged(timeout: float) -> float:
    """The timeout stuck workers and timeout kills are judged against: gunicorn's 0 means
    none (it never kills a silent worker), so nothing is past it."""
    return timeout if timeout > 0 else math.inf
UNNAMED = (UNMATCHED, PENDING)
_AGGREGATE_KINDS = frozenset((KIND_AGGREGATES, KIND_DURATIONS, KIND_HIGH_BYTES))  # decoded as rows
NO_ROUTE = "<no beacon>"  # the route of a request seen only in a stack
MAX_THREADS = 512  # per sample
MAX_REQ_SECONDS = 64  # per worker, seconds of requests waiting to meet their RSS reading
LAST_WORDS_S = 5.0  # a long request completed this soon before its worker vanished: died with it


class Model:
    """Pure state: ``feed`` events with the time they arrived, read ``snapshot``s."""

    def __init__(self, config: ModelConfig = ModelConfig(), start: float = 0.0) -> None:
        self.cfg = config
        self.start = start
        self._slot_s = config.window_s / max(1, config.window_slots)
        self._nslots = max(1, config.window_slots)
        self._sk = Sketch(config.sketch_accuracy, config.sketch_max_buckets)
        self._reqfn = frozenset(config.request_functions)
        # Once a stack of any worker showed request-handling frames, a stack without them is
        # outside any request, whatever the beacon's timing says. The master's workers all
        # run one app, so a worker respawned after the first one showed them trusts its
        # stacks from its first sample on.
        self._request_frames_seen = False
        self._routes: Dict[RouteKey, RouteStats] = {}
        self._other: Optional[RouteStats] = None
        self._dropped = DistinctCounter()
        self._evicted = 0  # idle routes forgotten to make room for new ones
        self._idle: List[Tuple[int, int, RouteKey]] = []  # eviction candidates, first out last
        self._idle_epoch = -2
        self._workers: Dict[int, WorkerState] = {}
        self._tick: Optional[TopologyTick] = None
        self._gunicorn: Optional[GunicornSettings] = None  # as a worker's beacon last said
        self._count = 0
        self._churn = Churn(config)
        self._queue: Deque[Tuple[int, int, Pending]] = deque()
        self._seq = 0
        self._frames: Dict[Frame, str] = {}
        self._listener: Optional[ListenerStats] = None
        self._heard: Optional[float] = None
        self._ignored = 0
        self._held: Deque[Tuple[Datagram, float]] = deque()  # from pids the next tick may confirm
        self._epoch = -1
        self._long_s = config.timeout_kill_fraction * 30.0
        self._app_dropped = 0
        self._losses: Deque[Tuple[float, int, int]] = deque(maxlen=512)  # (t, all, backlog)
        self._states: Dict[str, SourceState] = {}
        self._pid_states: Dict[Tuple[str, int], SourceState] = {}
        self._samples = 0

    # ------------------------------------------------------------------ feeding

    def feed(self, event: object, now: float) -> None:
        """Fold one event that arrived at wall-clock ``now``."""
        kind = type(event)
        if not -1e11 < getattr(event, "t", 0.0) < 1e11:
            return  # an event from no sane clock
        if kind is Datagram:
            self._datagram(event, now)  # type: ignore[arg-type]
        elif kind is StackSample:
            self._sample(event, now)  # type: ignore[arg-type]
        elif kind is TopologyTick:
            self._topology(event, now)  # type: ignore[arg-type]
        elif kind is ListenerStats:
            self._listener_stats(event, now)  # type: ignore[arg-type]
        elif kind is SourceState:
            self._source_state(event)  # type: ignore[arg-type]
        q = self._queue
        if q and q[0][2].t + self.cfg.attribution_delay_s <= now:
            self._mature(now)

    def _worker_for(self, pid: int, now: float) -> Optional[WorkerState]:
        w = self._workers.get(pid)
        if w is not None:
            return w
        if self._tick is None:
            w = WorkerState(pid, -1.0, now, True, self.cfg.series_points, self.cfg.recent_requests)
            if len(self._workers) < 4096:
                self._workers[pid] = w
            return w
        return None

    def _datagram(self, dg: Datagram, now: float) -> None:
        if self._heard is None or now > self._heard:
            self._heard = now
        w = self._worker_for(dg.pid, now)
        if w is None:
            if len(self._held) >= self.cfg.max_held_datagrams:
                self._held.popleft()
                self._ignored += 1
            self._held.append((dg, now))
            return
        w.beacon_t = now
        if dg.kind == KIND_REQUESTS:
            self._requests(w, dg, now)
        elif dg.kind in _AGGREGATE_KINDS:
            self._aggregates(w, dg, now)
        elif dg.kind == KIND_INFLIGHT:
            if dg.t < w.inflight_t:
                return
            w.inflight_t = dg.t
            if dg.gunicorn is not None and dg.gunicorn != self._gunicorn:
                self._gunicorn = dg.gunicorn
                if self._tick is not None:
                    self._keep_tick(self._with_settings(self._tick))
            last_done = w.last_done
            fresh: Dict[int, List[InFlight]] = {}
            n = 0
            for f in dg.inflight:
                if not -1e11 < f.start < 1e11 or n >= MAX_TIDS:
                    continue
                done = last_done.get(f.tid)
                if done is not None and same_request(done[0], done[1], f, dg.t):
                    continue  # it completed after this report was sent
                fresh.setdefault(f.tid, []).append(f)
                n += 1
            w.inflight = fresh
            if w.dropped < 0:
                # first report: what a worker that predates us dropped before we listened
                # is not ours to count; a worker born since, we watched all along
                w.dropped = dg.dropped if w.pre_attach else 0
            if dg.dropped > w.dropped:
                self._app_dropped += dg.dropped - w.dropped
                w.dropped = dg.dropped

    def _route(self, key: RouteKey) -> RouteStats:
        rs = self._routes.get(key)
        if rs is not None:
            rs.touched = self._epoch
            return rs
        cfg = self.cfg
        if len(self._routes) < cfg.max_routes or self._make_room():
            rs = RouteStats(key[0], key[1], self._nslots, self._new_sketch(), cfg.history_points)
            rs.touched = self._epoch
            self._routes[key] = rs
            return rs
        self._dropped.add(key[1] + " " + key[0])
        return self._other_route()

    def _other_route(self) -> RouteStats:
        if self._other is None:
            self._other = RouteStats(OTHER, OTHER_METHOD, self._nslots, self._new_sketch(),
                                     self.cfg.history_points)
        return self._other

    def _make_room(self) -> bool:
        """The table is full: forget a route that has been idle (no request, no sample) for a
        whole window, so that a route first seen late (an app with more routes than the cap,
        a deploy that adds one) gets a row of its own instead of folding into <other>. Of the
        idle routes, the one with the least to lose goes first (fewest requests since attach,
        then idle longest): a flood of one-request names churns among itself and leaves the
        rows of real routes that merely paused. What the forgotten route counted since
        attach moves to <other>, so the routes still add up to every request. Idle routes
        are listed at most once a slot: a flood of new names costs one scan of the table per
        slot, not one per name."""
        epoch = self._epoch
        if epoch != self._idle_epoch:
            self._idle_epoch = epoch
            horizon = epoch - self._nslots
            idle = [(rs.count, rs.touched, key) for key, rs in self._routes.items()
                    if rs.touched <= horizon]
            idle.sort(reverse=True)  # fewest requests, then idle longest, last: popped first
            self._idle = idle
        while self._idle:
            _, touched, key = self._idle.pop()
            rs = self._routes.get(key)
            if rs is not None and rs.touched == touched:  # still as idle as when listed
                del self._routes[key]
                self._evicted += 1
                self._dropped.add(key[1] + " " + key[0])
                other = self._other_route()
                other.count += rs.count
                other.errors += rs.errors
                other.total.merge(rs.total)
                return True
        return False

    def _new_sketch(self) -> Sketch:
        return Sketch(self.cfg.sketch_accuracy, self.cfg.sketch_max_buckets)

    def _retire(self, rs: RouteStats, epoch: int) -> None:
        """Archive every slot of ``rs`` that has left the window, oldest first. Called by
        the route's first request (or aggregate) of a slot, which also marks it touched."""
        rs.touched = epoch
        expired = sorted((s for s in rs.slots if 0 <= s.epoch <= epoch - self._nslots),
                         key=lambda s: s.epoch)
        for s in expired:
            if s.count:
                rs.history.append(slot_point(s, self._slot_s, self._sk))
                rs.archived += 1
            s.reset(-1)
        rs.slots[epoch % self._nslots].reset(epoch)

    def _advance(self, now: float) -> Tuple[int, int]:
        """The current slot epoch and its index; a clock step back is no rewind."""
        epoch = max(math.floor(now / self._slot_s), self._epoch)
        self._epoch = epoch
        return epoch, epoch % self._nslots

    def _requests(self, w: WorkerState, dg: Datagram, now: float) -> None:
        epoch, idx = self._advance(now)
        routes = self._routes
        route_of = self._route
        inv = self._sk.inv_log_gamma
        minv = self._sk.min_value
        maxb = self._sk.max_buckets
        log, ceil = math.log, math.ceil
        keep = self.cfg.slowest_per_route
        long_s = self._long_s
        inflight, last_done, pending = w.inflight, w.last_done, w.pending
        recent = w.recent.append
        phase = w.phase
        by_sec = w.req_by_sec
        pid = w.pid
        folded = 0
        for r in dg.requests:
            d = r.duration_s
            tid = r.tid
            end = r.end
            if not (0.0 <= d < 1e7 and -1e11 < end < 1e11):
                continue  # decode() never lets these through; a hand-made Request might
            folded += 1
            begin = end - d
            if inflight:
                flights = inflight.get(tid)
                if flights:
                    f = flights[0] if len(flights) == 1 else \
                        min(flights, key=lambda x: abs(x.start - begin))
                    if same_request(begin, end, f, w.inflight_t):
                        if len(flights) == 1:
                            del inflight[tid]
                        else:
                            flights.remove(f)
                        if r.route in UNNAMED and f.route not in UNNAMED:
                            # It was matched while running (the in-flight report says so) and
                            # lost its rule on the way out, e.g. unwound by gunicorn's SIGABRT.
                            r = r._replace(route=f.route, method=f.method)
            rs = routes.get((r.route, r.method))
            if rs is None:
                rs = route_of((r.route, r.method))
            k = ceil(log(d) * inv) if d > minv else ZERO_KEY
            slot = rs.slots[idx]
            if slot.epoch != epoch:
                self._retire(rs, epoch)
            slot.count += 1
            slot.busy += d
            b = slot.buckets
            b[k] = b.get(k, 0) + 1
            if d > slot.max:
                slot.max = d
            tot = rs.total
            tb = tot.buckets
            tb[k] = tb.get(k, 0) + 1
            tot.count += 1
            if d > tot.max:
                tot.max = d
            if d < tot.min:
                tot.min = d
            if len(tb) > maxb:
                tot._collapse()
            rs.count += 1
            if r.status >= 500 or r.exc:
                slot.errors += 1
                rs.errors += 1
                if r.exc:
                    rs.last_exc = r.exc
            sl = slot.slowest
            if len(sl) < keep:
                self._seq += 1
                heapq.heappush(sl, (d, self._seq, pid, r))
            elif d > sl[0][0]:
                self._seq += 1
                heapq.heapreplace(sl, (d, self._seq, pid, r))
            recent(r)
            if d >= long_s:
                w.long = r
            if tid in last_done or len(last_done) < MAX_TIDS:
                last_done[tid] = (begin, end, rs)
            if pending:
                waiting = pending.get(tid)
                if waiting:
                    for p in waiting:
                        if p.t > end:
                            break
                        if not p.done and p.t >= begin:
                            p.done = True
                            self._attribute(p, rs)
            _count_second(by_sec, ceil(end - phase), rs.route, 1)
        w.served += folded

    def _aggregates(self, w: WorkerState, dg: Datagram, now: float) -> None:
        """Fold requests the beacon counted per latency bucket instead of sending one by one.

        They count everywhere counts and latencies go (the route's window and since-attach
        sketches, errors, the worker's served count, the per-second route counts); having no
        individual times, they join no slowest list, recent list, or stack sample.
        """
        epoch, idx = self._advance(now)
        sk = self._sk
        same = sk.accuracy == AGG_ACCURACY and sk.min_value == AGG_MIN_S
        maxb = sk.max_buckets
        phase = w.phase
        by_sec = w.req_by_sec
        folded = 0
        for a in dg.aggregates:
            end = a.end
            if not (-1e11 < end < 1e11 and a.buckets):
                continue  # decode() never lets these through; a hand-made Aggregate might
            rs = self._routes.get((a.route, a.method))
            if rs is None:
                rs = self._route((a.route, a.method))
            slot = rs.slots[idx]
            if slot.epoch != epoch:
                self._retire(rs, epoch)
            tot = rs.total
            b, tb = slot.buckets, tot.buckets
            count = 0
            for k, n in a.buckets:
                if not (type(k) is int and (-AGG_MAX_KEY < k <= AGG_MAX_KEY or k == AGG_ZERO)
                        and type(n) is int and n > 0):
                    continue  # as above: only a hand-made Aggregate
                v = bucket_value(k)
                key = (k if k != AGG_ZERO else ZERO_KEY) if same else sk.key(v)
                count += n
                slot.busy += n * v
                b[key] = b.get(key, 0) + n
                if v > slot.max:
                    slot.max = v
                tb[key] = tb.get(key, 0) + n
                if v > tot.max:
                    tot.max = v
                if v < tot.min:
                    tot.min = v
                if len(tb) > maxb:
                    tot._collapse()
            if not count:
                continue
            slot.count += count
            tot.count += count
            rs.count += count
            folded += count
            if a.status >= 500 or a.exc:
                slot.errors += count
                rs.errors += count
                if a.exc:
                    rs.last_exc = a.exc
            _count_second(by_sec, math.ceil(end - phase), rs.route, count)
        w.served += folded

    def _frame(self, f: Frame) -> str:
        s = self._frames.get(f)
        if s is None:
            if len(self._frames) >= 50_000:
                self._frames.clear()
            s = self._frames[f] = str(f)
        return s

    def _sample(self, s: StackSample, now: float) -> None:
        w = self._workers.get(s.pid)
        if w is None:
            if self._tick is not None:
                return
            w = self._worker_for(s.pid, now)
            if w is None:
                return
        if w.sample_t is not None and s.t < w.sample_t:
            return
        self._samples += 1
        prev = w.threads
        threads: Dict[int, ThreadState] = {}
        reqfn = self._reqfn
        for th in s.threads[:MAX_THREADS]:
            frames = tuple(self._frame(f) for f in th.frames)
            cut = request_cut(tuple(f.name for f in th.frames), reqfn)
            in_req = cut >= 0
            since = s.t
            old = prev.get(th.tid)
            if in_req and old is not None and old.in_request and old.frames == frames:
                since = old.since
            req_frames = frames if in_req else (old.req_frames if old is not None else None)
            threads[th.tid] = ThreadState(th.tid, th.name, th.active, frames, in_req, since, s.t,
                                          req_frames)
            self._pend(w, th.tid, s.t, frames, cut)
        w.threads = threads
        w.sample_t = s.t
        w.sample_n += 1

    def _pend(self, w: WorkerState, tid: int, t: float, frames: Tuple[str, ...], cut: int) -> None:
        """Queue one sampled thread for joining with the request it was serving."""
        if cut >= 0:
            self._request_frames_seen = True
        elif self._request_frames_seen:
            return  # between requests (a sample taken as one ended): not the route's time
        f = running_at(w.inflight.get(tid), t)
        done = w.last_done.get(tid)
        if cut < 0 and f is None and done is None:
            return
        own = frames[:cut] if cut > 0 else (frames[:1] if cut == 0 else frames)
        if done is not None and done[0] <= t <= done[1]:
            self._attribute(Pending(t, own, None), done[2])  # type: ignore[arg-type]
            return
        route = None
        if f is not None and f.route != PENDING:
            route = self._route((f.route, f.method))
        p = Pending(t, own, route)
        lst = w.pending.get(tid)
        if lst is None:
            if len(w.pending) >= MAX_TIDS:
                return
            lst = w.pending[tid] = []
        lst.append(p)
        self._queue.append((w.pid, tid, p))
        if len(self._queue) > self.cfg.max_pending_samples:
            self._mature(math.inf, 1)

    def _mature(self, now: float, force: int = 0) -> None:
        delay = self.cfg.attribution_delay_s
        q = self._queue
        while q and (force > 0 or q[0][2].t + delay <= now):
            force -= 1
            pid, tid, p = q.popleft()
            w = self._workers.get(pid)
            rs = p.route
            if w is not None:
                lst = w.pending.get(tid)
                if lst:
                    if lst[0] is p:
                        lst.pop(0)
                    elif p in lst:
                        lst.remove(p)
                    if not lst:
                        del w.pending[tid]
                f = running_at(w.inflight.get(tid), p.t)
                if f is not None and f.route != PENDING:
                    rs = self._route((f.route, f.method))
            if not p.done and rs is not None:
                p.done = True
                self._attribute(p, rs)  # type: ignore[arg-type]

    def _attribute(self, p: Pending, rs: RouteStats) -> None:
        rs.hot_samples += 1
        hot = rs.hot
        seen = set()
        for f in p.frames:
            if f not in seen:
                seen.add(f)
                hot[f] = hot.get(f, 0) + 1
        if p.leaf:
            rs.hot_leaf[p.leaf] = rs.hot_leaf.get(p.leaf, 0) + 1
        kept = self.cfg.hot_frames_kept
        if len(hot) > 2 * kept:
            rs.hot = _top(hot, kept)
        if len(rs.hot_leaf) > 2 * kept:
            rs.hot_leaf = _top(rs.hot_leaf, kept)

    def _with_settings(self, tick: TopologyTick) -> TopologyTick:
        """``tick`` with the settings a worker's beacon reported in place of what was read
        from the master: those are what gunicorn runs, where the command line may be a
        process title and the config file may compute its values."""
        g = self._gunicorn
        if g is None:
            return tick
        config = replace(tick.config, timeout=g.timeout, workers=g.workers, threads=g.threads,
                         worker_class=g.worker_class, max_requests=g.max_requests or None)
        return replace(tick, config=config)

    def _keep_tick(self, tick: TopologyTick) -> None:
        self._tick = tick
        self._long_s = self.cfg.timeout_kill_fraction * _judged(tick.config.effective_timeout)

    def _topology(self, tick: TopologyTick, now: float) -> None:
        tick = self._with_settings(tick)
        first = self._tick is None
        cfg = self.cfg
        live = {ps.pid: ps for ps in tick.workers}
        departures: List[Departure] = []
        arrivals: List[Arrival] = []
        for pid, w in list(self._workers.items()):
            ps = live.get(pid)
            if ps is None or (w.create_time >= 0 and abs(ps.create_time - w.create_time) > 0.5):
                if not first:
                    departures.append(self._departure(w, tick))
                self._evict(pid)
        for ps in tick.workers:
            w = self._workers.get(ps.pid)
            if w is None:
                w = WorkerState(ps.pid, ps.create_time, tick.t, first, cfg.series_points,
                                cfg.recent_requests)
                self._workers[ps.pid] = w
                if not first:
                    arrivals.append(Arrival(ps.pid, tick.t, ps.create_time))
            elif w.create_time < 0:
                w.create_time = ps.create_time
            self._stats(w, ps)
        self._churn.master(tick.t, tick.master_pid, tick.master_alive, tick.new_master_pid)
        if not first:
            self._churn.observe(tick.t, self._count, len(live), arrivals, departures,
                                _judged(tick.config.effective_timeout),
                                tick.config.max_requests, tick.config.workers)
        self._count = len(live)
        self._keep_tick(tick)
        if self._held:
            held, self._held = self._held, deque()
            for dg, t in held:
                if dg.pid in self._workers:
                    self._datagram(dg, t)  # a worker younger than the previous tick
                else:
                    self._ignored += 1

    def _evict(self, pid: int) -> None:
        del self._workers[pid]
        for key in [k for k in self._pid_states if k[1] == pid]:
            del self._pid_states[key]

    def _departure(self, w: WorkerState, tick: TopologyTick) -> Departure:
        views = self._inflight_views(w, tick.t)
        oldest = views[0] if views else None
        hb = w.stats.heartbeat_age_s if w.stats is not None else None
        if hb is not None:
            # read at the last poll; by the tick that finds it gone it is that much older
            # (gunicorn kills only past the timeout, so a short --timeout needs this)
            hb += max(0.0, tick.t - w.stats.t)
        born = w.create_time if w.create_time >= 0 else w.first_seen
        route, method, age, tid = None, "", None, None
        if oldest is not None:
            route, method, age, tid = oldest.route, oldest.method, oldest.elapsed_s, oldest.tid
        elif w.long is not None and tick.t - w.long.end <= LAST_WORDS_S:
            # Killed mid-request, the request unwound and the beacon reported it as it died.
            r = w.long
            route, method, age, tid = r.route, r.method, r.duration_s, r.tid
        th = w.threads.get(tid) if tid is not None else None
        if th is None:
            th = w.main_thread()
        stack = (th.req_frames or th.frames) if th is not None else None
        return Departure(w.pid, tick.t, max(0.0, tick.t - born), route, method, stack, age, hb,
                         w.served, route is not None,
                         not w.pre_attach and w.beacon_t is not None)

    def _stats(self, w: WorkerState, ps: ProcStats) -> None:
        w.stats = ps
        w.traced_ticks = w.traced_ticks + 1 if ps.status == "tracing-stop" else 0
        if not -1e11 < ps.t < 1e11:
            return
        if ps.rss is not None:
            self._growth(w, ps.t, ps.rss / MB)
            w.rss.add(ps.t, float(ps.rss))
        if ps.num_fds is not None:
            w.fds.add(ps.t, float(ps.num_fds))
        if ps.num_connections is not None:
            w.conns.add(ps.t, float(ps.num_connections))

    def _growth(self, w: WorkerState, t: float, mb: float) -> None:
        """Join RSS growth per second with the routes of requests that ended in that second."""
        sec = math.floor(t)
        w.phase = t - sec
        last = w.last_rss
        w.last_rss = (t, mb)
        if last is not None and 0 < t - last[0] <= 2.5:
            w.growth_by_sec[sec] = mb - last[1]
        ripe = sec - math.ceil(self.cfg.leak_route_delay_s)
        for s in sorted(k for k in w.growth_by_sec if k <= ripe):
            self._correlate(w, w.growth_by_sec.pop(s), w.req_by_sec.pop(s, None))
        for s in [k for k in w.req_by_sec if k <= ripe]:
            del w.req_by_sec[s]
        while len(w.growth_by_sec) > MAX_REQ_SECONDS:
            del w.growth_by_sec[min(w.growth_by_sec)]

    def _correlate(self, w: WorkerState, d: float, counts: Optional[Dict[str, int]]) -> None:
        c = w.corr
        c[0] += 1.0
        c[1] += d
        c[2] += d * d
        if counts:
            total = sum(counts.values())
            for route, n in counts.items():
                a = w.corr_routes.get(route)
                if a is None:
                    a = w.corr_routes[route] = [0.0, 0.0, 0.0, 0.0]
                a[0] += n
                a[1] += n * n
                a[2] += n * d
                if d > 0:
                    a[3] += d * n / total
        if c[0] >= self.cfg.leak_window_s:
            w.corr = [x / 2 for x in c]
            for a in w.corr_routes.values():
                for i in range(4):
                    a[i] /= 2

    def _listener_stats(self, ev: ListenerStats, now: float) -> None:
        self._listener = ev
        self._losses.append((now, self._loss_total(), ev.dropped_backlog))

    def _loss_total(self) -> int:
        ev = self._listener
        base = self._app_dropped
        if ev is not None:
            base += ev.lost + (ev.kernel_drops or 0) + ev.dropped_backlog
        return base

    def _source_state(self, ev: SourceState) -> None:
        if ev.pid is None:
            self._states[ev.source] = ev
        elif ev.pid in self._workers or self._tick is None:
            if len(self._pid_states) < 4096 or (ev.source, ev.pid) in self._pid_states:
                self._pid_states[(ev.source, ev.pid)] = ev

    # ------------------------------------------------------------------ reading

    def sizes(self) -> Dict[str, int]:
        """How many entries each store holds (for tests and benchmarks of boundedness)."""
        ws = self._workers.values()
        return {
            "routes": len(self._routes) + (self._other is not None),
            "workers": len(self._workers),
            "events": len(self._churn.events),
            "pending_exits": len(self._churn.exits) + len(self._churn.starts),
            "pending_samples": len(self._queue),
            "frames_cache": len(self._frames),
            "hot_frames": sum(len(r.hot) + len(r.hot_leaf) for r in self._all_routes()),
            "history_points": sum(len(r.history) for r in self._all_routes()),
            "sketch_buckets": sum(len(r.total.buckets) + sum(len(s.buckets) for s in r.slots)
                                  for r in self._all_routes()),
            "series_points": sum(len(w.rss) + len(w.fds) + len(w.conns) for w in ws),
            "recent_requests": sum(len(w.recent) for w in ws),
            "per_worker_maps": sum(len(w.last_done) + len(w.pending) + len(w.req_by_sec)
                                   + len(w.growth_by_sec) + len(w.corr_routes) for w in ws),
            "source_states": len(self._pid_states) + len(self._states),
            "held_datagrams": len(self._held),
            "distinct_dropped": len(self._dropped._heap),
            "idle_candidates": len(self._idle),
            "routes_evicted": self._evicted,
        }

    def _all_routes(self) -> List[RouteStats]:
        rs = list(self._routes.values())
        if self._other is not None:
            rs.append(self._other)
        return rs

    def _inflight_views(self, w: WorkerState, now: float) -> List[InFlightView]:
        """The requests a worker serves: the beacon's, plus what the stacks show that it has
        not reported yet (its in-flight report comes once a second), or all of it without one."""
        views = [InFlightView(f.route, f.method, f.tid, f.start, max(0.0, now - f.start))
                 for flights in w.inflight.values() for f in flights]
        st = w.sample_t
        if st is not None and now - st <= self.cfg.thread_stale_s \
                and (w.beacon_t is None or st > w.inflight_t):
            for th in w.threads.values():
                if not th.in_request or th.tid in w.inflight:
                    continue
                done = w.last_done.get(th.tid)
                if done is not None and done[1] >= th.t:
                    continue  # the request it was sampled in has completed since
                views.append(InFlightView(NO_ROUTE, "", th.tid, th.since,
                                          max(0.0, th.t - th.since), "stack"))
        views.sort(key=lambda v: (v.start, v.tid))
        return views

    def _stack(self, w: WorkerState, view: Optional[InFlightView]) -> Optional[Tuple[str, ...]]:
        th = w.threads.get(view.tid) if view is not None else None
        if th is None:
            th = w.main_thread()
        return th.frames if th is not None else None

    def snapshot(self, now: float) -> Snapshot:
        """The picture at ``now``. Reading changes nothing the next feed would see."""
        cfg = self.cfg
        tick = self._tick
        timeout = _judged(tick.config.effective_timeout if tick is not None else 30.0)
        epoch = math.floor(now / self._slot_s)
        span = max(1.0, min(now - (epoch - self._nslots + 1) * self._slot_s, now - self.start))

        route_views, usual, rows = self._route_views(now, epoch, span)
        workers, notes = self._worker_views(now, timeout, usual)
        in_flight: Dict[RouteKey, int] = {}
        for wv in workers:
            for v in wv.in_flight_all:
                in_flight[(v.route, v.method)] = in_flight.get((v.route, v.method), 0) + 1
        if in_flight:
            route_views = [_with(rv, in_flight=in_flight[(rv.route, rv.method)])
                           if (rv.route, rv.method) in in_flight else rv for rv in route_views]
        total = sum(r[0] for r in rows.values())
        errors = sum(r[1] for r in rows.values())
        busy = sum(r[2] for r in rows.values())
        capacity = self._capacity()
        util = busy / (capacity * span) if capacity else None
        counts = {k: r[0] for k, r in rows.items()}
        judge = Judge(cfg, now, timeout)
        route_views = judge.routes(route_views, util, counts)
        problems = judge.problems(route_views, workers, notes, self._churn, counts,
                                  {k: r[1] for k, r in rows.items()},
                                  {(r.route, r.method): r.last_exc for r in self._all_routes()
                                   if r.last_exc})
        return Snapshot(
            t=now,
            attached_s=max(0.0, now - self.start),
            master=self._master_view(),
            workers=tuple(workers),
            routes=tuple(route_views),
            problems=problems,
            events=tuple(self._churn.events),
            sources=self._source_views(now),
            beacon=self._beacon_view(now),
            rps=total / span,
            error_rate=errors / total if total else 0.0,
            routes_dropped=self._dropped.estimate(),
            utilization=util,
        )

    def _capacity(self) -> Optional[int]:
        tick = self._tick
        if tick is None:
            return None
        cls = tick.config.effective_worker_class
        n = len(tick.workers)
        if cls == "sync":
            return n
        if cls == "gthread":
            return n * max(1, tick.config.threads or 1)
        return None  # async workers: concurrency is not a fixed number

    def _route_views(self, now: float, epoch: int,
                     span: float) -> Tuple[List[RouteView], Dict[RouteKey, float],
                                           Dict[RouteKey, Tuple[int, int, float]]]:
        """Route views (most busy time first), each route's usual p95 (s), window counts."""
        cfg = self.cfg
        rows = []
        usual: Dict[RouteKey, float] = {}
        counts: Dict[RouteKey, Tuple[int, int, float]] = {}
        all_busy = 0.0
        for rs in self._all_routes():
            win = rs.window_slots(epoch)
            c, e, busy, mx = window_counts(win)
            all_busy += busy
            rows.append((rs, win, c, e, busy, mx))
        out: List[Tuple[float, int, str, str, RouteView]] = []
        for rs, win, c, e, busy, mx in rows:
            key = (rs.route, rs.method)
            counts[key] = (c, e, busy)
            tot = rs.total
            t50, t95, t99, hist = self._memo(rs, "total", tot.count, lambda: self._totals(rs))
            if tot.count >= cfg.stuck_min_route_count and t95 is not None:
                usual[key] = t95
            if c:
                p50, p95, p99, slow = self._memo(rs, "window", (epoch, c),
                                                 lambda: self._window(rs, win, c, mx, epoch))
                wmax: Optional[float] = mx
            else:
                p50, p95, p99, wmax = t50, t95, t99, (tot.max if tot.count else None)
                slow = ()
            hot = self._memo(rs, "hot", rs.hot_samples, lambda: self._hot(rs))
            history = self._memo(rs, "history", (epoch, rs.archived),
                                 lambda: self._history(rs, epoch))
            rv = RouteView(
                route=rs.route, method=rs.method, count=rs.count, errors=rs.errors,
                rate=c / span, error_rate=e / c if c else 0.0,
                p50_ms=_ms(p50), p95_ms=_ms(p95), p99_ms=_ms(p99), max_ms=_ms(wmax),
                share=busy / all_busy if all_busy > 0 else 0.0,
                total_p50_ms=_ms(t50), total_p95_ms=_ms(t95), total_p99_ms=_ms(t99),
                total_max_ms=_ms(tot.max) if tot.count else None,
                hot_frames=hot, slowest=slow, histogram=hist, history=history,
            )
            out.append((-busy, -c, rs.route, rs.method, rv))
        out.sort(key=lambda x: x[:4])
        return [x[4] for x in out], usual, counts

    @staticmethod
    def _memo(rs: RouteStats, part: str, version: object, make: Callable[[], T]) -> T:
        """Recompute a part of a route view only when its inputs changed (pure memoisation)."""
        hit = rs.memo.get(part)
        if hit is not None and hit[0] == version:
            return hit[1]  # type: ignore[no-any-return]
        value = make()
        rs.memo[part] = (version, value)
        return value

    def _totals(self, rs: RouteStats) -> Tuple[Optional[float], Optional[float], Optional[float],
                                               Tuple[Tuple[float, int], ...]]:
        tot = rs.total
        (t50, t95, t99), hist = summary_of(tot.buckets, tot.count, (0.5, 0.95, 0.99),
                                           self.cfg.histogram_bins, tot, tot.min, tot.max)
        return t50, t95, t99, tuple((round(ub * 1000.0, 3), cnt) for ub, cnt in hist)

    def _window(self, rs: RouteStats, win: List[Slot], c: int, mx: float, epoch: int) -> tuple:
        """Window percentiles and slowest requests; the closed slots are merged once per slot."""
        keep = self.cfg.slowest_per_route
        closed, top = self._memo(rs, "closed", epoch, lambda: (
            merge_counts(s.buckets for s in win if s.epoch < epoch),
            heapq.nlargest(keep, (x for s in win if s.epoch < epoch for x in s.slowest))))
        buckets = closed
        cur = rs.slots[epoch % self._nslots]
        if cur.epoch == epoch and cur.count:
            buckets = dict(closed)
            for k, v in cur.buckets.items():
                buckets[k] = buckets.get(k, 0) + v
            top = heapq.nlargest(keep, top + cur.slowest)
        p50, p95, p99 = quantiles_of(buckets, c, QS, self._sk, 0.0, mx)
        records = self._memo(rs, "slowest", tuple(x[1] for x in top),
                             lambda: slowest_records(top, rs))
        return p50, p95, p99, records

    def _hot(self, rs: RouteStats) -> Tuple[HotFrame, ...]:
        hs = max(1, rs.hot_samples)
        top = heapq.nsmallest(self.cfg.hot_frames_shown, rs.hot.items(),
                              key=lambda kv: (-kv[1], kv[0]))
        return tuple(HotFrame(f, cnt, cnt / hs, rs.hot_leaf.get(f, 0)) for f, cnt in top)

    def _history(self, rs: RouteStats, epoch: int) -> Tuple[LatencyPoint, ...]:
        history = list(rs.history)
        history.extend(slot_point(s, self._slot_s, self._sk) for s in
                       sorted((s for s in rs.slots if 0 <= s.epoch < epoch and s.count),
                              key=lambda s: s.epoch))
        return tuple(history[-self.cfg.history_points:])

    def _worker_views(self, now: float, timeout: float,
                      usual: Dict[RouteKey, float]) -> Tuple[List[WorkerView], Dict[int, Notes]]:
        cfg = self.cfg
        out: List[WorkerView] = []
        notes: Dict[int, Notes] = {}
        for pid in sorted(self._workers):
            w = self._workers[pid]
            ps = w.stats
            views = self._inflight_views(w, now)
            oldest = views[0] if views else None
            state, stuck_for, why = self._state(w, oldest, bool(views), now, timeout, usual)
            hb = ps.heartbeat_age_s if ps is not None else None
            by_tid = {v.tid: v for v in views}
            threads = tuple(ThreadView(th.tid, th.name, th.active, th.frames, by_tid.get(th.tid))
                            for th in sorted(w.threads.values(), key=lambda x: x.tid))
            born = w.create_time if w.create_time >= 0 else w.first_seen
            mem = trend(w.rss, now, born, warmup_s=cfg.leak_warmup_s,
                        min_span_s=cfg.leak_min_span_s, min_points=cfg.leak_min_points,
                        window_s=cfg.leak_window_s, min_r2=cfg.leak_min_r2,
                        flatten_ratio=cfg.leak_flatten_ratio,
                        min_rate_per_s=cfg.leak_min_mb_per_min * MB / 60.0,
                        min_growth=cfg.leak_min_growth_mb * MB)
            rate = mem.rate_per_s
            if rate is None:
                f = w.rss.fit_since(now - cfg.leak_window_s)
                rate = f.slope if f is not None and f.n >= 10 else None
            fd, fd_rate = self._fd_trend(w, now, born)
            if why or mem.growing or fd:
                notes[pid] = Notes(why, mem if mem.growing else None, fd)
            out.append(WorkerView(
                pid=pid, state=state, started=born,
                rss_bytes=ps.rss if ps is not None else None,
                uss_bytes=ps.uss if ps is not None else None,
                pss_bytes=ps.pss if ps is not None else None,
                cpu_percent=finite(ps.cpu_percent) if ps is not None else None,
                num_threads=ps.num_threads if ps is not None else None,
                num_fds=ps.num_fds if ps is not None else None,
                num_connections=ps.num_connections if ps is not None else None,
                heartbeat_age_s=finite(hb),
                rss_history=w.rss.values(),
                fd_history=w.fds.values(),
                growth_mb_per_min=finite(rate * 60.0 / MB) if rate is not None else None,
                leak_suspected=mem.growing,
                leak_routes=self._leak_routes(w) if mem.growing else (),
                in_flight=oldest,
                in_flight_all=tuple(views),
                stack=self._stack(w, oldest),
                threads=threads,
                recent_requests=self._records(w),
                requests_served=w.served,
                stuck_for_s=stuck_for,
                missing=tuple(f"{name}: {reason}" for name, reason in ps.missing)
                if ps is not None else (),
                fd_growth_per_min=finite(fd_rate * 60.0) if fd_rate is not None else None,
                fd_leak_suspected=fd is not None,
            ))
        return out, notes

    def _state(self, w: WorkerState, oldest: Optional[InFlightView], busy: bool, now: float,
               timeout: float, usual: Dict[RouteKey, float]
               ) -> Tuple[str, Optional[float], Optional[str]]:
        """The worker's state, how long it has been stuck, and why (docs/model.md, Workers)."""
        cfg = self.cfg
        ps = w.stats
        if ps is not None and (ps.status == "stopped" or w.traced_ticks >= 2):
            return STOPPED, None, None
        if oldest is not None:
            age = oldest.elapsed_s
            if age >= cfg.stuck_timeout_fraction * timeout:
                return STUCK, age, f"over half the timeout ({timeout:.0f} s)"
            p95 = usual.get((oldest.route, oldest.method)) if oldest.source == "beacon" else None
            floor = cfg.stuck_floor_min_s
            if math.isfinite(timeout):
                floor = max(floor, cfg.stuck_floor_fraction * timeout)
            if p95 is not None and age >= cfg.stuck_p95_multiple * p95 and age >= floor:
                return STUCK, age, (f"{age / max(p95, 1e-9):.0f}x the route's usual p95 "
                                    f"({p95 * 1000:.0f} ms)")
        hb = ps.heartbeat_age_s if ps is not None else None
        if hb is not None and hb >= cfg.heartbeat_stuck_fraction * timeout \
                and (oldest is None or oldest.source == "stack"):
            cls = self._tick.config.effective_worker_class if self._tick is not None else "sync"
            return STUCK, hb, f"gunicorn heartbeat {hb:.0f} s old ({cls} worker)"
        if busy:
            return BUSY, None, None
        if w.beacon_t is not None or w.sample_t is not None:
            return IDLE, None, None
        if not w.pre_attach and now - w.first_seen < cfg.starting_grace_s:
            return STARTING, None, None
        return UNKNOWN, None, None

    @staticmethod
    def _records(w: WorkerState) -> Tuple[RequestRecord, ...]:
        """Recent requests, newest first; records of the previous snapshot are reused."""
        prev = w.records
        fresh: Dict[int, Tuple[Request, RequestRecord]] = {}
        out = []
        for r in reversed(w.recent):
            hit = prev.get(id(r))
            if hit is not None and hit[0] is r:
                rec = hit[1]
            else:
                rec = RequestRecord(r.route, r.method, r.status, round(r.duration_s * 1000.0, 3),
                                    w.pid, r.tid, r.end, r.exc, r.size)
            fresh[id(r)] = (r, rec)  # holding r keeps its id from being reused
            out.append(rec)
        w.records = fresh
        return tuple(out)

    def _fd_trend(self, w: WorkerState, now: float,
                  born: float) -> Tuple[Optional[str], Optional[float]]:
        """A one-line fd/connection leak verdict (or None) and the fd growth rate per second."""
        cfg = self.cfg
        rate: Optional[float] = None
        for series, what in ((w.fds, "file descriptors"), (w.conns, "connections")):
            tr = trend(series, now, born, warmup_s=cfg.leak_warmup_s,
                       min_span_s=cfg.leak_min_span_s, min_points=cfg.leak_min_points,
                       window_s=cfg.leak_window_s, min_r2=cfg.leak_min_r2,
                       flatten_ratio=cfg.leak_flatten_ratio,
                       min_rate_per_s=cfg.fd_leak_min_per_min / 60.0,
                       min_growth=cfg.fd_leak_min_growth)
            if rate is None:
                rate = tr.rate_per_s
            if tr.growing and tr.rate_per_s is not None:
                last = series.last()
                now_n = int(last[1]) if last is not None else 0
                return (f"{what} grow {tr.rate_per_s * 60:.1f}/min for {tr.window_s / 60:.1f} min "
                        f"(now {now_n})", tr.rate_per_s)
        return None, rate

    def _leak_routes(self, w: WorkerState) -> Tuple[Tuple[str, float], ...]:
        cfg = self.cfg
        s, sd, sdd = w.corr
        vd = s * sdd - sd * sd
        if s < 2 or vd <= 1e-12:
            return ()
        scored = []
        total = sum(a[3] for a in w.corr_routes.values() if a[3] > 0)
        for route, (sn, snn, snd, grown) in w.corr_routes.items():
            vn = s * snn - sn * sn
            if vn <= 1e-12 or grown <= 0:
                continue
            r = (s * snd - sn * sd) / math.sqrt(vn * vd)
            if r >= cfg.leak_route_min_corr:
                scored.append((-r, route, grown / total if total > 0 else 0.0))
        scored.sort()
        return tuple((route, round(share, 4)) for _, route, share in scored[:cfg.leak_routes_shown])

    def _master_view(self) -> Optional[MasterView]:
        tick = self._tick
        if tick is None:
            return None
        g = tick.config
        m = tick.master
        return MasterView(
            pid=tick.master_pid, alive=tick.master_alive, worker_class=g.effective_worker_class,
            workers=g.workers, threads=g.threads, timeout=g.effective_timeout,
            max_requests=g.max_requests, bind=g.bind, app=g.app, preload=g.preload,
            rss_bytes=m.rss if m is not None else None,
            cpu_percent=finite(m.cpu_percent) if m is not None else None,
            new_master_pid=tick.new_master_pid, timeout_assumed=g.timeout_assumed)

    def _source_views(self, now: float) -> Tuple[SourceView, ...]:
        cfg = self.cfg
        out = []
        st = self._states.get("psutil")
        if st is not None and st.state != "ok":
            out.append(SourceView("psutil", st.state, st.detail))
        elif self._tick is not None:
            out.append(SourceView("psutil", "ok", st.detail if st is not None else
                                  f"{len(self._tick.workers)} workers"))
        else:
            out.append(SourceView("psutil", "waiting", "no reading of the gunicorn master yet"))

        st = self._states.get("pyspy")
        failed = sorted((pid, s) for (src, pid), s in self._pid_states.items()
                        if src == "pyspy" and s.state != "ok" and pid in self._workers)
        if st is not None and st.state != "ok":
            out.append(SourceView("pyspy", st.state, st.detail))
        elif failed:
            pids = ", ".join(str(p) for p, _ in failed[:5]) + ("..." if len(failed) > 5 else "")
            if len(failed) < len(self._workers):
                state, count = "degraded", f"{len(failed)} of {len(self._workers)}"
            else:  # no stacks at all: say why, as the workers' own state (denied, error...)
                states = [s.state for _, s in failed]
                state = max(sorted(set(states)), key=states.count)
                count = f"all {len(failed)}"
            out.append(SourceView("pyspy", state, f"py-spy failed for {count} workers ({pids}): "
                                  f"{failed[0][1].detail}"))
        elif st is not None or self._samples:
            out.append(SourceView("pyspy", "ok", st.detail if st is not None else ""))
        else:
            out.append(SourceView("pyspy", "waiting", "no stack sample yet"))

        st = self._states.get("beacon")
        addr = self._listener.address if self._listener is not None else ""
        if st is not None and st.state not in ("ok", "waiting", "degraded"):
            out.append(SourceView("beacon", st.state, st.detail))
        elif self._heard is None:
            hint = st.detail if st is not None and st.detail else ""
            out.append(SourceView("beacon", "waiting", hint or
                                  f"no datagram yet{' on ' + addr if addr else ''}: instrument the "
                                  "app with flasktop.beacon.Beacon(app)"))
        elif now - self._heard > cfg.beacon_silent_s:
            out.append(SourceView("beacon", "degraded",
                                  f"no datagram for {now - self._heard:.0f} s"))
        else:
            lost, behind = self._recent_losses(now)
            detail = ""
            if self._ignored:
                detail = f"{self._ignored} datagrams from pids that are not this master's workers"
            if lost:
                why = f" ({behind} dropped by flasktop itself, behind)" if behind else ""
                out.append(SourceView("beacon", "degraded",
                                      f"lost {lost} events or datagrams in the last "
                                      f"{cfg.beacon_loss_window_s:.0f} s{why}"
                                      + ("; " + detail if detail else "")))
            else:
                out.append(SourceView("beacon", "ok", detail))
        return tuple(out)

    def _recent_losses(self, now: float) -> Tuple[int, int]:
        """Events lost in the last loss window: all kinds, and those flasktop itself dropped."""
        base, backlog = 0, 0
        for t, v, b in self._losses:
            if t >= now - self.cfg.beacon_loss_window_s:
                break
            base, backlog = v, b
        cur = self._listener.dropped_backlog if self._listener is not None else 0
        return max(0, self._loss_total() - base), max(0, cur - backlog)

    def _beacon_view(self, now: float) -> BeaconView:
        ev = self._listener
        heard = now - self._heard if self._heard is not None else None
        if ev is None:
            return BeaconView(app_dropped=self._app_dropped, last_heard_s=heard,
                              ignored=self._ignored)
        return BeaconView(address=ev.address, received=ev.received, accepted=ev.accepted,
                          events=ev.events, rejected=ev.rejected, lost=ev.lost,
                          kernel_drops=ev.kernel_drops, app_dropped=self._app_dropped,
                          senders=ev.senders, last_heard_s=heard, ignored=self._ignored,
                          dropped_backlog=ev.dropped_backlog)


def _count_second(by_sec: Dict[int, Dict[str, int]], sec: int, route: str, n: int) -> None:
    """Add ``n`` requests of ``route`` that ended in second ``sec`` (bounded: the oldest
    second goes first)."""
    c = by_sec.get(sec)
    if c is None:
        if len(by_sec) >= MAX_REQ_SECONDS:
            del by_sec[min(by_sec)]
        c = by_sec[sec] = {}
    c[route] = c.get(route, 0) + n


def _top(counts: Dict[str, int], n: int) -> Dict[str, int]:
    return dict(heapq.nsmallest(n, counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _ms(x: Optional[float]) -> Optional[float]:
    return round(x * 1000.0, 3) if x is not None and math.isfinite(x) else None


def _with(rv: RouteView, **kw: object) -> RouteView:
    from dataclasses import replace

    return replace(rv, **kw)  # type: ignore[arg-type]
