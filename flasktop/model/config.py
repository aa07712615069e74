"""Every threshold and window the model uses, with its default and why (docs/model.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class ModelConfig:
    # Routes ---------------------------------------------------------------
    window_s: float = 60.0  # the "recent" window for rates, percentiles, shares
    window_slots: int = 6  # sub-windows it rotates in; one latency history point per slot
    max_routes: int = 200  # distinct (route, method) kept; the rest fold into "<other>"
    # (a route idle for a whole window gives its row to a new one)
    slowest_per_route: int = 10  # slowest recent requests kept per route
    history_points: int = 360  # latency history points per route (an hour at 10 s)
    histogram_bins: int = 24
    sketch_accuracy: float = 0.01  # relative error of every percentile
    sketch_max_buckets: int = 2048  # 1 us .. 1 week needs ~1400 at 1 %

    # Hot frames -----------------------------------------------------------
    attribution_delay_s: float = 2.5  # hold samples this long: completions arrive ~1 s late
    max_pending_samples: int = 2048
    hot_frames_kept: int = 256  # per route; rarer frames are evicted
    hot_frames_shown: int = 25
    # Functions that mark a thread as serving a request (Flask, werkzeug, gunicorn).
    request_functions: Tuple[str, ...] = (
        "full_dispatch_request", "dispatch_request", "wsgi_app", "handle_request",
        "handle_one_request", "run_wsgi", "preprocess_request", "finalize_request",
    )

    # Workers --------------------------------------------------------------
    recent_requests: int = 50  # per worker, newest first
    series_points: int = 3600  # RSS / fd / connection history per worker, 1 Hz
    starting_grace_s: float = 15.0  # a new pid without data is "starting" this long
    stuck_timeout_fraction: float = 0.5  # older than this x timeout: always stuck
    stuck_p95_multiple: float = 5.0  # older than this x the route's usual p95 ...
    stuck_floor_fraction: float = 0.1  # ... and older than max(this x timeout,
    stuck_floor_min_s: float = 2.0  # ... this): stuck
    stuck_min_route_count: int = 20  # completed requests before a route's p95 is "usual"
    heartbeat_stuck_fraction: float = 0.75  # gunicorn heartbeat older than this x timeout: stuck
    thread_stale_s: float = 30.0  # forget a thread's stack after this long without a sample

    # Churn ----------------------------------------------------------------
    settle_s: float = 3.0  # classify exits once the topology is quiet this long ...
    max_batch_s: float = 10.0  # ... or once the oldest unclassified exit is this old
    reload_fraction: float = 0.5  # "most workers" replaced in one batch: a HUP reload
    timeout_kill_fraction: float = 0.8  # vanished with a request at least this x timeout old
    recycle_fraction: float = 0.8  # vanished idle after this x max_requests: recycled
    crash_lifetime_s: float = 10.0  # a worker that lived less than this was short-lived
    crash_window_s: float = 60.0
    crash_min_exits: int = 5  # short-lived exits within the window: a crash loop
    max_events: int = 500
    max_pending_exits: int = 512

    # Memory and fds -------------------------------------------------------
    leak_warmup_s: float = 45.0  # ignore a worker's first seconds: that growth is warm-up
    leak_min_span_s: float = 60.0
    leak_min_points: int = 40
    leak_window_s: float = 600.0  # the longest window the fit looks at
    leak_min_r2: float = 0.8  # growth must be steady
    leak_flatten_ratio: float = 0.6  # last third's slope vs the whole's: below it, flattening
    leak_min_mb_per_min: float = 2.0
    leak_min_growth_mb: float = 5.0  # over the fitted window
    fd_leak_min_per_min: float = 2.0
    fd_leak_min_growth: float = 10.0
    leak_route_min_corr: float = 0.2  # per-second correlation of a route's requests with growth
    leak_route_delay_s: float = 3.0  # join requests with RSS growth once this settled
    leak_routes_shown: int = 5

    # Slow routes and errors -----------------------------------------------
    slow_min_count: int = 5  # requests in the window before a route can be judged
    slow_abs_p95_ms: float = 1000.0  # p95 past this is slow whatever else
    slow_floor_ms: float = 100.0  # never slow below this p95
    slow_share: float = 0.3  # takes this share of all busy time ...
    slow_util: float = 0.25  # ... while the workers are at least this busy
    slow_rel_multiple: float = 5.0  # p95 this x the typical route's ...
    slow_rel_util: float = 0.1  # ... while the workers are at least this busy
    error_rate_threshold: float = 0.05
    error_min_count: int = 5

    # Problems, sources ----------------------------------------------------
    problem_recent_s: float = 300.0  # a timeout kill or crash loop stays a problem this long
    max_problems: int = 50
    beacon_silent_s: float = 10.0  # in-flight reports come every ~1 s; silence past this is news
    beacon_loss_window_s: float = 60.0
    max_held_datagrams: int = 512  # from unknown pids, kept until the next tick confirms them
