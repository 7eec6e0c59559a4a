// Idle sign-out (ADR 0032): a session with no keyboard, pointer, wheel or touch input for
// `Web__IdleSignOutSeconds` ends. The app warns shortly before, reports activity to the gateway
// (which keeps the deadline that counts, in the session cookie) at most once a minute or a
// quarter of the timeout, and signs out at the deadline, checked on every tick and when the tab
// becomes visible again (a throttled tab or a laptop waking from sleep signs out at once).
//
// The rules are pure functions of the clock, so that they are tested without waiting.

/** What counts as a person's activity. Pointer movement alone (a bumped mouse) does not. */
export const ACTIVITY_EVENTS = ["keydown", "pointerdown", "wheel", "touchstart"] as const;

export type IdleState = "active" | "warn" | "out";

/** How long before the deadline the warning shows: 60 s, or a quarter of the timeout when that
 * is shorter. */
export function warnBefore(timeoutSeconds: number): number {
  return Math.min(60_000, (timeoutSeconds * 1000) / 4);
}

/** Where a session stands at `now` (ms) with its deadline at `deadline` (ms). */
export function idleState(now: number, deadline: number, timeoutSeconds: number): IdleState {
  if (now >= deadline) return "out";
  if (now >= deadline - warnBefore(timeoutSeconds)) return "warn";
  return "active";
}

/** How often activity is reported to the gateway at most: once a minute, or a quarter of the
 * timeout when that is shorter. */
export function reportEvery(timeoutSeconds: number): number {
  return Math.min(60_000, (timeoutSeconds * 1000) / 4);
}

/** Whether activity at `now` is reported, the last report having been at `last` (ms). */
export function dueReport(now: number, last: number, timeoutSeconds: number): boolean {
  return now - last >= reportEvery(timeoutSeconds);
}

/** The sign-in page's words for an idle sign-out after `seconds`. */
export function idleMessage(seconds: number): string {
  const span =
    seconds % 60 === 0
      ? `${seconds / 60} minute${seconds === 60 ? "" : "s"}`
      : `${seconds} second${seconds === 1 ? "" : "s"}`;
  return `You were signed out after ${span} without activity. Sign in to return to where you were.`;
}

export type IdleWatch = {
  /** The deadline moved (a report's answer, or local activity). */
  extend: (deadline: number) => void;
  stop: () => void;
};

/** Watches `target` (the window) for activity: `report` is called when activity is due to be
 * reported (its promise gives the gateway's new deadline, ms), `onState` on every change of
 * state, and `hold` says whether sign-out must wait (an upload in flight). */
export function watchIdle(opts: {
  target: EventTarget & { document?: Document };
  timeoutSeconds: number;
  deadline: number;
  report: () => Promise<number>;
  onState: (s: IdleState, deadline: number) => void;
  hold?: () => boolean;
  now?: () => number;
}): IdleWatch {
  const now = opts.now ?? Date.now;
  let deadline = opts.deadline;
  let lastReport = now();
  let state: IdleState = "active";
  const tick = () => {
    let s = idleState(now(), deadline, opts.timeoutSeconds);
    if (s === "out" && opts.hold?.()) s = "warn";
    if (s !== state) {
      state = s;
      opts.onState(s, deadline);
    }
  };
  const activity = () => {
    if (state === "out") return;
    // Locally the deadline moves at once; the gateway's moves with the next report.
    deadline = Math.max(deadline, now() + opts.timeoutSeconds * 1000);
    if (dueReport(now(), lastReport, opts.timeoutSeconds)) {
      lastReport = now();
      opts.report().then(
        (d) => {
          deadline = Math.max(deadline, d);
          tick();
        },
        () => {},
      );
    }
    tick();
  };
  for (const e of ACTIVITY_EVENTS)
    opts.target.addEventListener(e, activity, { passive: true, capture: true });
  const visible = () => tick();
  opts.target.document?.addEventListener("visibilitychange", visible);
  const timer = setInterval(tick, 1000);
  return {
    extend: (d) => {
      deadline = Math.max(deadline, d);
      lastReport = now();
      tick();
    },
    stop: () => {
      clearInterval(timer);
      for (const e of ACTIVITY_EVENTS) opts.target.removeEventListener(e, activity, { capture: true });
      opts.target.document?.removeEventListener("visibilitychange", visible);
    },
  };
}
