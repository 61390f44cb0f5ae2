// The web console (`GET /` of the gateway) in headless Chromium, for
// tests/gateway/browser.rs. Protocol: see lib.mjs.
//
//   node browser/console.mjs
//
// Commands (besides screenshot/goto/reload/wait):
//   {"cmd":"tail","topics":"a b","from":""}          fill the tail form, Connect
//   {"cmd":"token","value":"<jwt>"}                  fill the token field, Save
//   {"cmd":"publish","topics":"a","event":"e","data":"{...}"}
//                                                    fill the publish form, Publish;
//                                                    answers with what the page shows
// State: topics table rows, metric cards, the tail (state badge and every row,
// newest first) and the publish result, as shown.
import { common, launch, print, run } from "./lib.mjs";

const browser = await launch();
const { page } = browser;

const handlers = {
  ...common(page),
  tail: async ({ topics, from }) => {
    await page.fill("#tail-topics", topics);
    await page.fill("#tail-from", from || "");
    await page.click("#tail-connect");
    return {};
  },
  token: async ({ value }) => {
    await page.fill("#token-input", value);
    await page.click("#token-form button[type=submit]");
    return page.evaluate(() => ({ cookie: document.cookie }));
  },
  publish: async ({ topics, event, data }) => {
    await page.evaluate(() => {
      const box = document.getElementById("pub-result");
      box.hidden = true;
      delete box.dataset.status;
    });
    await page.fill("#pub-topics", topics);
    await page.fill("#pub-event", event || "");
    await page.fill("#pub-data", data);
    await page.click("#pub-submit");
    await page.waitForSelector("#pub-result[data-status]", { timeout: 10000 });
    return page.evaluate(() => {
      const box = document.getElementById("pub-result");
      return { status: Number(box.dataset.status), id: box.dataset.id || null, code: box.dataset.code || null, text: box.textContent };
    });
  },
};

function snapshot() {
  const $ = (id) => document.getElementById(id);
  const text = (node) => (node ? node.textContent.trim() : null);
  const number = (s) => Number(String(s).replace(/,/g, ""));
  const result = $("pub-result");
  return {
    gateway: $("gateway-status").dataset.state,
    token_set: $("token-state").dataset.set === "true",
    topics_error: $("topics-error").hidden ? null : text($("topics-error")),
    head_id: text($("head-id")),
    topics: [...document.querySelectorAll("#topics tbody tr")].map((tr) => ({
      topic: tr.dataset.topic,
      shown_as: text(tr.querySelector(".topic")),
      count: number(text(tr.querySelector(".count"))),
      first_id: text(tr.querySelector(".first")),
      last_id: text(tr.querySelector(".last")),
      subscribers: number(text(tr.querySelector(".subs"))),
    })),
    metrics: Object.fromEntries(["streams", "published", "delivered", "resets", "lag", "storage", "head"]
      .map((m) => [m, text($(`m-${m}`))])),
    metrics_sub: { streams: text($("m-streams-sub")), resets: text($("m-resets-sub")) },
    tail: {
      state: $("tail-state").dataset.state,
      url: text($("tail-url")),
      last_id: text($("tail-last-id")),
      rows: [...document.querySelectorAll("#tail > li")].map((li) => li.classList.contains("ev")
        ? {
          row: "event",
          id: li.dataset.id,
          event: li.dataset.event,
          duplicate: li.dataset.duplicate === "true",
          data: text(li.querySelector(".ev-data")),
          reset: text(li.querySelector(".reset-text")),
        }
        : { row: "conn", kind: li.dataset.kind, resumed: li.dataset.resumed ?? null, text: text(li) }),
    },
    publish: result.hidden ? null : {
      ok: result.dataset.ok === "true",
      status: Number(result.dataset.status),
      id: result.dataset.id || null,
      code: result.dataset.code || null,
      text: text(result),
    },
  };
}

print({ ready: true });
await run(browser, handlers, snapshot);
