// The gateway's browser client (`GET /client.js`) with `shareAcrossTabs`, in
// several tabs of one headless Chromium context, for tests/gateway/browser.rs.
// A tiny static server (node's http module) on 127.0.0.1:<free port> serves
// one page that imports `<gateway>/client.js` and records what it delivers;
// that origin stays the same while the gateway is killed and restarted, so
// the tabs keep their localStorage, Web Locks and BroadcastChannel.
// Protocol: see lib.mjs.
//
//   node browser/shared.mjs
//
// Prints {"origin":"http://127.0.0.1:<port>"} first (the gateway's
// [cors] allowed_origins needs it), then {"ready":true}.
// Commands (besides screenshot/wait):
//   {"cmd":"open","n":5,"gateway":"http://…","topics":"a,b","throws":false,"from":null}
//                                     opens n tabs, one after the other, each
//                                     loaded and subscribed (with `throws`, its
//                                     onEvent throws after recording the event;
//                                     `from`: the client's option)
//   {"cmd":"rewind","tab":2,"id":"…"}  sets the shared last id in localStorage
//                                     back to an older id (a stale view)
//   {"cmd":"close","tab":2}           closes tab 2 (the page goes: its lock is released)
//   {"cmd":"snippet","n":2,"code":"import …"}  opens n tabs running `code` (a
//                                     README snippet) as a module, after stubs
//                                     applyUpdate/refetchEverything/showState
//                                     that record their calls
//   {"cmd":"new_leader","timeout_ms":3000}
//                                     waits for one open tab to lead; answers
//                                     {"tab", "ms"} (ms since the last close)
// State: {"tabs":[{tab, leader, ids, resets, states, errors, calls}]} for the open tabs.
import { createServer } from "node:http";
import { launch, print, run } from "./lib.mjs";

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>shared stream</title></head>
<body><pre id="log"></pre>
<script type="module">
const params = new URLSearchParams(location.search);
window.got = [];
window.resets = [];
window.states = [];
window.errors = [];
try {
  const { subscribe } = await import(params.get("gateway") + "/client.js");
  window.sub = subscribe(params.get("topics").split(","), {
    shareAcrossTabs: true,
    ...(params.has("from") ? { from: params.get("from") } : {}),
    onEvent: (e) => {
      got.push(e.id);
      document.getElementById("log").append(e.id + " " + e.event + " " + e.text + "\\n");
      // An app bug: the stream must go on.
      if (params.get("throw")) throw new Error("app handler failed on " + e.id);
    },
    onReset: (info, id) => resets.push({ ...info, id }),
    onState: (s) => states.push(s),
  });
} catch (error) {
  errors.push(String(error));
}
</script></body></html>`;

// A README snippet's page: stubs, then the snippet (/snippet.mjs) as a module.
const SNIPPET_PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>snippet</title></head><body>
<script type="module">
window.calls = [];
window.errors = [];
window.applyUpdate = (data) => calls.push({ applyUpdate: data });
window.refetchEverything = () => calls.push({ refetchEverything: true });
window.showState = (state) => calls.push({ state });
try {
  await import("/snippet.mjs");
  window.loaded = true;
} catch (error) {
  errors.push(String(error));
}
</script></body></html>`;
let snippet = "";

const server = createServer((request, response) => {
  const path = new URL(request.url, "http://x").pathname;
  const answer = { "/shared.html": ["text/html", PAGE], "/snippet.html": ["text/html", SNIPPET_PAGE],
    "/snippet.mjs": ["text/javascript", snippet] }[path];
  if (!answer) {
    response.writeHead(404).end("not found");
    return;
  }
  response.writeHead(200, { "content-type": `${answer[0]}; charset=utf-8`, "cache-control": "no-store" }).end(answer[1]);
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const origin = `http://127.0.0.1:${server.address().port}`;
print({ origin });

const browser = await launch();
const { context } = browser;
// Tab number -> page; closed tabs are removed.
const tabs = new Map();
let nextTab = 0;
let lastClose = 0;

const watch = (page, tab) => {
  page.on("pageerror", (error) => print({ page_error: `tab ${tab}: ${error && error.message ? error.message : error}` }));
  page.on("console", (message) => {
    if (message.type() === "error") print({ console: "error", text: `tab ${tab}: ${message.text()}` });
  });
};

/** Opens `n` tabs on `url`, one after the other, each loaded and subscribed. */
async function openTabs(n, url) {
  const opened = [];
  for (let i = 0; i < n; i += 1) {
    // The first tab of the persistent context is reused.
    const page = tabs.size === 0 && nextTab === 0 && context.pages()[0] ? context.pages()[0] : await context.newPage();
    const tab = nextTab;
    nextTab += 1;
    if (page !== browser.page) watch(page, tab);
    await page.goto(url, { waitUntil: "load" });
    await page.waitForFunction(() => window.sub || window.loaded || window.errors.length, null, { timeout: 5000 });
    tabs.set(tab, page);
    opened.push(tab);
  }
  return { tabs: opened };
}

const handlers = {
  screenshot: async ({ path }) => {
    const [page] = tabs.values();
    await page.screenshot({ path, fullPage: false });
    return { path };
  },
  wait: async ({ ms }) => {
    await new Promise((resolve) => setTimeout(resolve, ms));
    return {};
  },
  open: async ({ n, gateway, topics, throws, from }) => openTabs(n,
    `${origin}/shared.html?gateway=${encodeURIComponent(gateway)}&topics=${encodeURIComponent(topics)}`
      + `${throws ? "&throw=1" : ""}${from ? `&from=${encodeURIComponent(from)}` : ""}`),
  snippet: async ({ n, code }) => {
    snippet = code;
    return openTabs(n, `${origin}/snippet.html`);
  },
  rewind: async ({ tab, id }) => {
    // What a tab sees when another renderer's localStorage write has not
    // reached it yet (Chromium propagates them asynchronously).
    const page = tabs.get(tab);
    if (!page) throw new Error(`no open tab ${tab}`);
    return page.evaluate((id) => {
      const keys = Object.keys(localStorage).filter((k) => k.startsWith("sse-gateway:"));
      for (const key of keys) localStorage.setItem(key, id);
      return { keys };
    }, id);
  },
  close: async ({ tab }) => {
    const page = tabs.get(tab);
    if (!page) throw new Error(`no open tab ${tab}`);
    tabs.delete(tab);
    lastClose = Date.now();
    await page.close();
    return { tab };
  },
  new_leader: async ({ timeout_ms }) => {
    const until = Date.now() + (timeout_ms || 3000);
    for (;;) {
      for (const [tab, page] of tabs) {
        if (await page.evaluate(() => Boolean(window.sub && window.sub.leader))) return { tab, ms: Date.now() - lastClose };
      }
      if (Date.now() > until) throw new Error("no tab leads");
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  },
};

// What every open tab delivered (the snapshot lib.mjs polls and prints).
const all = {
  evaluate: async () => {
    const out = [];
    for (const [tab, page] of tabs) {
      try {
        out.push({
          tab,
          ...(await page.evaluate(() => ({
            leader: Boolean(window.sub && window.sub.leader),
            ids: window.got,
            resets: window.resets,
            states: window.states,
            errors: window.errors,
            calls: window.calls,
          }))),
        });
      } catch {
        // closing
      }
    }
    return { tabs: out };
  },
};

print({ ready: true });
await run({ page: all, close: browser.close }, handlers, null);
server.close();
