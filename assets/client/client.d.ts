// Types of sse-gateway's browser client, `GET /client.js` (this file is
// `GET /client.d.ts`). Wire format, ids and resets: docs/API.md.

/** One event of the stream. */
export interface GatewayEvent<T = unknown> {
  /** `<epoch>-<seq>`; opaque to apps, growing in publish order within one log. */
  id: string;
  /** The event name (`message` when the publisher gave none). */
  event: string;
  /** The data, parsed as JSON (the text itself when it is not JSON). */
  data: T;
  /** The data exactly as sent on the wire. */
  text: string;
}

/** The `data` of a `reset` event (docs/API.md, "Reset"). */
export interface ResetInfo {
  reason: "retention" | "unknown_id";
  /** The id the stream was asked to resume from. */
  requested: string;
  /** The oldest retained id of the topics, or null when they hold none. */
  oldest: string | null;
}

/**
 * - `connecting`: a request is on its way;
 * - `open`: the stream is live (also after a replay);
 * - `reconnecting`: the connection dropped or the gateway shed it; retrying
 *   after the gateway's `retry:` delay, from the last id;
 * - `closed`: the gateway refused the stream (400, 401, 403, …); no retry.
 *   `detail` is `{status, code?, message?}` from the JSON error.
 */
export type StreamState = "connecting" | "open" | "reconnecting" | "closed";

export interface StreamError {
  status: number;
  code?: string;
  message?: string;
}

export interface SubscribeOptions {
  /**
   * The gateway's base URL. Default: where client.js was loaded from, so
   * `import … from "https://gw.example/client.js"` streams from that gateway.
   */
  url?: string | URL;
  /**
   * Where to start: `"0"` (every retained event), an id (every event after
   * it), or `null` / `""` (live from now). Default: the last id kept in
   * localStorage for this gateway and topic set, else live. With
   * `shareAcrossTabs`, a tab that joins a shared stream with a `from` older
   * than the last id relayed first reads the events up to it on a stream of
   * its own (holding what is relayed meanwhile), then follows; without
   * `from`, it receives the shared stream's events from then on.
   */
  from?: string | null;
  /**
   * Every event, once, in id order (across reconnects and leader changes).
   * A callback that throws does not stop the stream: the error is rethrown
   * from a timer (so it shows in the console) and the next event comes.
   */
  onEvent?: (event: GatewayEvent) => void;
  /**
   * The gateway could not resume from the last id (history trimmed, or
   * another log): refetch your state, then keep going; the stream carries on
   * after `id`.
   */
  onReset?: (info: ResetInfo, id: string) => void;
  /** Connection state changes (in every tab when shared). */
  onState?: (state: StreamState, detail?: StreamError) => void;
  /**
   * One stream for all tabs of this origin with the same gateway and topic
   * set: the tab holding a Web Lock reads it and relays every event on a
   * BroadcastChannel; when that tab closes another takes the lock at once and
   * resumes from the last id it relayed. Falls back to one stream per tab
   * where Web Locks or BroadcastChannel are missing. A tab that joins, or
   * becomes visible, asks the reading tab for the current state and to
   * retry a pending reconnect at once (a hidden tab's timers may be
   * throttled).
   */
  shareAcrossTabs?: boolean;
  /** Sent as `?access_token=` (a function is called on every (re)connect). */
  token?: string | (() => string | Promise<string>);
  /** fetch credentials; default `same-origin` (the console's token cookie). */
  credentials?: RequestCredentials;
  /** The localStorage key (and lock and channel name). Default: from gateway URL and topics. */
  storageKey?: string;
}

export interface Subscription {
  /** Stops the stream (and hands it to another tab when this one read it). */
  close(): void;
  /** The id of the last event (or reset) delivered to this tab. */
  readonly lastId: string | null;
  /** Whether this tab reads the shared stream. */
  readonly leader: boolean;
}

/** Streams `topics` (one name or a list, 1 to 64) from `GET /events`. */
export function subscribe(topics: string | string[], options?: SubscribeOptions): Subscription;
