// A real third-party SSE client for the gateway's integration tests
// (tests/gateway/third_party.rs): the `eventsource` package (the WHATWG
// EventSource for Node), which reconnects by itself and resumes with the
// `Last-Event-ID` header.
//
//   node follow.mjs URL [EVENT_NAME...]
//
// Prints one JSON object per line on stdout:
//   {"open":true}                                    on every (re)open
//   {"id":"<lastEventId>","event":"<type>","data":"<data text>"}
//                                                    per event (`message`, `reset`
//                                                    and every EVENT_NAME given)
//   {"error":true,"readyState":N,"message":...,"code":...}
//                                                    on every error (readyState 0:
//                                                    reconnecting; 2: given up)
// It never exits on its own: the test kills it.
import { EventSource } from "eventsource";

const [url, ...names] = process.argv.slice(2);
if (!url) {
  process.stderr.write("usage: node follow.mjs URL [EVENT_NAME...]\n");
  process.exit(2);
}

const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

const source = new EventSource(url);
source.addEventListener("open", () => print({ open: true }));
source.addEventListener("error", (e) =>
  print({
    error: true,
    readyState: source.readyState,
    message: e.message ?? null,
    code: e.code ?? null,
  }),
);
for (const name of new Set(["message", "reset", ...names])) {
  source.addEventListener(name, (e) => print({ id: e.lastEventId, event: e.type, data: e.data }));
}

// Stay alive even if the EventSource gives up (the test decides when to stop).
setInterval(() => {}, 1 << 30);
