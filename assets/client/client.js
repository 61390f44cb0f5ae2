// sse-gateway's browser client, no dependencies. API: client.d.ts, docs/API.md.
// fetch, not EventSource: every event name arrives, refusals are readable.

/** `<epoch>-<seq>` -> [epoch, seq]; anything else -> null. */
const parse = (id) => {
  const m = /^(.+)-(0|[1-9]\d*)$/.exec(id || "");
  return m && [m[1], BigInt(m[2])];
};

/** Whether id `a` comes after id `b` (a new epoch is a new log: after). */
const after = (a, b) => {
  const x = parse(a);
  const y = parse(b);
  return !x || !y || x[0] !== y[0] || x[1] > y[1];
};

// Reads /events from `from`, reconnecting after `retry:` ms, until stop();
// emit() gets {id, event, data, text} events and {id} positions.
function read(base, topics, from, o, emit, state) {
  let last = from;
  let retry = 2000;
  let ctl;
  let timer;
  let stopped = false;
  const connect = async () => {
    stop.poke = null;
    ctl = new AbortController();
    const url = new URL("events", base);
    for (const t of topics) url.searchParams.append("topic", t);
    if (last) url.searchParams.set("last_event_id", last);
    try {
      const token = typeof o.token === "function" ? await o.token() : o.token;
      if (token) url.searchParams.set("access_token", token);
      const r = await fetch(url, {
        signal: ctl.signal, cache: "no-store", credentials: o.credentials || "same-origin",
        headers: { accept: "text/event-stream" },
      });
      if (!r.ok) {
        // A 4xx will not change by retrying (EventSource gives up too).
        let error = { status: r.status };
        try { error = { ...error, ...(await r.json()).error }; } catch {}
        if (r.status < 500 && r.status !== 408 && r.status !== 429) return state("closed", error);
        throw error;
      }
      state("open");
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      let ev = {};
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let m;
        // A CR at the end may be the first half of a CRLF: wait for more.
        while (!stopped && (m = /\r\n|\r(?!$)|\n/.exec(buf))) {
          const line = buf.slice(0, m.index);
          buf = buf.slice(m.index + m[0].length);
          if (!line) {
            if (ev.id !== undefined) last = ev.id;
            if (ev.data !== undefined) {
              let data = ev.data;
              try { data = JSON.parse(data); } catch {}
              emit({ id: last, event: ev.event || "message", data, text: ev.data });
            } else if (ev.id) emit({ id: ev.id });
            ev = {};
            continue;
          }
          const c = line.indexOf(":");
          if (!c) continue;
          const field = c < 0 ? line : line.slice(0, c);
          const v = c < 0 ? "" : line.slice(c + 1).replace(/^ /, "");
          if (field === "data") ev.data = ev.data === undefined ? v : `${ev.data}\n${v}`;
          else if (field === "id" && !v.includes("\0")) ev.id = v;
          else if (field === "event") ev.event = v;
          else if (field === "retry" && /^\d+$/.test(v)) retry = +v;
        }
      }
    } catch (e) {
      if (stopped) return;
    }
    if (stopped) return;
    state("reconnecting");
    timer = setTimeout(connect, retry);
    // Hidden tabs' timers may be throttled: a tab that shows pokes.
    stop.poke = () => {
      stop.poke = null;
      clearTimeout(timer);
      connect();
    };
  };
  function stop() {
    stopped = true;
    clearTimeout(timer);
    if (ctl) ctl.abort();
  }
  // Not before subscribe() has returned its handle.
  timer = setTimeout(() => {
    state("connecting");
    connect();
  });
  return stop;
}

/** See client.d.ts. */
export function subscribe(topics, o = {}) {
  topics = [...new Set([].concat(topics))].sort();
  const base = new URL(o.url || ".", import.meta.url);
  if (!base.pathname.endsWith("/")) base.pathname += "/";
  const key = o.storageKey || `sse-gateway:${base}${topics.join(",")}`;
  const stored = () => {
    try { return localStorage.getItem(key); } catch { return null; }
  };
  const store = (id) => {
    try { localStorage.setItem(key, id); } catch {}
  };
  const sub = { lastId: null, leader: false, close };
  let closed = false;
  let stop;
  let release;
  let channel;
  let abort;
  let catchUp;

  // A callback that throws must not break the (shared) stream.
  const call = (f, ...args) => {
    try {
      if (f) f(...args);
    } catch (e) {
      setTimeout(() => { throw e; });
    }
  };
  const deliver = (m) => {
    if (closed) return;
    if (m.state) return call(o.onState, m.state, m.detail);
    if (m.event === "reset") {
      sub.lastId = m.id;
      call(o.onReset, m.data, m.id);
    } else if (m.event && (!sub.lastId || after(m.id, sub.lastId))) {
      sub.lastId = m.id;
      call(o.onEvent, m);
    }
  };
  const poke = () => {
    if (stop && stop.poke) stop.poke();
  };
  let now;
  const state = (s, detail) => {
    now = { state: s, detail };
    deliver(now);
    if (channel) channel.postMessage(now);
  };
  const start = (from) => read(base, topics, from, o, (m) => {
    if (m.id) store(m.id);
    if (channel) channel.postMessage(m);
    deliver(m);
  }, state);

  const locks = globalThis.navigator?.locks;
  if (o.shareAcrossTabs && locks && globalThis.BroadcastChannel) {
    channel = new BroadcastChannel(key);
    // With `from`, what is relayed is held until this tab has caught up.
    let held = o.from && [];
    const flush = () => {
      const h = held;
      held = null;
      if (h) h.forEach(deliver);
    };
    channel.onmessage = ({ data }) => {
      // A tab that joins (or shows) asks where the stream is.
      if (!data.ask) return held ? held.push(data) : deliver(data);
      if (sub.leader && now) channel.postMessage(now);
      poke();
    };
    channel.postMessage({ ask: 1 });
    const ctl = new AbortController();
    const lead = (from) => new Promise((resolve) => {
      if (closed) return resolve();
      release = resolve;
      sub.leader = true;
      stop = start(from);
    });
    abort = () => ctl.abort();
    locks.request(key, { ifAvailable: true }, (lock) => {
      if (lock) {
        held = null;
        return lead(o.from !== undefined ? o.from : stored());
      }
      // Another tab reads the stream: follow it, after reading from an older
      // `from` up to the id it relayed last.
      const to = stored();
      if (o.from && to && after(to, o.from)) {
        catchUp = read(base, topics, o.from, o, (m) => {
          deliver(m);
          if (m.id && !after(to, m.id)) catchUp(flush());
        }, (s) => s === "closed" && catchUp(flush()));
      } else flush();
      // When that tab goes, resume from the last id it relayed (or, still
      // catching up, from where this tab is).
      return locks.request(key, { signal: ctl.signal }, () => {
        catchUp && catchUp();
        const from = held ? sub.lastId || o.from : stored();
        held = null;
        return lead(from);
      });
    }).catch(() => {});
  } else {
    stop = start(o.from !== undefined ? o.from : stored());
  }
  const doc = globalThis.document;
  const visible = () => {
    if (doc.visibilityState !== "visible") return;
    poke();
    if (channel) channel.postMessage({ ask: 1 });
  };
  doc?.addEventListener("visibilitychange", visible);

  function close() {
    closed = true;
    doc?.removeEventListener("visibilitychange", visible);
    if (stop) stop();
    if (release) release();
    if (abort) abort();
    if (catchUp) catchUp();
    if (channel) channel.close();
  }
  return sub;
}
