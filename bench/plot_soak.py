#!/usr/bin/env python3
"""Plots a soak run (bench/soak.sh output) and prints its figures.

    python3 bench/plot_soak.py bench/soak-<stamp>.txt [bench/soak.svg]

Writes a hand-written SVG (no third-party packages): three panels over time,
the gateway's RSS (MiB), its open fds, and the size of its data dir (MiB),
with the warm-up shaded. Prints the figures as `key=value` lines.

Warm-up: the first 10 minutes (the first third of a run shorter than 30
minutes). By then sled's 16 MiB page cache has long been full (about 1 MiB/s
is written), the live ring and the retention window (5,000 events per topic)
are full, and every kind of client has connected, left and resumed many
times. "Flat" is judged on the samples after it and up to the end of
publishing (the drain after it, while the last streams catch up, is drawn
but not judged): the spread is the largest distance of a sample from their
mean, in % of the mean; the slope is a least-squares line through them.
The level is also given apart from what single samples catch in flight:
the medians of consecutive 5-minute windows (their largest distance from
the mean) and the fitted line's rise over the judged span.
"""

import sys

WARMUP_S = 600.0
# The window whose median is the RSS "level" (see figures()).
WINDOW_S = 300.0


def fields(line):
    out = {}
    for part in line.split():
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read(path):
    samples, baseline, after, summary = [], None, None, {}
    memory = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("soak: "):
                summary.update(run_duration_s=fields(line).get("duration_s"))
            elif line.startswith("sample "):
                samples.append(fields(line))
            elif line.startswith("memory "):
                memory.append(fields(line))
            elif line.startswith("baseline "):
                baseline = fields(line)
            elif line.startswith("after_exit "):
                after = fields(line)
            elif line.startswith("summary "):
                summary.update(fields(line))
    return samples, baseline, after, summary, memory


def linreg(xs, ys):
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def figures(samples, baseline, after, summary, memory):
    load = [s for s in samples if s.get("phase") in ("load", "end") and num(s.get("rss_kib"))]
    duration = num(summary.get("run_duration_s")) or max((num(s["t"]) for s in load), default=0.0)
    warmup = WARMUP_S if duration >= 3 * WARMUP_S else duration / 3
    steady = [s for s in load if warmup <= num(s["t"]) <= duration + 1]
    rss = [num(s["rss_kib"]) / 1024 for s in steady]
    ts = [num(s["t"]) for s in steady]
    fig = {"warmup_s": round(warmup), "publishing_s": round(duration)}
    if rss:
        mean = sum(rss) / len(rss)
        fig.update(
            rss_after_warmup_mib=round(rss[0], 1),
            rss_min_mib=round(min(rss), 1),
            rss_max_mib=round(max(rss), 1),
            rss_last_mib=round(rss[-1], 1),
            rss_mean_mib=round(mean, 1),
            rss_spread_pct=round(max(max(rss) - mean, mean - min(rss)) / mean * 100, 2),
            rss_slope_mib_per_h=round(linreg(ts, rss) * 3600, 1),
            samples_after_warmup=len(rss),
        )
        # The level, apart from what one sample catches in flight: medians
        # of consecutive 5-minute windows, and the fitted line's rise over
        # the judged span, each in % of the mean.
        window = max(1, round(WINDOW_S / max(ts[1] - ts[0], 1))) if len(ts) > 1 else 1
        medians = [sorted(rss[i:i + window])[len(rss[i:i + window]) // 2]
                   for i in range(0, len(rss) - window + 1, window)]
        if medians:
            fig.update(
                rss_window_medians_mib=",".join(f"{m:.1f}" for m in medians),
                rss_window_median_spread_pct=round(
                    max(max(medians) - mean, mean - min(medians)) / mean * 100, 2),
            )
        fig["rss_fitted_change_pct"] = round(linreg(ts, rss) * (ts[-1] - ts[0]) / mean * 100, 2)
        within = sum(1 for v in rss if abs(v - mean) <= 0.05 * mean)
        fig["rss_samples_within_5pct"] = f"{within}/{len(rss)}"
    # The gateway's own memory figures (bench/soak.sh samples /metrics):
    # jemalloc's allocated bytes move with RSS when RSS is live data.
    heap = [num(m.get("heap_allocated_kib")) / 1024 for m in memory
            if num(m.get("heap_allocated_kib")) is not None and warmup <= num(m["t"]) <= duration + 1]
    if heap:
        hmean = sum(heap) / len(heap)
        fig.update(
            heap_allocated_mean_mib=round(hmean, 1),
            heap_allocated_min_mib=round(min(heap), 1),
            heap_allocated_max_mib=round(max(heap), 1),
            heap_allocated_spread_pct=round(max(max(heap) - hmean, hmean - min(heap)) / hmean * 100, 2),
        )
    fds = [num(s["fds"]) for s in load if num(s.get("fds")) is not None]
    fig["fds_baseline"] = baseline.get("fds") if baseline else "na"
    start = next((s for s in samples if s.get("phase") == "start"), None)
    fig["fds_start"] = start.get("fds") if start else "na"
    if fds:
        fig["fds_load_min"] = int(min(fds))
        fig["fds_load_max"] = int(max(fds))
    last_load = [s for s in samples if s.get("phase") == "load"]
    fig["fds_last_load"] = last_load[-1].get("fds") if last_load else "na"
    end = next((s for s in samples if s.get("phase") == "after"), None)
    fig["fds_after_streams_closed"] = end.get("fds") if end else "na"
    fig["fds_after_exit"] = after.get("fds") if after else "na"
    fig["rss_after_exit_mib"] = round(num(after["rss_kib"]) / 1024, 1) if after else "na"
    data = [num(s.get("data_kib")) for s in steady if num(s.get("data_kib")) is not None]
    if data:
        fig["data_min_mib"] = round(min(data) / 1024, 1)
        fig["data_max_mib"] = round(max(data) / 1024, 1)
        fig["data_last_mib"] = round(data[-1] / 1024, 1)
    if summary:
        for k in ("published", "delivered", "gaps", "dups", "unexpected", "resets",
                  "reconnects", "drops", "errors", "missing_at_end", "not_caught_up"):
            fig[k] = summary.get(k, "na")
    return fig, warmup, duration


def esc(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def nice_max(v):
    if v <= 0:
        return 1.0
    step = 10 ** len(str(int(v))) / 10
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * step:
            return m * step
    return 10 * step


def panel(out, y0, h, title, series, color, t_max, warmup, x0, w, stop=None, band=None, extra=None):
    """One panel; `band` = (mean, from_t, to_t) draws mean ±5 % over that span;
    `stop` = when publishing stopped (a dashed vertical line); `extra` = a
    second series drawn grey (jemalloc's allocated bytes under RSS)."""
    vals = [v for _, v in series] + [v for _, v in (extra or [])]
    top = nice_max(max(vals) * 1.1) if vals else 1.0
    out.append(f'<text x="{x0}" y="{y0 - 8}" font-size="13" font-weight="bold">{esc(title)}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="white" stroke="#888"/>')
    if warmup > 0 and t_max > 0:
        ww = w * min(warmup / t_max, 1)
        out.append(f'<rect x="{x0}" y="{y0}" width="{ww:.1f}" height="{h}" fill="#eee"/>')
        out.append(f'<text x="{x0 + 4}" y="{y0 + 14}" font-size="11" fill="#777">warm-up</text>')
    for i in range(5):
        v = top * i / 4
        y = y0 + h - h * i / 4
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#ddd"/>')
        label = f"{v:.0f}" if top >= 10 else f"{v:.1f}"
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    if band:
        mean, t0, t1 = band
        bx0, bx1 = x0 + w * t0 / t_max, x0 + w * min(t1, t_max) / t_max
        yhi, ylo = y0 + h - h * mean * 1.05 / top, y0 + h - h * mean * 0.95 / top
        ym = y0 + h - h * mean / top
        out.append(f'<rect x="{bx0:.1f}" y="{yhi:.1f}" width="{bx1 - bx0:.1f}" height="{ylo - yhi:.1f}" fill="#f5b7b1" fill-opacity="0.45"/>')
        out.append(f'<line x1="{bx0:.1f}" y1="{ym:.1f}" x2="{bx1:.1f}" y2="{ym:.1f}" stroke="#922b21" stroke-dasharray="5,4"/>')
        out.append(f'<text x="{bx1 - 4:.1f}" y="{yhi - 4:.1f}" font-size="11" text-anchor="end" fill="#922b21">mean ±5 %</text>')
    if stop is not None and 0 < stop < t_max:
        sx = x0 + w * stop / t_max
        out.append(f'<line x1="{sx:.1f}" y1="{y0}" x2="{sx:.1f}" y2="{y0 + h}" stroke="#555" stroke-dasharray="3,3"/>')
        out.append(f'<text x="{sx - 4:.1f}" y="{y0 + 14}" font-size="11" text-anchor="end" fill="#555">publishing stops</text>')
    if extra:
        epts = " ".join(f"{x0 + w * t / t_max:.1f},{y0 + h - h * v / top:.1f}" for t, v in extra)
        out.append(f'<polyline points="{epts}" fill="none" stroke="#888" stroke-width="1.2" stroke-dasharray="4,2"/>')
        out.append(f'<text x="{x0 + w - 4}" y="{y0 + h - 6}" font-size="11" text-anchor="end" fill="#888">grey dashed: heap allocated (jemalloc)</text>')
    pts = " ".join(
        f"{x0 + w * t / t_max:.1f},{y0 + h - h * v / top:.1f}" for t, v in series
    )
    out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.8"/>')
    for t, v in series:
        out.append(f'<circle cx="{x0 + w * t / t_max:.1f}" cy="{y0 + h - h * v / top:.1f}" r="1.8" fill="{color}"/>')


def svg(samples, baseline, after, fig, warmup, stop, title, memory):
    load = [s for s in samples if s.get("phase") in ("start", "load", "end", "after")]
    t_max = max((num(s["t"]) for s in load), default=1.0) or 1.0
    x0, w, h, gap = 70, 780, 150, 60
    height = 60 + 3 * (h + gap) + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="900" height="{height}" '
        f'font-family="sans-serif" viewBox="0 0 900 {height}">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="450" y="24" font-size="15" text-anchor="middle" font-weight="bold">{esc(title)}</text>',
    ]
    rss = [(num(s["t"]), num(s["rss_kib"]) / 1024) for s in load if num(s.get("rss_kib"))]
    fds = [(num(s["t"]), num(s["fds"])) for s in load if num(s.get("fds")) is not None]
    data = [(num(s["t"]), num(s["data_kib"]) / 1024) for s in load if num(s.get("data_kib")) is not None]
    y = 60
    spread = fig.get("rss_spread_pct", "na")
    band = (fig["rss_mean_mib"], warmup, stop) if "rss_mean_mib" in fig else None
    heap = [(num(m["t"]), num(m["heap_allocated_kib"]) / 1024) for m in memory
            if num(m.get("heap_allocated_kib")) is not None and num(m["t"]) <= t_max]
    panel(out, y, h, f"Gateway RSS (MiB) — after warm-up: ±{spread} % around the mean, slope {fig.get('rss_slope_mib_per_h', 'na')} MiB/h",
          rss, "#c0392b", t_max, warmup, x0, w, stop=stop, band=band, extra=heap)
    y += h + gap
    panel(out, y, h, f"Gateway open fds — baseline {fig['fds_baseline']}, under load {fig.get('fds_load_max', 'na')}, after the clients left {fig['fds_after_exit']}",
          fds, "#2e86c1", t_max, warmup, x0, w, stop=stop)
    y += h + gap
    panel(out, y, h, "Data dir (MiB): retention 5,000 events per topic", data, "#27ae60", t_max, warmup, x0, w, stop=stop)
    # Time axis under the last panel (minutes).
    axis_y = y + h
    step = 10 if t_max > 1800 else (1 if t_max < 600 else 5)
    m = 0
    while m * 60 <= t_max + 1:
        x = x0 + w * m * 60 / t_max
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 18}" font-size="11" text-anchor="middle">{m}</text>')
        m += step
    out.append(f'<text x="{x0 + w / 2}" y="{axis_y + 34}" font-size="12" text-anchor="middle">minutes</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    dest = sys.argv[2] if len(sys.argv) > 2 else "bench/soak.svg"
    samples, baseline, after, summary, memory = read(path)
    if not samples:
        sys.exit(f"no sample lines in {path}")
    fig, warmup, stop = figures(samples, baseline, after, summary, memory)
    minutes = max(num(s["t"]) for s in samples) / 60
    title = f"sse-gateway soak, {minutes:.0f} min ({path.rsplit('/', 1)[-1]})"
    with open(dest, "w", encoding="utf-8") as f:
        f.write(svg(samples, baseline, after, fig, warmup, stop, title, memory))
    for k, v in fig.items():
        print(f"{k}={v}")
    print(f"svg={dest}")


if __name__ == "__main__":
    main()
