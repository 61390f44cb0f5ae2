// sse-gateway console: plain JavaScript, no framework, no build step.
//
// It uses only the gateway's public HTTP API, from the same origin:
//   GET /topics, GET /metrics, GET /readyz     refreshed every REFRESH_MS
//   GET /events?topic=…                         the live tail, with /client.js
//   POST /topics/{t} or /publish                the publish form
// Auth: the token field stores the `sse_gateway_token` cookie, which the
// browser sends with every same-origin request (the tail's stream included).
// A module (strict, deferred), so that it can import the client.
import { subscribe } from "/client.js";

const REFRESH_MS = 2000;
const MAX_ROWS = 300;
const TOKEN_COOKIE = "sse_gateway_token";

const $ = (id) => document.getElementById(id);

/** A DOM element: `el("li", {className, dataset, title}, child…)`. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const code = (text) => el("code", { textContent: text });

// ------------------------------------------------------------------ ids, topics

/** `<epoch>-<seq>` → {epoch, seq: BigInt}; `0` → {epoch: null, seq: 0n}; else null. */
function parseId(id) {
  if (id === "0") return { epoch: null, seq: 0n };
  const dash = typeof id === "string" ? id.lastIndexOf("-") : -1;
  if (dash <= 0) return null;
  const seq = id.slice(dash + 1);
  if (!/^(0|[1-9][0-9]*)$/.test(seq)) return null;
  return { epoch: id.slice(0, dash), seq: BigInt(seq) };
}

/** Whether id `a` is after id `b` in the same log. */
function after(a, b) {
  if (!a) return false;
  if (!b) return true;
  if (a.epoch !== b.epoch && a.epoch !== null && b.epoch !== null) return true;
  return a.seq > b.seq;
}

function splitTopics(text) {
  return [...new Set(text.split(/[\s,]+/).filter(Boolean))];
}

// Topic characters are [A-Za-z0-9._~:@-]: all fine in a URL as they are.
const encTopic = (topic) => encodeURIComponent(topic).replace(/%3A/gi, ":").replace(/%40/g, "@");

/** The stream the client reads (shown in the tail's header). */
function streamUrl(topics, fromId) {
  const query = topics.map((topic) => `topic=${encTopic(topic)}`);
  if (fromId) query.push(`last_event_id=${encodeURIComponent(fromId)}`);
  return `/events?${query.join("&")}`;
}

// ------------------------------------------------------------------ formatting

function clock(date = new Date()) {
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function bytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
}

function count(n) {
  return Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "–";
}

/**
 * Pretty-prints JSON text *as sent*: only whitespace is added, so number text
 * (`1.0`, big integers), escapes and key order stay exactly what the gateway
 * delivered (JSON.parse + stringify would change them). Objects and arrays
 * whose text is short stay on one line. Returns highlighted DOM nodes.
 */
function prettyJson(text) {
  const INLINE_MAX = 64;
  const frag = document.createDocumentFragment();
  try {
    JSON.parse(text);
  } catch {
    frag.append(text);
    return frag;
  }
  let plain = "";
  const flush = () => { if (plain) { frag.append(plain); plain = ""; } };
  const span = (className, s) => { flush(); frag.append(el("span", { className, textContent: s })); };
  const indent = (depth) => `\n${"  ".repeat(depth)}`;
  const skip = (i) => { while (i < text.length && " \t\n\r".includes(text[i])) i += 1; return i; };
  const stringEnd = (i) => {
    let j = i + 1;
    while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
    return j + 1;
  };
  const valueEnd = (i) => {
    if (text[i] === '"') return stringEnd(i);
    if (text[i] !== "{" && text[i] !== "[") {
      while (i < text.length && !" \t\n\r,:]}".includes(text[i])) i += 1;
      return i;
    }
    let depth = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') { i = stringEnd(i); continue; }
      if (c === "{" || c === "[") depth += 1;
      if (c === "}" || c === "]") { depth -= 1; if (depth === 0) return i + 1; }
      i += 1;
    }
    return i;
  };
  const value = (i, depth) => {
    i = skip(i);
    const c = text[i];
    if (c === '"') {
      const end = stringEnd(i);
      span("j-str", text.slice(i, end));
      return end;
    }
    if (c !== "{" && c !== "[") {
      const end = valueEnd(i);
      const token = text.slice(i, end);
      span(/^[-0-9]/.test(token) ? "j-num" : "j-lit", token);
      return end;
    }
    const close = c === "{" ? "}" : "]";
    const inline = valueEnd(i) - i <= INLINE_MAX;
    plain += c;
    let j = skip(i + 1);
    if (text[j] === close) { plain += close; return j + 1; }
    for (let first = true; ; first = false) {
      if (!first) plain += ",";
      plain += inline ? (first ? "" : " ") : indent(depth + 1);
      if (c === "{") {
        const keyEnd = stringEnd(j);
        span("j-key", text.slice(j, keyEnd));
        j = skip(keyEnd) + 1; // the ':'
        plain += ": ";
      }
      j = skip(value(j, depth + 1));
      if (text[j] === ",") { j = skip(j + 1); continue; }
      if (!inline) plain += indent(depth);
      plain += close;
      return j + 1;
    }
  };
  value(0, 0);
  flush();
  return frag;
}

// ------------------------------------------------------------------ token cookie

function tokenCookie() {
  const match = document.cookie.match(new RegExp(`(?:^|;\\s*)${TOKEN_COOKIE}=([^;]*)`));
  return match ? decodeURIComponent(match[1]) : "";
}

function setTokenCookie(value) {
  const secure = location.protocol === "https:" ? "; Secure" : "";
  document.cookie = value
    ? `${TOKEN_COOKIE}=${encodeURIComponent(value)}; Path=/; SameSite=Strict; Max-Age=${7 * 86400}${secure}`
    : `${TOKEN_COOKIE}=; Path=/; SameSite=Strict; Max-Age=0${secure}`;
  showTokenState();
}

function showTokenState() {
  const set = tokenCookie() !== "";
  $("token-state").dataset.set = String(set);
  $("token-state").textContent = set ? "token set" : "no token";
}

// ------------------------------------------------------------------ HTTP helpers

/** A fetch that never throws: {ok, status, json, text, error}. */
async function request(url, options = {}) {
  try {
    const response = await fetch(url, { cache: "no-store", ...options });
    const text = await response.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { ok: response.ok, status: response.status, json, text };
  } catch (error) {
    return { ok: false, status: 0, json: null, text: "", error: String(error) };
  }
}

/** "401 unauthorized: …" from a JSON error answer. */
function describeError(answer) {
  if (answer.status === 0) return "gateway unreachable";
  const err = answer.json && answer.json.error;
  const text = err ? `${answer.status} ${err.code}: ${err.message}` : `${answer.status} ${answer.text.slice(0, 200)}`;
  const hint = answer.status === 401 || answer.status === 403 ? " (set a token at the top right)" : "";
  return text + hint;
}

// ------------------------------------------------------------------ topics

const topicsView = { rows: [], headId: null, previous: new Map(), filter: "" };

async function refreshTopics() {
  const answer = await request("/topics");
  const notice = $("topics-error");
  if (!answer.ok || !answer.json || !Array.isArray(answer.json.topics)) {
    notice.hidden = false;
    notice.textContent = `GET /topics: ${describeError(answer)}`;
    return null;
  }
  notice.hidden = true;
  topicsView.rows = answer.json.topics;
  topicsView.headId = answer.json.head_id;
  $("head-id").textContent = answer.json.head_id || "–";
  renderTopics();
  return answer.json;
}

/** Long topics keep their distinctive end: `projects:project:…55556663` (hover: all of it). */
function shortTopic(topic) {
  if (topic.length <= 27) return topic;
  const cut = topic.lastIndexOf(":", 18);
  const head = cut > 0 ? topic.slice(0, cut + 1) : topic.slice(0, 14);
  return `${head}…${topic.slice(-Math.max(8, 26 - head.length))}`;
}

function renderTopics() {
  const body = $("topics").tBodies[0];
  const filter = topicsView.filter.toLowerCase();
  const rows = topicsView.rows.filter((t) => t.topic.toLowerCase().includes(filter));
  const fresh = [];
  for (const t of rows) {
    const before = topicsView.previous.get(t.topic);
    const tr = el("tr", { dataset: { topic: t.topic } },
      el("td", { className: "topic", title: `${t.topic} (click to publish to it)` }, shortTopic(t.topic)),
      el("td", { className: "num count" }, count(t.count)),
      el("td", { className: "id first" }, t.first_id || "–"),
      el("td", { className: "id last" }, t.last_id || "–"),
      el("td", { className: "num subs", dataset: { live: String(t.subscribers > 0) } }, String(t.subscribers)),
      el("td", { className: "actions" },
        el("button", { className: "btn-link", type: "button", textContent: "Tail", title: "Tail this topic live", dataset: { action: "tail" } }),
        el("button", { className: "btn-link", type: "button", textContent: "+", title: "Add to the tail's topics", dataset: { action: "add" } })));
    if (before !== undefined && before !== t.last_id) tr.classList.add("changed");
    fresh.push(tr);
  }
  body.replaceChildren(...fresh);
  topicsView.previous = new Map(topicsView.rows.map((t) => [t.topic, t.last_id]));
  $("topics-count").textContent = topicsView.rows.length ? `(${topicsView.rows.length})` : "";
  $("topics-empty").hidden = topicsView.rows.length > 0;
}

function onTopicsClick(event) {
  const tr = event.target.closest("tr[data-topic]");
  if (!tr) return;
  const topic = tr.dataset.topic;
  const action = event.target.dataset.action;
  if (action === "tail") {
    $("tail-topics").value = topic;
    $("tail-from").value = "";
    startTail();
  } else if (action === "add") {
    const topics = splitTopics($("tail-topics").value);
    if (!topics.includes(topic)) topics.push(topic);
    $("tail-topics").value = topics.join(" ");
    $("tail-topics").focus();
  } else if (event.target.closest("td.topic")) {
    $("pub-topics").value = topic;
    updatePublishRoute();
    $("pub-data").focus();
  }
}

// ------------------------------------------------------------------ metrics

const metricsView = { previous: null };

/** Prometheus / OpenMetrics text → Map(name → [{labels, value}]). */
function parseMetrics(text) {
  const families = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    if (!families.has(m[1])) families.set(m[1], []);
    families.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return families;
}

const sum = (families, name) => (families.get(name) || []).reduce((total, s) => total + s.value, 0);
const byLabel = (families, name, label) =>
  (families.get(name) || []).map((s) => `${s.labels[label] ?? "?"} ${count(s.value)}`).join(" · ");

async function refreshMetrics() {
  const answer = await request("/metrics");
  if (!answer.ok) return;
  const f = parseMetrics(answer.text);
  const now = performance.now();
  const sample = {
    at: now,
    published: sum(f, "sse_gateway_events_published_total"),
    delivered: sum(f, "sse_gateway_events_delivered_total"),
  };
  const rate = (key) => {
    const p = metricsView.previous;
    if (!p || now <= p.at || sample[key] < p[key]) return "–/s";
    const perSecond = ((sample[key] - p[key]) * 1000) / (now - p.at);
    return `${perSecond < 10 ? perSecond.toFixed(1) : Math.round(perSecond)}/s`;
  };
  $("m-streams").textContent = count(sum(f, "sse_gateway_streams_open"));
  $("m-streams-sub").textContent = byLabel(f, "sse_gateway_streams_open", "mode") || "none";
  $("m-published").textContent = count(sample.published);
  $("m-published-sub").textContent = `${rate("published")} · since start`;
  $("m-delivered").textContent = count(sample.delivered);
  $("m-delivered-sub").textContent = `${rate("delivered")} · since start`;
  const resets = sum(f, "sse_gateway_resets_total");
  $("m-resets").textContent = count(resets);
  $("m-resets-sub").textContent = byLabel(f, "sse_gateway_resets_total", "reason") || "none";
  document.querySelector('[data-metric="resets"]').dataset.alert = String(resets > 0);
  const lag = sum(f, "sse_gateway_lag_fallbacks_total");
  $("m-lag").textContent = count(lag);
  $("m-storage").textContent = bytes(sum(f, "sse_gateway_storage_bytes"));
  $("m-head").textContent = count(sum(f, "sse_gateway_log_head_sequence"));
  $("m-updated").textContent = `updated ${clock().slice(0, 8)}`;
  metricsView.previous = sample;
}

async function refreshReady() {
  const answer = await request("/readyz");
  const box = $("gateway-status");
  if (answer.ok) {
    box.dataset.state = "ready";
    $("gateway-status-text").textContent = "ready";
  } else if (answer.status === 0) {
    box.dataset.state = "down";
    $("gateway-status-text").textContent = "unreachable";
  } else {
    box.dataset.state = "unready";
    $("gateway-status-text").textContent = `not ready (${answer.status})`;
  }
  box.title = answer.ok ? "GET /readyz: 200" : `GET /readyz: ${describeError(answer)}`;
}

let refreshTimer = null;
async function refresh() {
  clearTimeout(refreshTimer);
  await Promise.all([refreshTopics(), refreshMetrics(), refreshReady()]);
  refreshTimer = setTimeout(refresh, REFRESH_MS);
}

// ------------------------------------------------------------------ live tail

// The tail reads its stream with the gateway's browser client (/client.js):
// every event name arrives, it reconnects and resumes from the last id by
// itself, and says why the gateway refused a stream. One stream per tail (not
// shared across tabs: each tab tails what its form says).
const tail = {
  sub: null,
  topics: [],
  fromId: "",
  url: "",
  state: "idle",
  opened: false,     // this subscription opened at least once
  lastId: null,      // id of the last event received: what the client resumes after
  maxShown: null,    // highest id shown (parsed)
  shown: new Set(),  // ids shown, to flag a duplicate (never expected)
  events: 0,
  connects: 0,
  lostRow: null,
  attempts: 0,
};

function setTailState(state) {
  tail.state = state;
  const badge = $("tail-state");
  badge.dataset.state = state;
  badge.textContent = state;
  $("tail-stop").disabled = state === "idle";
  $("tail-connect").textContent = state === "idle" ? "Connect" : "Reconnect";
}

function renderTailInfo() {
  $("tail-url").textContent = tail.url ? decodeURIComponent(tail.url) : "–";
  $("tail-last-id").textContent = tail.lastId || "–";
  const rows = $("tail").querySelectorAll("li.ev").length;
  $("tail-count").textContent = rows < tail.events ? `${tail.events} (newest ${rows} shown)` : String(tail.events);
  $("tail-connects").textContent = String(tail.connects);
  $("tail-empty").hidden = $("tail").children.length > 0;
}

function trimTail() {
  const list = $("tail");
  while (list.children.length > MAX_ROWS) list.lastElementChild.remove();
}

/** A connection row ("connected", "reconnected — resumed after …", …) on top. */
function connRow(kind, ...content) {
  const li = el("li", { className: "conn", dataset: { kind } },
    el("span", { className: "ev-time", textContent: clock() }),
    el("span", { className: "icon", textContent: { open: "●", reopen: "↻", lost: "○", closed: "✕" }[kind] || "•" }),
    el("span", { className: "text" }, ...content));
  $("tail").prepend(li);
  trimTail();
  renderTailInfo();
  return li;
}

function closeStream() {
  if (tail.sub) tail.sub.close();
  tail.sub = null;
}

/** Subscribes to the tail's topics from `fromId` ("" = live). */
function openStream(fromId, firstOpenText) {
  closeStream();
  tail.url = streamUrl(tail.topics, fromId);
  tail.opened = false;
  tail.lostRow = null;
  tail.attempts = 0;
  setTailState("connecting");
  renderTailInfo();
  // Same origin: the token cookie, when set, goes along. A closed
  // subscription calls nothing, so no callback below is stale.
  tail.sub = subscribe(tail.topics, {
    from: fromId || null,
    storageKey: "sse-gateway-console:tail",
    onEvent: onTailEvent,
    onReset: (info, id) => onTailEvent({ id, event: "reset", text: JSON.stringify(info) }),
    onState: onTailState,
  });
}

function onTailState(state, error) {
  if (state === "open") {
    tail.connects += 1;
    if (!tail.opened) {
      tail.opened = true;
      connRow("open", ...firstOpenText());
    } else {
      // The client reconnected by itself, resuming after the last id.
      const li = connRow("reopen", "reconnected — resumed after ",
        tail.lastId ? code(tail.lastId) : "the position the gateway gave at connect",
        tail.attempts > 1 ? ` (after ${tail.attempts} attempts)` : "");
      li.dataset.resumed = tail.lastId || "";
    }
    tail.lostRow = null;
    tail.attempts = 0;
    setTailState("open");
  } else if (state === "reconnecting") {
    tail.attempts += 1;
    setTailState("reconnecting");
    const resume = tail.lastId ? code(tail.lastId) : "the position the gateway gave at connect";
    const text = ["connection lost — reconnecting, will resume after ", resume,
      tail.attempts > 1 ? ` (attempt ${tail.attempts})` : ""];
    if (!tail.lostRow) tail.lostRow = connRow("lost", ...text);
    else tail.lostRow.querySelector(".text").replaceChildren(...text);
  } else if (state === "closed") {
    setTailState("closed");
    const answer = { status: error ? error.status : 0, json: error && error.code ? { error } : null, text: "" };
    connRow("closed", "the gateway refused the stream; no retry — ", code(describeError(answer)));
  }
}

/** What the first "connected" row says (set by startTail). */
let firstOpenText = () => ["connected"];

/** One event from the client: {id, event, text}. */
function onTailEvent(event) {
  const id = event.id;
  const parsed = parseId(id);
  const duplicate = tail.shown.has(id);
  tail.lastId = id;
  tail.shown.add(id);
  if (tail.shown.size > 50000) tail.shown.delete(tail.shown.values().next().value);
  tail.events += 1;

  const li = el("li", { className: "ev", dataset: { id, event: event.event, duplicate: String(duplicate) } },
    el("div", { className: "ev-head" },
      el("span", { className: "ev-time", textContent: clock() }),
      el("span", { className: "ev-id", textContent: id || "(no id)" }),
      el("span", { className: "ev-name", textContent: event.event }),
      duplicate && el("span", { className: "ev-flag", textContent: "duplicate id" })));
  if (event.event === "reset") li.append(resetText(event.text, id));
  li.append(el("pre", { className: "ev-data" }, prettyJson(event.text)));

  const list = $("tail");
  if (!parsed || !tail.maxShown || after(parsed, tail.maxShown)) {
    list.prepend(li);
    if (parsed) tail.maxShown = parsed;
  } else {
    // An older id (a reset to an older position): put it in id order.
    const later = [...list.querySelectorAll("li.ev")].find((row) => {
      const p = parseId(row.dataset.id);
      return p && p.epoch === parsed.epoch && p.seq < parsed.seq;
    });
    list.insertBefore(li, later || null);
  }
  trimTail();
  renderTailInfo();
}

function resetText(data, id) {
  let info = {};
  try { info = JSON.parse(data); } catch { /* shown raw below */ }
  const why = {
    retention: "history after the requested id was trimmed; what is retained follows",
    unknown_id: "the requested id is not from this log (or is ahead of it); live from here",
  }[info.reason] || "the gateway could not resume from the requested id";
  return el("div", { className: "reset-text" },
    `reset: ${info.reason ?? "?"} — ${why}. Requested `, code(String(info.requested ?? "?")),
    ", oldest retained ", code(String(info.oldest ?? "none")), ", continuing from ", code(id || "?"), ".");
}

function startTail() {
  const topics = splitTopics($("tail-topics").value);
  if (!topics.length) {
    $("tail-topics").focus();
    return;
  }
  const fromId = $("tail-from").value.trim();
  closeStream();
  tail.topics = topics;
  tail.fromId = fromId;
  tail.lastId = null;
  tail.maxShown = null;
  const where = fromId === "0" ? ["all retained history, then live"]
    : fromId ? ["replaying after ", code(fromId)] : ["live from now"];
  firstOpenText = () => ["connected to ", code(decodeURIComponent(streamUrl(topics, ""))), " — ", ...where];
  openStream(fromId);
  const url = new URL(location.href);
  url.searchParams.set("tail", topics.join(" "));
  history.replaceState(null, "", url);
}

function stopTail() {
  closeStream();
  setTailState("idle");
  connRow("closed", "stopped");
}

// ------------------------------------------------------------------ publish

function updatePublishRoute() {
  const topics = splitTopics($("pub-topics").value);
  $("pub-route").textContent = topics.length > 1 ? "POST /publish" : "POST /topics/{topic}";
}

function updateJsonState() {
  const text = $("pub-data").value;
  const state = $("pub-json-state");
  if (!text.trim()) {
    state.textContent = "";
    delete state.dataset.ok;
    return;
  }
  try {
    JSON.parse(text);
    state.textContent = "✓ valid JSON";
    state.dataset.ok = "true";
  } catch (error) {
    state.textContent = `✗ ${error.message.replace(/^JSON\.parse: /, "")}`;
    state.dataset.ok = "false";
  }
}

async function publish(event) {
  event.preventDefault();
  const topics = splitTopics($("pub-topics").value);
  const name = $("pub-event").value.trim();
  const data = $("pub-data").value.trim();
  if (!topics.length) {
    $("pub-topics").focus();
    return;
  }
  // The data text goes as typed (the gateway keeps it byte-exact, and says
  // what is wrong with it if it is not JSON).
  const parts = [];
  let url;
  if (topics.length === 1) {
    url = `/topics/${encTopic(topics[0])}`;
  } else {
    url = "/publish";
    parts.push(`"topics":${JSON.stringify(topics)}`);
  }
  if (name) parts.push(`"event":${JSON.stringify(name)}`);
  if (data) parts.push(`"data":${data}`);

  const button = $("pub-submit");
  button.disabled = true;
  const answer = await request(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: `{${parts.join(",")}}`,
  });
  button.disabled = false;

  const box = $("pub-result");
  box.hidden = false;
  box.dataset.ok = String(answer.ok);
  box.dataset.status = String(answer.status);
  if (answer.ok && answer.json) {
    box.dataset.id = answer.json.id;
    box.replaceChildren(
      el("span", { className: "status", textContent: `${answer.status} Created` }),
      " · id ", code(answer.json.id), " → ", code((answer.json.topics || []).join(", ")),
      el("span", { className: "hint", textContent: `  ${clock().slice(0, 8)}` }));
    refresh();
  } else {
    delete box.dataset.id;
    const err = answer.json && answer.json.error;
    box.dataset.code = err ? err.code : "";
    box.replaceChildren(
      el("span", { className: "status", textContent: answer.status ? `${answer.status} ${err ? err.code : ""}` : "unreachable" }),
      el("div", { textContent: err ? err.message : describeError(answer) }),
      answer.json ? el("pre", { textContent: JSON.stringify(answer.json, null, 2) }) : null);
  }
}

// ------------------------------------------------------------------ start

function start() {
  $("topics").addEventListener("click", onTopicsClick);
  $("topics-filter").addEventListener("input", (e) => { topicsView.filter = e.target.value; renderTopics(); });
  $("tail-form").addEventListener("submit", (e) => { e.preventDefault(); startTail(); });
  $("tail-stop").addEventListener("click", stopTail);
  $("tail-clear").addEventListener("click", () => {
    $("tail").replaceChildren();
    tail.events = 0;
    renderTailInfo();
  });
  $("publish-form").addEventListener("submit", publish);
  $("pub-topics").addEventListener("input", updatePublishRoute);
  $("pub-data").addEventListener("input", updateJsonState);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    setTokenCookie($("token-input").value.trim());
    refresh();
    if (tail.sub) {
      firstOpenText = () => ["reconnected with the new token"];
      openStream(tail.lastId || tail.fromId);
    }
  });
  $("token-clear").addEventListener("click", () => {
    $("token-input").value = "";
    setTokenCookie("");
    refresh();
  });

  $("token-input").value = tokenCookie();
  showTokenState();
  updateJsonState();
  updatePublishRoute();
  setTailState("idle");
  renderTailInfo();
  refresh();

  const wanted = new URLSearchParams(location.search).get("tail");
  if (wanted) {
    $("tail-topics").value = wanted;
    startTail();
  }
}

start();
