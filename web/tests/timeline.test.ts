import { describe, expect, it } from "vitest";
import { type RoutineRun, routineSummary, span, type TimelineRow, timelineRows } from "../src/timeline";

type Ev = { id: string; event_type: string; recorded_at: string; aggregate_id: string };

let n = 0;
const two = (x: number) => String(x).padStart(2, "0");
function ev(event_type: string, aggregate_id = "job-a"): Ev {
  n += 1;
  return {
    id: `e${n}`,
    event_type,
    recorded_at: `2026-01-01T12:${two(Math.floor(n / 60))}:${two(n % 60)}Z`,
    aggregate_id,
  };
}
const lease = (aggregate_id?: string) => ev("JobLeaseExtended", aggregate_id);
const progress = (aggregate_id?: string) => ev("JobProgressed", aggregate_id);

/** Each row as a short string: an event's id, or a run's counts and the ids it hides. */
function shape(rows: TimelineRow<Ev>[]): string[] {
  return rows.map((r) =>
    r.kind === "event" ? r.event.id : `L${r.leases}P${r.progress}[${r.events.map((e) => e.id).join(",")}]`,
  );
}
const ids = (events: Ev[], from: number, to: number) =>
  events
    .slice(from, to)
    .map((e) => e.id)
    .join(",");

describe("timelineRows", () => {
  it("makes one summary row of a running attempt's interleaved progress reports and lease renewals", () => {
    // P, P, L, P, P, L, P, P: what a running job appends.
    const events = [
      ev("JobStarted"),
      progress(),
      progress(),
      lease(),
      progress(),
      progress(),
      lease(),
      progress(),
      progress(),
      ev("JobSucceeded"),
    ];
    const rows = timelineRows(events);
    expect(rows).toHaveLength(3);
    expect(rows[0]).toEqual({ kind: "event", event: events[0] });
    expect(rows[2]).toEqual({ kind: "event", event: events[9] });
    const run = rows[1] as RoutineRun<Ev>;
    expect(run.kind).toBe("routine");
    expect(run.leases).toBe(2);
    expect(run.progress).toBe(6);
    expect(run.firstAt).toBe(events[1].recorded_at);
    expect(run.lastAt).toBe(events[8].recorded_at);
    expect(run.events).toEqual(events.slice(1, 9));
  });

  it("gives two summary rows when another event type breaks a run", () => {
    const events = [lease(), progress(), ev("JobRetried"), progress(), lease(), lease()];
    expect(shape(timelineRows(events))).toEqual([
      `L1P1[${ids(events, 0, 2)}]`,
      events[2].id,
      `L2P1[${ids(events, 3, 6)}]`,
    ]);
  });

  it("makes a single lease renewal a summary row, and so two progress reports without one", () => {
    const events = [ev("JobStarted"), lease(), ev("JobRetried"), progress(), progress(), ev("JobSucceeded")];
    expect(shape(timelineRows(events))).toEqual([
      events[0].id,
      `L1P0[${events[1].id}]`,
      events[2].id,
      `L0P2[${ids(events, 3, 5)}]`,
      events[5].id,
    ]);
    const one = timelineRows(events)[1] as RoutineRun<Ev>;
    expect(one.firstAt).toBe(one.lastAt);
  });

  it("leaves a lone progress report an event row of its own", () => {
    const events = [ev("JobStarted"), progress(), ev("JobSucceeded")];
    expect(timelineRows(events)).toEqual(events.map((event) => ({ kind: "event", event })));
    expect(timelineRows([progress()]).map((r) => r.kind)).toEqual(["event"]);
  });

  it("groups the audit trail's runs per aggregate, in list order", () => {
    // Two jobs run at once; a slide event between them breaks neither run, while job A's
    // own retry does. Job B's last run is a lone progress report.
    const events = [
      ev("JobStarted", "job-a"),
      lease("job-a"),
      progress("job-b"),
      ev("SlideVerified", "slide-1"),
      progress("job-a"),
      lease("job-b"),
      ev("JobRetried", "job-a"),
      lease("job-a"),
      ev("JobSucceeded", "job-b"),
      progress("job-b"),
    ];
    const id = (i: number) => events[i].id;
    const rows = timelineRows(events, { stream: (e) => e.aggregate_id });
    expect(shape(rows)).toEqual([
      id(0),
      `L1P1[${id(1)},${id(4)}]`,
      `L1P1[${id(2)},${id(5)}]`,
      id(3),
      id(6),
      `L1P0[${id(7)}]`,
      id(8),
      id(9),
    ]);
    // Without the aggregate, the list's order alone decides: the slide event breaks the runs.
    expect(shape(timelineRows(events))).toEqual([
      id(0),
      `L1P1[${id(1)},${id(2)}]`,
      id(3),
      `L1P1[${id(4)},${id(5)}]`,
      id(6),
      `L1P0[${id(7)}]`,
      id(8),
      id(9),
    ]);
  });

  it("shows every event as its own row when asked", () => {
    const events = [ev("JobStarted"), lease(), progress(), progress(), lease(), ev("JobSucceeded")];
    expect(timelineRows(events)).toHaveLength(3);
    const all = timelineRows(events, { showAll: true, stream: (e) => e.aggregate_id });
    expect(all).toEqual(events.map((event) => ({ kind: "event", event })));
  });
});

describe("the summary's text", () => {
  const clock = (iso: string) => iso.slice(11, 19);
  const run = (events: Ev[]) => timelineRows(events)[0] as RoutineRun<Ev>;

  it("names both counts and the range of times", () => {
    const events = [
      progress(),
      progress(),
      lease(),
      progress(),
      progress(),
      lease(),
      progress(),
      progress(),
      lease(),
    ];
    expect(routineSummary(run(events), clock)).toBe(
      `Running: lease renewed 3 times, 6 progress reports (${clock(events[0].recorded_at)} – ${clock(events[8].recorded_at)})`,
    );
  });

  it("says once and one report, and leaves out a count of 0", () => {
    const one = [lease()];
    expect(routineSummary(run(one), clock)).toBe(
      `Running: lease renewed once (${clock(one[0].recorded_at)})`,
    );
    const pair = [lease(), progress()];
    expect(routineSummary(run(pair), clock)).toBe(
      `Running: lease renewed once, 1 progress report (${clock(pair[0].recorded_at)} – ${clock(pair[1].recorded_at)})`,
    );
    const reports = [progress(), progress()];
    expect(routineSummary(run(reports), clock)).toBe(
      `Running: 2 progress reports (${clock(reports[0].recorded_at)} – ${clock(reports[1].recorded_at)})`,
    );
  });

  it("writes a range of one as one", () => {
    expect(span(5, 7)).toBe("5–7");
    expect(span(5, 5)).toBe("5");
  });
});
