// Shared by the browser test scripts (console.mjs, dashboard.mjs), driven by
// tests/gateway/browser.rs:
// - launches Debian's Chromium (/usr/bin/chromium, or $CHROMIUM_PATH) headless
//   through playwright-core, with a fresh profile directory and the flags that
//   keep it off the network (playwright-core never downloads a browser);
// - reads one JSON command per line on stdin and answers
//   {"done":"<cmd>",...} or {"failed":"<cmd>","error":"..."};
// - prints {"state":{...}} whenever what the page shows changes (polled), and
//   {"page_error":"..."} / {"console":"error","text":"..."} as they happen.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

export const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const FLAGS = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
];

/** Starts Chromium; `extraFlags` are added to the command line. */
export async function launch(extraFlags = []) {
  const profile = mkdtempSync(join(tmpdir(), "sse-gateway-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [...FLAGS, ...extraFlags],
    viewport: { width: 1440, height: 900 },
    deviceScaleFactor: 1,
  });
  const page = context.pages()[0] || (await context.newPage());
  page.on("pageerror", (error) => print({ page_error: String(error && error.message ? error.message : error) }));
  page.on("console", (message) => {
    if (message.type() === "error") print({ console: "error", text: message.text() });
  });
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, page, close };
}

/**
 * Runs the command loop until stdin closes or {"cmd":"exit"}; `snapshot(page)`
 * is evaluated every 100 ms and printed when it changes.
 */
export async function run({ page, close }, handlers, snapshot) {
  let last = "";
  let stopped = false;
  const poll = async () => {
    while (!stopped) {
      try {
        const state = await page.evaluate(snapshot);
        const text = JSON.stringify(state);
        if (text !== last) {
          last = text;
          print({ state });
        }
      } catch {
        // navigating: try again
      }
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };
  const polling = poll();

  const lines = createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (!line.trim()) continue;
    let message;
    try {
      message = JSON.parse(line);
    } catch (error) {
      print({ failed: "?", error: `not JSON: ${line}` });
      continue;
    }
    if (message.cmd === "exit") break;
    const handler = handlers[message.cmd];
    if (!handler) {
      print({ failed: message.cmd, error: "unknown command" });
      continue;
    }
    try {
      const result = (await handler(message)) || {};
      print({ done: message.cmd, ...result });
    } catch (error) {
      print({ failed: message.cmd, error: String(error && error.stack ? error.stack : error) });
    }
  }
  stopped = true;
  await polling;
  await close();
  print({ exited: true });
  process.exit(0);
}

/** The shared commands: screenshot {path}, goto {url}, reload. */
export const common = (page) => ({
  screenshot: async ({ path }) => {
    await page.screenshot({ path, fullPage: false });
    return { path };
  },
  goto: async ({ url }) => {
    await page.goto(url, { waitUntil: "load" });
    return { url: page.url() };
  },
  reload: async () => {
    await page.reload({ waitUntil: "load" });
    return {};
  },
  wait: async ({ ms }) => {
    await page.waitForTimeout(ms);
    return {};
  },
});
