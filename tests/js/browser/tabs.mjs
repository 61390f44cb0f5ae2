// Many tabs of one headless Chromium context, each with its OWN EventSource
// on the gateway's `/events` (no sharing), for tests/gateway/browser.rs: over
// HTTPS the browser negotiates HTTP/2 and every stream rides one connection;
// over HTTP/1.1 it opens at most 6 connections per origin and the 7th tab's
// stream waits for one.
// A tiny static server (node's http module) on 127.0.0.1:<free port> serves
// the page, so the gateway is another origin (its CORS config allows this one).
// Protocol: see lib.mjs.
//
//   node browser/tabs.mjs [--h1] [--cert <the gateway's cert.pem>]
//
// --h1 starts Chromium with --disable-http2 (HTTP/1.1 to every origin).
// --cert makes Chromium trust that certificate (the test made it) by its
// public key (--ignore-certificate-errors-spki-list, the SHA-256 of its
// SubjectPublicKeyInfo): a valid certificate to the browser, not an error
// it clicks through.
//
// Prints {"origin":"http://127.0.0.1:<port>"} first, then {"ready":true}.
// Commands:
//   {"cmd":"open","n":20,"gateway":"https://…","topics":["a,b","b,c",…]}
//                       opens n tabs, one after the other, tab i on
//                       /events?topic=… of topics[i] (each loaded, its
//                       EventSource created; not necessarily open)
// State: {"tabs":[{tab, open, got, errors, protocol}]}: `open` once its
// EventSource opened, `got` the "<id> <data>" of every `tick` event in
// order, `protocol` what the browser's network stack says the stream's
// response came over ("h2", "http/1.1"; DevTools protocol
// Network.responseReceived: Resource Timing hides it across origins).
import { createHash, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { launch, print, run } from "./lib.mjs";

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>tab</title></head>
<body><pre id="log"></pre>
<script type="module">
const params = new URLSearchParams(location.search);
window.got = [];
window.opened = false;
window.errors = 0;
const query = params.get("topics").split(",").map((t) => "topic=" + encodeURIComponent(t)).join("&");
window.source = new EventSource(params.get("gateway") + "/events?" + query);
source.onopen = () => { window.opened = true; };
source.onerror = () => { window.errors += 1; };
source.addEventListener("tick", (e) => {
  got.push(e.lastEventId + " " + e.data);
  document.getElementById("log").append(e.lastEventId + " " + e.data + "\\n");
});
</script></body></html>`;

const args = process.argv.slice(2);
const flags = [];
if (args.includes("--h1")) flags.push("--disable-http2");
const cert = args.indexOf("--cert");
if (cert >= 0) {
  const key = new X509Certificate(readFileSync(args[cert + 1])).publicKey.export({ type: "spki", format: "der" });
  flags.push(`--ignore-certificate-errors-spki-list=${createHash("sha256").update(key).digest("base64")}`);
}

const server = createServer((request, response) => {
  if (new URL(request.url, "http://x").pathname !== "/tab.html") {
    response.writeHead(404).end("not found");
    return;
  }
  response.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" }).end(PAGE);
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const origin = `http://127.0.0.1:${server.address().port}`;
print({ origin });

const browser = await launch(flags);
const { context } = browser;
const tabs = [];
// Tab -> the protocol of its /events response.
const protocols = new Map();

const handlers = {
  open: async ({ n, gateway, topics }) => {
    for (let i = 0; i < n; i += 1) {
      const page = tabs.length === 0 && context.pages()[0] ? context.pages()[0] : await context.newPage();
      const tab = tabs.length;
      page.on("pageerror", (error) => print({ page_error: `tab ${tab}: ${error && error.message ? error.message : error}` }));
      const devtools = await context.newCDPSession(page);
      devtools.on("Network.responseReceived", ({ response }) => {
        if (response.url.startsWith(`${gateway}/events?`)) protocols.set(tab, response.protocol);
      });
      await devtools.send("Network.enable");
      const url = `${origin}/tab.html?gateway=${encodeURIComponent(gateway)}&topics=${encodeURIComponent(topics[i])}`;
      await page.goto(url, { waitUntil: "load" });
      await page.waitForFunction(() => Boolean(window.source), null, { timeout: 5000 });
      tabs.push(page);
    }
    return { tabs: tabs.length };
  },
};

const all = {
  evaluate: async () => {
    const out = [];
    for (const [tab, page] of tabs.entries()) {
      try {
        const shown = await page.evaluate(() => ({ open: window.opened, got: window.got, errors: window.errors }));
        out.push({ tab, ...shown, protocol: protocols.get(tab) || null });
      } catch {
        // loading
      }
    }
    return { tabs: out };
  },
};

print({ ready: true });
await run({ page: all, close: browser.close }, handlers, null);
server.close();
