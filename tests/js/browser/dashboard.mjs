// examples/projects-dashboard in headless Chromium, served from its own origin
// by a tiny static server (node's http module) on 127.0.0.1:<free port>, for
// tests/gateway/browser.rs. Protocol: see lib.mjs.
//
//   node browser/dashboard.mjs
//
// Prints {"origin":"http://127.0.0.1:<port>"} first (the gateway's
// [cors] allowed_origins needs it), then {"ready":true}.
// Commands: screenshot/goto/reload/wait (lib.mjs). State: what the page shows.
import { readFile } from "node:fs/promises";
import { createServer } from "node:http";
import { extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { common, launch, print, run } from "./lib.mjs";

const ROOT = fileURLToPath(new URL("../../../examples/projects-dashboard/", import.meta.url));
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".md": "text/plain; charset=utf-8" };

const server = createServer(async (request, response) => {
  const path = decodeURIComponent(new URL(request.url, "http://x").pathname);
  const file = normalize(join(ROOT, path === "/" ? "index.html" : path));
  if (!file.startsWith(ROOT.endsWith(sep) ? ROOT : ROOT + sep) || !TYPES[extname(file)]) {
    response.writeHead(404).end("not found");
    return;
  }
  try {
    const body = await readFile(file);
    response.writeHead(200, { "content-type": TYPES[extname(file)], "cache-control": "no-store" }).end(body);
  } catch {
    response.writeHead(404).end("not found");
  }
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
print({ origin: `http://127.0.0.1:${server.address().port}` });

const browser = await launch();
const { page } = browser;

function snapshot() {
  const $ = (id) => document.getElementById(id);
  const text = (node) => (node ? node.textContent.trim() : null);
  if (!$("projects")) return { loaded: false };
  return {
    loaded: true,
    connection: $("state").dataset.state,
    applied: Number(text($("applied"))),
    duplicates: Number(text($("duplicates"))),
    reconnects: Number(text($("reconnects"))),
    refetches: Number(text($("refetches"))),
    last_id: text($("last-id")),
    notice: $("notice").hidden ? null : text($("notice")),
    stream_url: text($("stream-url")),
    projects: [...document.querySelectorAll("#projects tbody tr")].map((tr) => ({
      uuid: tr.dataset.uuid,
      name: text(tr.querySelector(".name")),
      status: text(tr.querySelector(".status")),
      focus: tr.classList.contains("focus"),
    })),
    focus_title: text($("focus-title")),
    activity: [...document.querySelectorAll("#activity li[data-id]")].map((li) => li.dataset.id),
  };
}

print({ ready: true });
await run(browser, common(page), snapshot);
server.close();
