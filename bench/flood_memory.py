"""What a flood of beacon datagrams costs flasktop's engine: memory, losses, snapshot gaps.

Runs the scenario of tests/faults/test_flood.py (issue 5, scenario 9) and prints its
figures instead of asserting them: a real gunicorn whose first three workers are flood
senders (the real ``Encoder``, their own pids: tests/fixtures/hostile_flood_conf.py), its
fourth serving the app with the real beacon while this script makes requests; the engine in
a process of its own (tests/fixtures/hostile_engine.py, ``Engine.start`` as the CLI runs it,
py-spy off). Phase 1: EVENTS completed requests, each with a route name of its own. Phase 2:
the engine process is stopped (SIGSTOP) while the senders send BURST datagrams as fast as
they can, then continued: far above what the listener can take.

For each listener event cap (``--caps``; 0 is flasktop's default) it prints the engine's RSS
before, after phase 1 and at the end, the largest RSS seen, the largest listener backlog
(datagrams, events), the routes kept and the overflow estimate, every loss counter, the real
route's count against the requests made, and the gaps between snapshots as a multiple of the
refresh (outside the stop). It also measures what one decoded event costs (tracemalloc), which
with the caps gives the bound the RSS is held to.

Bounded: sizes are capped below, every wait has a deadline, all processes are killed by pid.

    .venv/bin/python bench/flood_memory.py [--events 1000000] [--burst 15000] [--caps 0,50000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flasktop.protocol import Encoder, decode  # noqa: E402
from flasktop.sources.listener import DEFAULT_BACKLOG, DEFAULT_BACKLOG_EVENTS  # noqa: E402
from tests.faults.test_flood import REAL, run_flood  # noqa: E402

MB = 1 << 20


def bytes_per_event(distinct: bool, n: int = 50_000) -> float:
    enc = Encoder(4242)
    route = (lambda k: f"/flood/1/{k}") if distinct else (lambda k: "/orders/<int:oid>")
    rows = [[route(k), "flood", "GET", 200, 1000 + k % 5000, 100, "", 1001, 0] for k in range(n)]
    data = enc.requests(int(time.time() * 1000), rows)
    tracemalloc.start()
    kept = [decode(d) for d in data]
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(kept) == len(data)
    return cur / n


def report(cap: int, r: dict) -> None:
    lines = r["lines"]
    before, after1, final = r["before"], r["after1"], r["final"]
    s0, s1 = r["stopped"]
    refresh = r["refresh"]
    gaps = [b["mono"] - a["mono"] for a, b in zip(lines, lines[1:]) if not (a["mono"] <= s1 and b["mono"] >= s0)]
    in1 = [b["mono"] - a["mono"] for a, b in zip(lines, lines[1:])
           if a["mono"] >= r["phase1_t"][0] and b["mono"] <= r["phase1_t"][1] + 5]
    sent1 = sum(d["datagrams"] for d in r["sent1"])
    events1 = sum(d["events"] for d in r["sent1"])
    sent2 = sum(d["datagrams"] for d in r["sent2"])
    sent2 += sum(d["datagrams"] for d in r.get("sent3") or [])  # one tail datagram per sender
    lst = final["listener"]
    print(f"\nlistener event cap {cap or final['backlog_events_cap']:,}"
          f"{' (default)' if not cap else ''}, datagram cap {final['backlog_cap']:,}")
    print(f"  phase 1: {events1:,} events with distinct route names in {sent1:,} datagrams, "
          f"{r['phase1_s']:.1f} s ({events1 / r['phase1_s']:,.0f} events/s offered)")
    print(f"  phase 2: {sent2:,} datagrams while the engine was stopped {s1 - s0:.1f} s")
    print(f"  engine RSS: before {before['rss'] / MB:.1f} MB, after phase 1 {after1['rss'] / MB:.1f} MB, "
          f"end {final['rss'] / MB:.1f} MB, largest {max(s['rss'] for s in lines) / MB:.1f} MB; "
          f"engine CPU {final['cpu']:.1f} s")
    print(f"  listener backlog peak: {max(s['backlog_max'] for s in lines):,} datagrams, "
          f"{max(s['backlog_events_max'] for s in lines):,} events; engine inbox peak "
          f"{max(s['inbox_max'] for s in lines):,}")
    print(f"  routes kept {final['routes']} (cap {final['max_routes']} + <other>); overflow estimate "
          f"after phase 1 {after1['routes_dropped']:,} for {events1 - final['max_routes'] + 2:,} names past "
          f"the cap sent (fewer were folded if the backlog dropped any), at the end "
          f"{final['routes_dropped']:,}")
    print(f"  received {lst['received']:,}, kernel drops {lst['kernel_drops']:,}, lost (seq gaps) "
          f"{lst['lost']:,}, dropped from the backlog {lst['dropped_backlog']:,}; "
          f"received + kernel drops - sent = {lst['received'] + (lst['kernel_drops'] or 0) - sent1 - sent2} "
          f"(the real beacon's own datagrams)")
    print(f"  real route {REAL}: {after1['counts'][REAL]:,} counted of {r['made1']:,} requests made "
          f"during phase 1 (losses then: lost {after1['listener']['lost']}, kernel "
          f"{after1['listener']['kernel_drops']}, backlog {after1['listener']['dropped_backlog']})")
    print(f"  snapshot gaps (refresh {refresh:g} s, outside the stop): max {max(gaps) / refresh:.1f}x, "
          f"median {statistics.median(gaps) / refresh:.2f}x; during phase 1 max "
          f"{max(in1) / refresh if in1 else float('nan'):.1f}x; beacon state at the end: "
          f"{final['beacon']['state']} ({final['beacon']['detail']})")
    print(f"  model stores at the end: {final['sizes']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000, help="phase 1 events (max 3,000,000)")
    p.add_argument("--burst", type=int, default=15_000, help="phase 2 datagrams (max 100,000)")
    p.add_argument("--rate", type=float, default=0, help="phase 1 events/s in all (0: as fast as sent)")
    p.add_argument("--caps", default="0", help="listener event caps to try, comma-separated; 0 = default")
    a = p.parse_args()
    events = max(1, min(a.events, 3_000_000))
    burst = max(0, min(a.burst, 100_000))
    print(f"decoded event size (tracemalloc): {bytes_per_event(True):.0f} bytes with distinct route "
          f"names, {bytes_per_event(False):.0f} with one route; listener caps {DEFAULT_BACKLOG:,} "
          f"datagrams and {DEFAULT_BACKLOG_EVENTS:,} events by default")
    for cap in [int(c) for c in a.caps.split(",") if c.strip()]:
        with tempfile.TemporaryDirectory() as d:
            r = run_flood(Path(d), events=events, burst=burst, rate=a.rate, backlog_events=cap)
        report(cap, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
