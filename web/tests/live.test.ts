import { describe, expect, it } from "vitest";
import { type FeedState, LiveFeed, socketUrl, type WebSocketLike } from "../src/live";

class FakeSocket implements WebSocketLike {
  onopen: ((e: unknown) => void) | null = null;
  onmessage: ((e: { data: unknown }) => void) | null = null;
  onclose: ((e: { code: number }) => void) | null = null;
  onerror: ((e: unknown) => void) | null = null;
  closed = false;
  constructor(
    readonly url: string,
    readonly protocols: string[],
  ) {}
  close(code = 1000): void {
    this.closed = true;
    this.onclose?.({ code });
  }
  send(m: object): void {
    this.onmessage?.({ data: JSON.stringify(m) });
  }
}

function feed() {
  const sockets: FakeSocket[] = [];
  const states: FeedState[] = [];
  const messages: unknown[] = [];
  const pending: (() => void)[] = [];
  const f = new LiveFeed({
    url: "ws://h/ws",
    token: () => "a.b.c",
    onMessage: (m) => messages.push(m),
    onState: (s) => states.push(s),
    open: (url, protocols) => {
      const s = new FakeSocket(url, protocols);
      sockets.push(s);
      return s;
    },
    schedule: (fn) => pending.push(fn),
  });
  return { f, sockets, states, messages, pending };
}

describe("LiveFeed", () => {
  it("offers the token as a subprotocol and keeps the last cursor", () => {
    const { f, sockets, states, messages } = feed();
    f.start();
    expect(sockets[0].url).toBe("ws://h/ws");
    expect(sockets[0].protocols).toEqual(["mira.v1", "a.b.c"]);
    sockets[0].onopen?.({});
    sockets[0].send({ type: "job.updated", cursor: "c7" });
    sockets[0].send({ type: "slide.updated", cursor: "c5" });
    expect(f.cursor).toBe("c5");
    expect(messages).toHaveLength(2);
    expect(states).toEqual(["live"]);
  });

  it("reconnects after a drop with since= the last cursor, and is live again", () => {
    const { f, sockets, states, pending } = feed();
    f.start();
    sockets[0].onopen?.({});
    sockets[0].send({ type: "hello", cursor: "h0" });
    sockets[0].send({ type: "job.updated", cursor: "a+b/41=" });
    f.drop();
    expect(states).toEqual(["live", "reconnecting"]);
    expect(pending).toHaveLength(1);
    pending[0]();
    expect(sockets[1].url).toBe("ws://h/ws?since=a%2Bb%2F41%3D");
    sockets[1].onopen?.({});
    expect(states).toEqual(["live", "reconnecting", "live"]);
  });

  it("does not resume from a hello in the middle of a catch-up", () => {
    const { f, sockets, pending } = feed();
    f.start();
    sockets[0].onopen?.({});
    sockets[0].send({ type: "hello", cursor: "h0" });
    expect(f.cursor).toBe("h0");
    sockets[0].send({ type: "job.updated", cursor: "j1" });
    f.drop();
    pending[0]();
    sockets[1].onopen?.({});
    // The server stands further on, but the catch-up after j1 has not arrived yet.
    sockets[1].send({ type: "hello", cursor: "h9" });
    expect(f.cursor).toBe("j1");
    f.drop();
    pending[1]();
    expect(sockets[2].url).toBe("ws://h/ws?since=j1");
  });

  it("stays closed once stopped", () => {
    const { f, sockets, states, pending } = feed();
    f.start();
    f.stop();
    expect(sockets[0].closed).toBe(true);
    expect(pending).toHaveLength(0);
    expect(states[states.length - 1]).toBe("closed");
  });

  it("uses wss on https and a configured URL when there is one", () => {
    expect(socketUrl({ protocol: "https:", host: "mira.example" }, null)).toBe("wss://mira.example/ws");
    expect(socketUrl({ protocol: "http:", host: "127.0.0.1:8080" }, null)).toBe("ws://127.0.0.1:8080/ws");
    expect(socketUrl({ protocol: "https:", host: "x" }, "wss://rt.example/ws")).toBe("wss://rt.example/ws");
  });
});
