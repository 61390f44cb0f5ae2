#!/usr/bin/env python3
"""Start-time cost of keeping the bytes sled's recovery may rewrite
(src/log/sled/preserve.rs): fills a data directory to --gb with batches of
3.5 KB events (loopback only), then times restarts: the first after the fill
(everything the fill wrote is since the last start), a clean one right after,
and one after a kill -9 during --kill-mb of publishing. For each: time to
/readyz, the bytes kept and the time keeping them took, and sled's open time
(both from the gateway's log). Usage:

    bench/preopen.py --bin target/release/sse-gateway --dir /tmp/pre --gb 1
"""
import argparse, json, os, re, shutil, signal, subprocess, time, urllib.request

PORT = 18977
BASE = f"http://127.0.0.1:{PORT}"
EVENT = {"event": "e", "data": {"pad": "x" * 3500}}


def start(args, log):
    out = open(log, "w")
    p = subprocess.Popen(
        [args.bin, "serve", "--listen", f"127.0.0.1:{PORT}", "--config",
         args.config, "--data-dir", os.path.join(args.dir, "data")],
        stdout=out, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(BASE + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return p, time.monotonic() - t0
        except Exception:
            pass
        if p.poll() is not None:
            raise SystemExit(f"gateway exited: {open(log).read()[-2000:]}")
        time.sleep(0.01)


def publish_mb(mb, topics=16, per_batch=250):
    body_per = len(json.dumps(EVENT)) + 30
    batches = int(mb * 1e6 / (body_per * per_batch)) + 1
    for b in range(batches):
        items = [dict(EVENT, topics=[f"t{(b * per_batch + i) % topics}"]) for i in range(per_batch)]
        req = urllib.request.Request(BASE + "/publish/batch", data=json.dumps({"events": items}).encode(),
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()


def stop(p, kill=False):
    p.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    p.wait()


def figures(log):
    text = open(log).read()
    kept = re.search(r"saved the bytes.*?bytes=(\d+) elapsed_ms=(\d+)", text)
    opened = re.search(r"opened sled log.*?elapsed_ms=(\d+)", text)
    return (int(kept.group(1)) if kept else 0, int(kept.group(2)) if kept else 0,
            int(opened.group(1)) if opened else -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--config", default="config.toml")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--kill-mb", type=float, default=100)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    log = os.path.join(args.dir, "gateway.log")
    p, _ = start(args, log)
    t0 = time.monotonic()
    publish_mb(args.gb * 1000)
    stop(p)
    db = os.path.join(args.dir, "data", "db")
    print(f"filled {os.path.getsize(db) / 1e9:.2f} GB db in {time.monotonic() - t0:.0f} s")
    rows = []
    for name, before in [("first start after the fill", None), ("clean restart", None),
                         (f"after kill -9 ({args.kill_mb:.0f} MB published)", "kill")]:
        if before == "kill":
            p, _ = start(args, log)
            publish_mb(args.kill_mb)
            stop(p, kill=True)
        p, ready = start(args, log)
        kept, kept_ms, open_ms = figures(log)
        stop(p)
        left = [n for n in os.listdir(args.dir) if "pre-open" in n]
        rows.append((name, ready, kept, kept_ms, open_ms, left))
    print(f"{'start':40} {'to /readyz':>10} {'kept':>10} {'keeping':>8} {'sled open':>9}")
    for name, ready, kept, kept_ms, open_ms, left in rows:
        print(f"{name:40} {ready * 1000:8.0f}ms {kept / 1e6:8.1f}MB {kept_ms:6d}ms {open_ms:7d}ms"
              + (f"  LEFT {left}" if left else ""))


if __name__ == "__main__":
    main()
