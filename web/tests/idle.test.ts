import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { dueReport, idleMessage, idleState, reportEvery, warnBefore, watchIdle } from "../src/idle";

describe("the idle rules", () => {
  it("warn a minute before, or a quarter of a short timeout", () => {
    expect(warnBefore(900)).toBe(60_000);
    expect(warnBefore(5)).toBe(1250);
    const deadline = 1_000_000;
    expect(idleState(deadline - 60_001, deadline, 900)).toBe("active");
    expect(idleState(deadline - 60_000, deadline, 900)).toBe("warn");
    expect(idleState(deadline - 1, deadline, 900)).toBe("warn");
    expect(idleState(deadline, deadline, 900)).toBe("out");
    // A laptop waking an hour later is out at once.
    expect(idleState(deadline + 3_600_000, deadline, 900)).toBe("out");
  });

  it("report activity at most once a minute, or a quarter of a short timeout", () => {
    expect(reportEvery(900)).toBe(60_000);
    expect(reportEvery(8)).toBe(2000);
    expect(dueReport(59_999, 0, 900)).toBe(false);
    expect(dueReport(60_000, 0, 900)).toBe(true);
  });

  it("say how long in words a person reads", () => {
    expect(idleMessage(900)).toBe(
      "You were signed out after 15 minutes without activity. Sign in to return to where you were.",
    );
    expect(idleMessage(60)).toContain("after 1 minute without");
    expect(idleMessage(5)).toContain("after 5 seconds without");
  });
});

describe("the watch", () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it("keeps a session with input, warns, then signs out; a bumped mouse is no activity", async () => {
    const target = new EventTarget();
    const states: string[] = [];
    let reports = 0;
    const w = watchIdle({
      target,
      timeoutSeconds: 8,
      deadline: Date.now() + 8000,
      report: async () => {
        reports++;
        return Date.now() + 8000;
      },
      onState: (s) => states.push(s),
    });
    // Input every 2 s for 12 s: never warned.
    for (let i = 0; i < 6; i++) {
      vi.advanceTimersByTime(2000);
      target.dispatchEvent(new Event(i % 2 ? "keydown" : "pointerdown"));
      await Promise.resolve();
    }
    expect(states).toEqual([]);
    expect(reports).toBeGreaterThanOrEqual(3);
    // Then only the mouse moves: warned 2 s before, out at 8 s.
    for (let i = 0; i < 5; i++) {
      vi.advanceTimersByTime(1000);
      target.dispatchEvent(new Event("pointermove"));
    }
    expect(states).toEqual([]);
    vi.advanceTimersByTime(1500);
    expect(states).toEqual(["warn"]);
    vi.advanceTimersByTime(2000);
    expect(states).toEqual(["warn", "out"]);
    w.stop();
  });

  it("holds the sign-out while an upload runs", () => {
    const target = new EventTarget();
    const states: string[] = [];
    let uploading = true;
    const w = watchIdle({
      target,
      timeoutSeconds: 5,
      deadline: Date.now() + 5000,
      report: async () => Date.now() + 5000,
      onState: (s) => states.push(s),
      hold: () => uploading,
    });
    vi.advanceTimersByTime(10_000);
    expect(states).toEqual(["warn"]);
    uploading = false;
    vi.advanceTimersByTime(1000);
    expect(states).toEqual(["warn", "out"]);
    w.stop();
  });
});
