#!/usr/bin/env python3
# A/B of the idempotency key's cost: POST /publish/batch of 100 events, plain vs keyed, alternating.
import json, time, urllib.request, re, sys
base = sys.argv[1]
def metrics():
    t = urllib.request.urlopen(base + "/metrics").read().decode()
    s = float(re.search(r'^sse_gateway_commit_duration_seconds_sum (\S+)', t, re.M).group(1))
    c = float(re.search(r'^sse_gateway_commit_duration_seconds_count (\S+)', t, re.M).group(1))
    return s, c
pad = "x" * 200
def run(keyed, n, tag):
    s0, c0 = metrics(); t0 = time.time()
    for r in range(n):
        items = []
        for i in range(100):
            it = {"topics": ["bench"], "data": {"r": r, "i": i, "pad": pad}}
            if keyed: it["idempotency_key"] = f"{tag}-{r}-{i}"
            items.append(it)
        req = urllib.request.Request(base + "/publish/batch", data=json.dumps({"events": items}).encode(),
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req).read()
    el = time.time() - t0; s1, c1 = metrics()
    print("keyed" if keyed else "plain", f"events_per_s={n*100/el:.0f}", f"request_ms={el/n*1000:.2f}",
          f"commit_ms={(s1-s0)/(c1-c0)*1000:.2f}")
for k in range(3):
    run(False, 100, ""); run(True, 100, f"t{k}")
