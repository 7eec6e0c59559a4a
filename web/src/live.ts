// The live feed: `GET /ws` with the token as a subprotocol. Every message carries an opaque
// resume cursor; after a dropped connection the feed reconnects with `?since=<cursor>` of the
// last message it took, so the server first sends everything that changed meanwhile. The
// state says whether the page is live or catching up. One feed is shared by every page: the
// shell (app.tsx) hands each message on (broadcast), and a page listens while it is shown
// (useLive).

import { useEffect } from "preact/hooks";

export type FeedState = "connecting" | "live" | "reconnecting" | "closed";

export type FeedMessage = { type: string; cursor?: string; job?: unknown; slide?: unknown };

export type WebSocketLike = {
  onopen: ((e: unknown) => void) | null;
  onmessage: ((e: { data: unknown }) => void) | null;
  onclose: ((e: { code: number }) => void) | null;
  onerror: ((e: unknown) => void) | null;
  close(code?: number): void;
};

export type FeedOptions = {
  /** The socket URL, `ws://host/ws` or `Realtime__WebSocketUrl`. */
  url: string;
  token: () => string | null;
  onMessage: (m: FeedMessage) => void;
  onState: (s: FeedState) => void;
  open?: (url: string, protocols: string[]) => WebSocketLike;
  /** Wait before the n-th reconnect (from 1), in ms. */
  backoff?: (n: number) => number;
  schedule?: (f: () => void, ms: number) => void;
};

export class LiveFeed {
  /** Where the next connection resumes: the cursor of the last message taken. */
  cursor: string | null = null;
  private socket: WebSocketLike | null = null;
  private stopped = false;
  private failures = 0;
  private state: FeedState = "connecting";

  constructor(private readonly o: FeedOptions) {}

  start(): void {
    this.stopped = false;
    this.connect();
  }

  stop(): void {
    this.stopped = true;
    this.socket?.close(1000);
    this.setState("closed");
  }

  /** Drops the connection as a network failure would (the page then catches up). */
  drop(): void {
    this.socket?.close(4000);
  }

  private setState(s: FeedState): void {
    if (s !== this.state) {
      this.state = s;
      this.o.onState(s);
    }
  }

  /** The URL of the next connection: with `since` once a cursor is known. */
  nextUrl(): string {
    if (!this.cursor) return this.o.url;
    const sep = this.o.url.includes("?") ? "&" : "?";
    return `${this.o.url}${sep}since=${encodeURIComponent(this.cursor)}`;
  }

  private connect(): void {
    const token = this.o.token();
    if (!token || this.stopped) return;
    const open = this.o.open ?? ((u: string, p: string[]) => new WebSocket(u, p) as unknown as WebSocketLike);
    const s = open(this.nextUrl(), ["mira.v1", token]);
    this.socket = s;
    s.onopen = () => {
      this.failures = 0;
      this.setState("live");
    };
    s.onmessage = (e) => {
      let m: FeedMessage;
      try {
        m = JSON.parse(String(e.data));
      } catch {
        return;
      }
      // Cursors are opaque: the last one taken is where to resume. A `hello` says where the
      // server stands before it catches up, so it counts only on a first connection (a drop
      // in the middle of a catch-up must resume before what was not sent yet).
      if (typeof m.cursor === "string" && (m.type !== "hello" || this.cursor === null))
        this.cursor = m.cursor;
      this.o.onMessage(m);
    };
    s.onerror = () => {};
    s.onclose = () => {
      if (this.socket !== s) return;
      this.socket = null;
      if (this.stopped) return;
      this.failures += 1;
      this.setState("reconnecting");
      const wait = (this.o.backoff ?? ((n) => Math.min(10_000, 250 * 2 ** (n - 1))))(this.failures);
      (this.o.schedule ?? ((f, ms) => setTimeout(f, ms)))(() => this.connect(), wait);
    };
  }
}

/** The socket URL for a page at `location`, unless the API names another. */
export function socketUrl(loc: { protocol: string; host: string }, configured: string | null): string {
  if (configured) return configured;
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

// The pages' share of the one feed.
type LiveListener = (m: FeedMessage) => void;
const liveListeners = new Set<LiveListener>();

/** Hands a message the feed took to every page listening. */
export function broadcast(m: FeedMessage): void {
  for (const l of liveListeners) l(m);
}

/** Calls `l` with every message the feed takes while the calling component is shown. */
export function useLive(l: LiveListener): void {
  useEffect(() => {
    liveListeners.add(l);
    return () => {
      liveListeners.delete(l);
    };
  }, [l]);
}
