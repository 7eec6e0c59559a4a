import { useCallback, useEffect, useState } from "preact/hooks";
import { AUDITORS, api, holds } from "../api";
import type { Session } from "../auth";
import { clock, shortHash, time } from "../format";
import { usePages } from "../pages";
import { TableHead } from "../table";
import { ROUTINE, type RoutineRun, routineSummary, span, timelineRows } from "../timeline";

type AuditEvent = {
  global_position: number;
  event_id: string;
  aggregate_type: string;
  aggregate_id: string;
  sequence: number;
  event_type: string;
  recorded_at: string;
  metadata: { actor?: { kind?: string; id?: string } };
  hash: string;
  payload: unknown;
};

type Filters = { aggregate_id: string; event_type: string; from: string; to: string };

function query(f: Filters, after: number | null): string {
  const q = new URLSearchParams({ limit: "200" });
  if (after) q.set("after", String(after));
  if (f.aggregate_id.trim()) q.set("aggregate_id", f.aggregate_id.trim());
  if (f.from) q.set("from", new Date(f.from).toISOString());
  if (f.to) q.set("to", new Date(f.to).toISOString());
  return `/api/audit/events?${q}`;
}

export function AuditPage(props: { who: Session }) {
  const [filters, setFilters] = useState<Filters>({ aggregate_id: "", event_type: "", from: "", to: "" });
  const [showAll, setShowAll] = useState(false);
  const auditUrl = useCallback((after: number | null) => query(filters, after), [filters]);
  const { items: events, next, error, setError, load } = usePages<AuditEvent, number>(auditUrl);

  useEffect(() => {
    if (holds(props.who, AUDITORS)) load(null);
  }, []);

  if (!holds(props.who, AUDITORS)) return <p role="alert">The audit trail needs the auditor role.</p>;
  const shown = events.filter((e) => !filters.event_type || e.event_type === filters.event_type);
  // Grouping is for reading only; someone who asks for lease renewals or progress reports sees each one.
  const rows = timelineRows(shown, {
    showAll: showAll || ROUTINE.has(filters.event_type),
    stream: (e) => e.aggregate_id,
  });

  /** Every event the filters select, as JSON Lines, downloaded. */
  const exportAll = async () => {
    const all: AuditEvent[] = [];
    let after: number | null = null;
    do {
      const page: { items: AuditEvent[]; next: number | null } = await api(query(filters, after));
      all.push(...page.items.filter((e) => !filters.event_type || e.event_type === filters.event_type));
      after = page.next;
    } while (after);
    const blob = new Blob([all.map((e) => JSON.stringify(e)).join("\n")], { type: "application/x-ndjson" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `mira-audit-${props.who.tenant}.jsonl`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  };

  const set = (k: keyof Filters) => (e: Event) =>
    setFilters({ ...filters, [k]: (e.currentTarget as HTMLInputElement).value });
  return (
    <section aria-labelledby="audit-title">
      <h1 id="audit-title">Audit trail</h1>
      <form
        class="filters"
        onSubmit={(e) => {
          e.preventDefault();
          load(null);
        }}
      >
        <label>
          Aggregate id
          <input value={filters.aggregate_id} onInput={set("aggregate_id")} />
        </label>
        <label>
          Event type
          <input value={filters.event_type} onInput={set("event_type")} placeholder="JobSucceeded" />
        </label>
        <label>
          From
          <input type="datetime-local" value={filters.from} onInput={set("from")} />
        </label>
        <label>
          To
          <input type="datetime-local" value={filters.to} onInput={set("to")} />
        </label>
        <button type="submit">Filter</button>
        <button type="button" onClick={() => exportAll().catch((e) => setError((e as Error).message))}>
          Export (JSON Lines)
        </button>
      </form>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      <label class="check">
        <input type="checkbox" checked={showAll} onChange={(e) => setShowAll(e.currentTarget.checked)} />
        Show every event
      </label>
      <table class="cards">
        <TableHead
          caption="The tenant's events from the log"
          columns={["Position", "Time", "Aggregate", "Event", "Actor", "Hash"]}
        />
        <tbody>
          {rows.map((r) =>
            r.kind === "routine" ? (
              <RoutineRow key={r.events[0].event_id} run={r} />
            ) : (
              <tr key={r.event.event_id} data-event={r.event.event_type}>
                <td data-label="Position">{r.event.global_position}</td>
                <td data-label="Time">{time(r.event.recorded_at)}</td>
                <td data-label="Aggregate">
                  {r.event.aggregate_type} {r.event.aggregate_id.slice(0, 8)} #{r.event.sequence}
                </td>
                <td data-label="Event">{r.event.event_type}</td>
                <td data-label="Actor">
                  {r.event.metadata.actor?.kind}: {r.event.metadata.actor?.id}
                </td>
                <td data-label="Hash">
                  <code title={r.event.hash}>{shortHash(r.event.hash)}</code>
                </td>
              </tr>
            ),
          )}
        </tbody>
      </table>
      {rows.length === 0 && (
        <p class="muted" data-empty={Object.values(filters).some((v) => v.trim()) ? "no-match" : "none"}>
          {Object.values(filters).some((v) => v.trim())
            ? "No event matches these filters."
            : "No events yet."}
        </p>
      )}
      {next && (
        <button type="button" onClick={() => load(next)}>
          Load more
        </button>
      )}
    </section>
  );
}

/** One row for a run of one aggregate's lease renewals and progress reports. */
function RoutineRow(props: { run: RoutineRun<AuditEvent> }) {
  const { run } = props;
  const first = run.events[0];
  const last = run.events[run.events.length - 1];
  const actors = [...new Set(run.events.map((e) => `${e.metadata.actor?.kind}: ${e.metadata.actor?.id}`))];
  return (
    <tr data-event="lease-extensions" data-count={run.leases} data-progress={run.progress}>
      <td data-label="Position">{span(first.global_position, last.global_position)}</td>
      <td data-label="Time">{time(run.firstAt)}</td>
      <td data-label="Aggregate">
        {first.aggregate_type} {first.aggregate_id.slice(0, 8)} #{span(first.sequence, last.sequence)}
      </td>
      <td data-label="Event">{routineSummary(run, clock)}</td>
      <td data-label="Actor">{actors.join(", ")}</td>
      <td data-label="Hash">
        <code title={last.hash}>{shortHash(last.hash)}</code>
      </td>
    </tr>
  );
}
