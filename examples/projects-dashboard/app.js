// A live projects dashboard on sse-gateway: plain JavaScript, no build step.
//
//   index.html?gateway=http://127.0.0.1:8080&project=<uuid>
//
// It follows `projects:all` and `projects:project:<uuid>` with the gateway's
// own browser client, `<gateway>/client.js` (docs/API.md, "Browser client"):
// ONE stream (`GET /events?topic=…&topic=…`: an event in both topics comes
// once), and keeps a list of projects up to date from PhoenixKit's project
// events. This page is served from another origin than the gateway, so the
// gateway's `[cors] allowed_origins` must name it (for the module and the
// stream alike).
//
// Nothing missed, nothing applied twice, also across gateway restarts:
// - The client reconnects by itself after the gateway's `retry:` delay and
//   resumes from the last id; the gateway replays what was missed, then goes live.
// - The state and the id of the last event applied to it are saved together in
//   localStorage; a reload resumes with `from: <saved id>`.
// - The client delivers each id once, in order; the page checks every id
//   against the last one applied too (ids grow within one log), so even a
//   repeated event would be ignored, and counted.
// - A `reset` event means the gateway cannot resume from our id (history
//   trimmed, or another log): the state is refetched. A real app would
//   GET its own API here (e.g. `GET /api/projects`) and carry on from the id in
//   the reset block; this example has no backend, so it clears the list and
//   replays the log from the start (`from: "0"`).
// One stream per tab here: this example's stand-in for a refetch (replay the
// log from 0 into this tab's list) is per tab. An app whose refetch is an API
// call passes `shareAcrossTabs: true` and all its tabs share one stream.
const params = new URLSearchParams(location.search);
const GATEWAY = (params.get("gateway") || "http://127.0.0.1:8080").replace(/\/+$/, "");
const PROJECT = (params.get("project") || "").trim().toLowerCase();
// With `[auth]` on the gateway, a token for `?access_token=`.
const TOKEN = params.get("token") || "";
const { subscribe } = await import(`${GATEWAY}/client.js`);
const TOPICS = ["projects:all", ...(PROJECT ? [`projects:project:${PROJECT}`] : [])];
const STORE_KEY = `projects-dashboard:v1:${GATEWAY}:${PROJECT}`;
const ACTIVITY_MAX = 30;

const PROJECT_EVENTS = ["project_created", "project_updated", "project_deleted",
  "project_archived", "project_restored", "project_status_changed"];

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ state

/** What is saved: the projects and the id of the last event applied to them. */
function emptyState() {
  return { lastEventId: null, projects: {}, activity: [], applied: 0 };
}

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY));
    if (saved && typeof saved.projects === "object" && saved.lastEventId) return saved;
  } catch { /* unreadable: start over */ }
  return null;
}

function saveState() {
  localStorage.setItem(STORE_KEY, JSON.stringify(state));
}

let state = loadState() || emptyState();
const session = { duplicates: 0, reconnects: 0, refetches: 0, connection: "connecting", fresh: new Set() };

/** `<epoch>-<seq>` → {epoch, seq}; ids are opaque to apps, but their order is stated in docs/API.md. */
function parseId(id) {
  const m = /^(.+)-(0|[1-9][0-9]*)$/.exec(id || "");
  return m ? { epoch: m[1], seq: BigInt(m[2]) } : null;
}

/** True when `id` was already applied (same log, not after the last applied id). */
function alreadyApplied(id) {
  const next = parseId(id);
  const last = parseId(state.lastEventId);
  return Boolean(next && last && next.epoch === last.epoch && next.seq <= last.seq);
}

// ------------------------------------------------------------------ applying events

/** One event from the client: {id, event, data (parsed JSON), text}. */
function apply(event) {
  if (alreadyApplied(event.id)) {
    session.duplicates += 1;
    render();
    return;
  }
  const payload = event.data && typeof event.data === "object" ? event.data : {};
  const name = event.event;
  const uuid = String(payload.uuid || "").toLowerCase();

  if (PROJECT_EVENTS.includes(name) && uuid) {
    if (name === "project_deleted") {
      delete state.projects[uuid];
    } else {
      const project = { ...(state.projects[uuid] || { uuid }), ...payload, uuid };
      if (name === "project_archived" && !payload.status) project.status = "archived";
      project.lastChange = { event: name, id: event.id, at: Date.now() };
      state.projects[uuid] = project;
      session.fresh.add(uuid);
    }
  }
  const about = uuid || String(payload.project_uuid || "").toLowerCase();
  if (PROJECT && about === PROJECT) {
    state.activity.unshift({ id: event.id, event: name, at: Date.now(), detail: summary(payload) });
    state.activity.length = Math.min(state.activity.length, ACTIVITY_MAX);
  }
  state.lastEventId = event.id;
  state.applied += 1;
  saveState();
  render();
}

function summary(payload) {
  const parts = [];
  for (const key of ["name", "title", "status"]) {
    if (payload[key] !== undefined) parts.push(`${key}: ${payload[key]}`);
  }
  return parts.join(" · ");
}

/** The gateway cannot resume from our id: refetch the whole state. */
function onReset(info) {
  session.refetches += 1;
  session.notice = { ...info, at: new Date() };
  // A real app: `state = await (await fetch("/api/projects")).json()`, then keep
  // following from the reset's id. Here the log is the only source of
  // truth: clear, and replay it from the start.
  state = emptyState();
  saveState();
  render();
  connect("0");
}

// ------------------------------------------------------------------ the stream

let sub = null;

/** (Re)subscribes from `fromId` ("0": everything retained). */
function connect(fromId) {
  if (sub) sub.close();
  // What the client asks for first (shown in the footer; the token hidden).
  const url = new URL(`${GATEWAY}/events`);
  for (const topic of TOPICS) url.searchParams.append("topic", topic);
  if (fromId) url.searchParams.set("last_event_id", fromId);
  $("stream-url").textContent = decodeURIComponent(url.href);
  let opened = false;
  // After close() a subscription calls nothing: no stale callbacks.
  sub = subscribe(TOPICS, {
    url: GATEWAY,
    from: fromId,
    // With `[auth]` on the gateway: sent as `?access_token=` (keep it short-lived).
    token: TOKEN || undefined,
    onEvent: apply,
    onReset,
    onState: (s) => {
      if (s === "open") {
        if (opened) session.reconnects += 1; // came back, resuming from the last id
        opened = true;
      }
      setConnection({ open: "live" }[s] || s);
    },
  });
}

function setConnection(connection) {
  session.connection = connection;
  render();
}

// ------------------------------------------------------------------ rendering

const time = (ms) => new Date(ms).toLocaleTimeString("en-GB");

function cell(className, ...children) {
  const td = document.createElement("td");
  td.className = className;
  td.append(...children);
  return td;
}

function statusPill(status) {
  const span = document.createElement("span");
  span.className = "status";
  span.dataset.status = String(status || "unknown").toLowerCase();
  span.textContent = status || "—";
  return span;
}

function codeText(text) {
  const c = document.createElement("code");
  c.textContent = text;
  return c;
}

function render() {
  const badge = $("state");
  badge.dataset.state = session.connection;
  badge.textContent = session.connection;
  $("applied").textContent = String(state.applied);
  $("duplicates").textContent = String(session.duplicates);
  $("reconnects").textContent = String(session.reconnects);
  $("refetches").textContent = String(session.refetches);
  $("last-id").textContent = state.lastEventId || "–";

  const notice = $("notice");
  if (session.notice) {
    const n = session.notice;
    notice.hidden = false;
    notice.replaceChildren(
      `The gateway could not resume from `, codeText(String(n.requested ?? "?")),
      ` (${n.reason}${n.reason === "unknown_id" ? ": not an id of its log" : ": history trimmed"}) — `,
      `state refetched at ${n.at.toLocaleTimeString("en-GB")} by replaying the log from the start.`);
  }

  const projects = Object.values(state.projects)
    .sort((a, b) => String(a.name || a.uuid).localeCompare(String(b.name || b.uuid)));
  const rows = projects.map((p) => {
    const tr = document.createElement("tr");
    tr.dataset.uuid = p.uuid;
    if (p.uuid === PROJECT) tr.classList.add("focus");
    if (session.fresh.has(p.uuid)) tr.classList.add("fresh");
    const change = p.lastChange
      ? [codeText(p.lastChange.event), ` ${time(p.lastChange.at)}`]
      : ["—"];
    tr.append(
      cell("name", String(p.name || "(unnamed)")),
      cell("status-cell", statusPill(p.status)),
      cell("uuid", p.uuid),
      cell("change", ...change));
    return tr;
  });
  session.fresh.clear();
  $("projects").tBodies[0].replaceChildren(...rows);
  $("projects-empty").hidden = projects.length > 0;
  $("project-count").textContent = `(${projects.length})`;

  if (PROJECT) {
    const focus = state.projects[PROJECT];
    $("focus-title").textContent = focus ? String(focus.name || "(unnamed)") : "Project not seen yet";
    $("focus-meta").replaceChildren(codeText(PROJECT), focus ? " · " : "", focus ? statusPill(focus.status) : "");
    const items = state.activity.map((a) => {
      const li = document.createElement("li");
      li.dataset.id = a.id;
      const what = document.createElement("span");
      what.className = "what";
      what.textContent = a.event;
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = time(a.at);
      const detail = document.createElement("div");
      detail.className = "detail";
      detail.textContent = a.detail || a.id;
      li.append(when, what, detail);
      return li;
    });
    if (!items.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "No activity yet.";
      items.push(li);
    }
    $("activity").replaceChildren(...items);
  }
}

// ------------------------------------------------------------------ start

$("gateway").textContent = GATEWAY;
$("topics").textContent = TOPICS.join(" + ");
$("forget").addEventListener("click", () => {
  localStorage.removeItem(STORE_KEY);
  state = emptyState();
  render();
  connect("0");
});
render();
// First load: resume after the saved id, or replay everything (`0`) when
// nothing is saved yet (the example's stand-in for "fetch the state").
connect(state.lastEventId || "0");
