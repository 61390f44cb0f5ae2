#!/usr/bin/env python3
"""Medians and ratios of bench/compare.sh's raw `summary` lines.

Usage: python3 bench/table.py results.txt

Each line is `round=N name=SCENARIO summary scenario=… label=ours|nchan k=v …`.
For every scenario the table shows the median over rounds of its headline
figure for both servers, ours ÷ Nchan, the issue's target, and the summed
correctness counters (gaps, duplicates, out-of-order, unexpected, resets,
stream errors: all must be 0; a failed or incomplete run shows here too).
"""
import statistics
import sys

# scenario -> (figure key, unit, target text, higher is better)
FIGURES = [
    ("publish", "events_per_s", "events/s (durable vs memory)", ">= 1.5x", True),
    ("fanout", "deliveries_per_s", "deliveries/s, 1,000 subscribers", ">= 5x", True),
    ("latency10", "e2e_p99_ms", "e2e p99 ms at 10 events/s", "<= 0.2x and < 5 ms", False),
    ("latency10", "e2e_p50_ms", "e2e p50 ms at 10 events/s", "", False),
    ("latency1000", "e2e_p99_ms", "e2e p99 ms at 1,000 events/s", "<= 0.2x and < 5 ms", False),
    ("latency1000", "e2e_p50_ms", "e2e p50 ms at 1,000 events/s", "", False),
    ("latency1000", "events_per_s", "events/s actually delivered at 1,000 events/s", "", True),
    ("idle", "bytes_per_stream", "server bytes per idle stream (10,000)", "<= 0.5x", False),
    ("idlemax", "bytes_per_stream", "server bytes per idle stream (19,000)", "<= 0.5x", False),
    ("idlemax", "streams", "idle streams held (19,000 asked)", "", True),
    ("replay", "replay_events_per_s", "replay events/s (one client)", ">= 100x", True),
    ("replay", "fill_events_per_s", "replay fill, events/s (32 publishers)", "", True),
    ("storm", "secs", "storm: s until all caught up", "all caught up", False),
    ("storm", "catchup_p99_ms", "storm: per-client catch-up p99 ms", "", False),
    ("storm", "caught_up", "storm: clients caught up", "", True),
]
CHECKS = ["gaps", "dups", "out_of_order", "unexpected", "resets", "stream_errors", "failed"]


def parse(path):
    runs = []
    for line in open(path):
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        runs.append(fields)
    return runs


def num(value):
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return None if v != v else v  # NaN: the run did not finish


def main():
    runs = parse(sys.argv[1])
    print("| scenario | figure | ours (median) | Nchan (median) | ours ÷ Nchan | target | rounds | checks ours / Nchan |")
    print("|---|---|---|---|---|---|---|---|")
    for name, key, what, target, _higher in FIGURES:
        medians = {}
        checks = {}
        rounds = 0
        for label in ("ours", "nchan"):
            mine = [r for r in runs if r.get("name") == name and r.get("label") == label]
            rounds = max(rounds, len(mine))
            values = [v for v in (num(r.get(key)) for r in mine) if v is not None]
            medians[label] = statistics.median(values) if values else None
            bad = sum(num(r.get(c)) or 0 for r in mine for c in CHECKS)
            checks[label] = int(bad)
        ours, theirs = medians["ours"], medians["nchan"]
        ratio = f"{ours / theirs:.2f}x" if ours is not None and theirs else "n/a"
        fmt = lambda v: "n/a" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")
        print(f"| {name} | {what} | {fmt(ours)} | {fmt(theirs)} | {ratio} | {target} | {rounds} | {checks['ours']} / {checks['nchan']} |")


if __name__ == "__main__":
    main()
