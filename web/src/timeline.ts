// The rows a list of log events shows. A running attempt renews its lease every third of it
// and reports progress every few seconds, interleaved; that routine is grouped: each run of
// consecutive `JobLeaseExtended` and `JobProgressed` events becomes one summary row that keeps
// the events it stands for. Display only: exports and counts use the events themselves.

export const LEASE_EXTENDED = "JobLeaseExtended";
export const PROGRESSED = "JobProgressed";

/** The event types a run is made of; any other type ends the run. */
export const ROUTINE: ReadonlySet<string> = new Set([LEASE_EXTENDED, PROGRESSED]);

type Recorded = { event_type: string; recorded_at: string };

/** One run of a running attempt's routine events, shown as one row. */
export type RoutineRun<E> = {
  kind: "routine";
  /** How many of its events are `JobLeaseExtended`. */
  leases: number;
  /** How many of its events are `JobProgressed`. */
  progress: number;
  firstAt: string;
  lastAt: string;
  /** The events the row stands for, in list order (never empty). */
  events: E[];
};

export type TimelineRow<E> = { kind: "event"; event: E } | RoutineRun<E>;

export type RowOptions<E> = {
  /** Every event its own row: no grouping. */
  showAll?: boolean;
  /**
   * Which stream an event belongs to, when the list mixes several (the audit trail): a run is
   * then the consecutive routine events of one stream, and events of other streams between
   * them do not break it. The summary row stands where the run's first event would.
   */
  stream?: (e: E) => string;
};

/**
 * The rows for `events` (in display order): each run of routine events as one row. A run
 * becomes a summary row when it holds a lease renewal or at least two events; a lone progress
 * report stays an event row, as a summary of one would hide nothing.
 */
export function timelineRows<E extends Recorded>(
  events: readonly E[],
  options: RowOptions<E> = {},
): TimelineRow<E>[] {
  if (options.showAll) return events.map((event) => ({ kind: "event", event }));
  const streamOf = options.stream ?? (() => "");
  const open = new Map<string, RoutineRun<E>>();
  const rows: TimelineRow<E>[] = [];
  for (const event of events) {
    const stream = streamOf(event);
    if (!ROUTINE.has(event.event_type)) {
      open.delete(stream);
      rows.push({ kind: "event", event });
      continue;
    }
    let run = open.get(stream);
    if (run) {
      run.events.push(event);
      run.lastAt = event.recorded_at;
    } else {
      run = {
        kind: "routine",
        leases: 0,
        progress: 0,
        firstAt: event.recorded_at,
        lastAt: event.recorded_at,
        events: [event],
      };
      open.set(stream, run);
      rows.push(run);
    }
    if (event.event_type === LEASE_EXTENDED) run.leases += 1;
    else run.progress += 1;
  }
  return rows.map((r) =>
    r.kind === "routine" && r.leases === 0 && r.events.length === 1
      ? { kind: "event", event: r.events[0] }
      : r,
  );
}

/** "5–7", or "5" for one. */
export function span(first: number | string, last: number | string): string {
  return first === last ? `${first}` : `${first}–${last}`;
}

/**
 * "Running: lease renewed 3 times, 6 progress reports (12:00:01 – 12:00:41)", with `clock`
 * formatting the times; a part whose count is 0 is left out.
 */
export function routineSummary(run: RoutineRun<unknown>, clock: (iso: string) => string): string {
  const parts: string[] = [];
  if (run.leases > 0) parts.push(`lease renewed ${run.leases === 1 ? "once" : `${run.leases} times`}`);
  if (run.progress > 0) parts.push(`${run.progress} progress report${run.progress === 1 ? "" : "s"}`);
  const from = clock(run.firstAt);
  const to = clock(run.lastAt);
  return `Running: ${parts.join(", ")} (${from === to ? from : `${from} – ${to}`})`;
}
