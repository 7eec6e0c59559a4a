// The audit trail (auditors): the tenant's events from the log, filtered by slide (chosen by
// name; its jobs' events come with it), user, event type, id (whole or short) and time, a page
// of 50 at a time, each payload folded away. The export is the log's own verifiable export
// (`GET /api/audit/export`: events, checkpoints and their leaves), which `tools/verify_export.py`
// checks with the public audit key alone.

import { useEffect, useState } from "preact/hooks";
import { AUDITORS, api, holds, type Slide, type SlidePage } from "../api";
import type { Session } from "../auth";
import { download } from "../download";
import { clock, shortHash, time } from "../format";
import { shortId } from "../names";
import { useHeading } from "../nav";
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

type AuditPage = { items: AuditEvent[]; next?: number | null };

type Filters = {
  /** A slide's id, chosen by its name. */
  slide: string;
  actor: string;
  event_type: string;
  /** A job's, slide's or other stream's id, whole or its last 8 characters. */
  aggregate_id: string;
  /** `datetime-local` values, in the browser's time zone. */
  from: string;
  to: string;
};

const NO_FILTER: Filters = { slide: "", actor: "", event_type: "", aggregate_id: "", from: "", to: "" };

/** Events on a page: a page a person reads, not a scroll of thousands of pixels. */
export const PAGE_SIZE = 50;

/** How many of the tenant's slides the slide filter offers (the newest). */
const SLIDE_CHOICES = 2000;

const iso = (local: string) => new Date(local).toISOString();

function query(f: Filters, after: number | null): string {
  const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (after) q.set("after", String(after));
  if (f.slide) q.set("slide", f.slide);
  if (f.actor.trim()) q.set("actor", f.actor.trim());
  if (f.event_type) q.set("event_type", f.event_type);
  if (f.aggregate_id.trim()) q.set("aggregate_id", f.aggregate_id.trim());
  if (f.from) q.set("from", iso(f.from));
  if (f.to) q.set("to", iso(f.to));
  return `/api/audit/events?${q}`;
}

/** The verifiable export of the filters' time range (the other filters would break its chain). */
function exportQuery(f: Filters): string {
  const q = new URLSearchParams();
  if (f.from) q.set("from", iso(f.from));
  if (f.to) q.set("to", iso(f.to));
  const s = q.toString();
  return `/api/audit/export${s ? `?${s}` : ""}`;
}

/** The slides to choose from, newest first, with a name each: a name two slides share gets
 * their short ids, an erased name the short id alone. */
function slideChoices(slides: Slide[]): { id: string; label: string }[] {
  const count = new Map<string, number>();
  for (const s of slides) if (s.name) count.set(s.name, (count.get(s.name) ?? 0) + 1);
  return slides.map((s) => ({
    id: s.slide_id,
    label: !s.name
      ? `slide ${shortId(s.slide_id)} (name erased)`
      : (count.get(s.name) ?? 0) > 1
        ? `${s.name} (${shortId(s.slide_id)})`
        : s.name,
  }));
}

export function AuditPage(props: { who: Session }) {
  const auditor = holds(props.who, AUDITORS);
  const heading = useHeading("Audit trail");
  const [draft, setDraft] = useState<Filters>(NO_FILTER);
  const [applied, setApplied] = useState<Filters>(NO_FILTER);
  /** The `after` of each page read so far, up to the one shown: Previous goes back one. */
  const [trail, setTrail] = useState<(number | null)[]>([null]);
  const [page, setPage] = useState<{ url: string; items: AuditEvent[]; next: number | null } | null>(null);
  const [error, setError] = useState("");
  const [showAll, setShowAll] = useState(false);
  const [slides, setSlides] = useState<{ id: string; label: string }[]>([]);
  const [types, setTypes] = useState<string[]>([]);
  const [choicesError, setChoicesError] = useState("");
  const [exporting, setExporting] = useState(false);

  const after = trail[trail.length - 1];
  useEffect(() => {
    if (!auditor) return;
    let gone = false;
    const url = query(applied, after);
    setError("");
    api<AuditPage>(url).then(
      (p) => {
        if (!gone) setPage({ url, items: p.items, next: p.next ?? null });
      },
      (e) => {
        if (!gone) setError((e as Error).message);
      },
    );
    return () => {
      gone = true;
    };
  }, [auditor, applied, after]);

  // What the filters offer: the tenant's slides by name, and the log's event types.
  useEffect(() => {
    if (!auditor) return;
    (async () => {
      const all: Slide[] = [];
      let cursor: string | null = null;
      do {
        const q = new URLSearchParams({ limit: "500" });
        if (cursor) q.set("cursor", cursor);
        const p: SlidePage = await api<SlidePage>(`/api/slides?${q}`);
        all.push(...p.items);
        cursor = p.next ?? null;
      } while (cursor && all.length < SLIDE_CHOICES);
      setSlides(slideChoices(all));
    })().catch((e) => setChoicesError(`The slides to filter by could not be read: ${(e as Error).message}`));
    api<{ event_types: string[] }>("/api/audit/event-types").then(
      (t) => setTypes(t.event_types),
      (e) => setChoicesError(`The event types could not be read: ${(e as Error).message}`),
    );
  }, [auditor]);

  if (!auditor)
    return (
      <>
        <h1 ref={heading} tabIndex={-1}>
          Audit trail
        </h1>
        <p role="alert">The audit trail needs the auditor role.</p>
      </>
    );

  const events = page?.items ?? [];
  // Grouping is for reading only; someone who asks for lease renewals or progress reports sees each one.
  const rows = timelineRows(events, {
    showAll: showAll || ROUTINE.has(applied.event_type),
    stream: (e) => e.aggregate_id,
  });
  const filtered = Object.values(applied).some((v) => v.trim());
  const first = (trail.length - 1) * PAGE_SIZE + 1;

  const exportAll = async () => {
    setExporting(true);
    setError("");
    try {
      const tenant = props.who.tenant.replace(/[^A-Za-z0-9._-]+/g, "-");
      await download(exportQuery(draft), `mira-audit-${tenant}.jsonl`);
    } catch (e) {
      setError(`The export failed: ${(e as Error).message}`);
    } finally {
      setExporting(false);
    }
  };

  const set = (k: keyof Filters) => (e: Event) =>
    setDraft({ ...draft, [k]: (e.currentTarget as HTMLInputElement | HTMLSelectElement).value });
  return (
    <section aria-labelledby="audit-title">
      <h1 id="audit-title" ref={heading} tabIndex={-1}>
        Audit trail
      </h1>
      <form
        class="filters"
        aria-label="Filter the events"
        onSubmit={(e) => {
          e.preventDefault();
          setApplied({ ...draft });
          setTrail([null]);
        }}
      >
        <div class="field">
          <label for="audit-slide">Slide</label>
          <select id="audit-slide" name="slide" value={draft.slide} onChange={set("slide")}>
            <option value="">any slide</option>
            {slides.map((s) => (
              <option key={s.id} value={s.id}>
                {s.label}
              </option>
            ))}
          </select>
        </div>
        <div class="field">
          <label for="audit-actor">User</label>
          <input
            id="audit-actor"
            name="actor"
            value={draft.actor}
            onInput={set("actor")}
            autoComplete="off"
          />
        </div>
        <div class="field">
          <label for="audit-type">Event type</label>
          <select id="audit-type" name="event_type" value={draft.event_type} onChange={set("event_type")}>
            <option value="">any event</option>
            {types.map((t) => (
              <option key={t} value={t}>
                {t}
              </option>
            ))}
          </select>
        </div>
        <div class="field">
          <label for="audit-id">Job or slide id</label>
          <input
            id="audit-id"
            name="aggregate_id"
            value={draft.aggregate_id}
            onInput={set("aggregate_id")}
            aria-describedby="id-help"
            autoComplete="off"
            spellcheck={false}
          />
          <span id="id-help" class="help">
            The whole id, or its last 8 characters.
          </span>
        </div>
        <div class="field">
          <label for="audit-from">From</label>
          <input id="audit-from" name="from" type="datetime-local" value={draft.from} onInput={set("from")} />
        </div>
        <div class="field">
          <label for="audit-to">To</label>
          <input id="audit-to" name="to" type="datetime-local" value={draft.to} onInput={set("to")} />
        </div>
        <div class="actions">
          <button type="submit">Filter</button>
          <button type="button" disabled={exporting} aria-describedby="export-help" onClick={exportAll}>
            {exporting ? "Exporting…" : "Export (verifiable)"}
          </button>
        </div>
        <p id="export-help" class="help">
          The export holds every event from and to the times above (all of them when none is set), with the
          signed checkpoints over them, as JSON Lines that <code>tools/verify_export.py</code> checks with the
          public audit key.
        </p>
      </form>
      {choicesError && <p class="error">{choicesError}</p>}
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      <label class="check">
        <input type="checkbox" checked={showAll} onChange={(e) => setShowAll(e.currentTarget.checked)} />
        Show every event
      </label>
      <table class="cards" data-query={page?.url ?? ""}>
        <TableHead
          caption="The tenant's events from the log"
          columns={["Position", "Time", "Aggregate", "Event", "Actor", "Hash"]}
        />
        <tbody>
          {rows.map((r) =>
            r.kind === "routine" ? (
              <RoutineRow key={r.events[0].event_id} run={r} />
            ) : (
              <tr
                key={r.event.event_id}
                data-event={r.event.event_type}
                data-aggregate={r.event.aggregate_id}
              >
                <td data-label="Position">{r.event.global_position}</td>
                <td data-label="Time">{time(r.event.recorded_at)}</td>
                <td data-label="Aggregate">
                  {r.event.aggregate_type}{" "}
                  <code title={r.event.aggregate_id}>{shortId(r.event.aggregate_id)}</code> #
                  {r.event.sequence}
                </td>
                <td data-label="Event">
                  {r.event.event_type}
                  <details class="payload">
                    <summary>
                      Payload<span class="visually-hidden"> of event {r.event.global_position}</span>
                    </summary>
                    <pre>{JSON.stringify(r.event.payload, null, 2)}</pre>
                  </details>
                </td>
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
      {!page && !error && <p class="muted">Loading…</p>}
      {page && events.length === 0 && (
        <p class="muted" data-empty={filtered ? "no-match" : "none"}>
          {trail.length > 1
            ? "No more events."
            : filtered
              ? "No event matches these filters."
              : "No events yet."}
        </p>
      )}
      <nav class="pager" aria-label="Pages of events">
        {page && events.length > 0 && (
          <span class="muted" data-page={trail.length}>
            Events {first}–{first + events.length - 1}
          </span>
        )}
        {trail.length > 1 && (
          <button type="button" onClick={() => setTrail(trail.slice(0, -1))}>
            Previous page
          </button>
        )}
        {page?.next && (
          <button type="button" onClick={() => page.next && setTrail([...trail, page.next])}>
            Next page
          </button>
        )}
      </nav>
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
    <tr
      data-event="lease-extensions"
      data-aggregate={first.aggregate_id}
      data-count={run.leases}
      data-progress={run.progress}
    >
      <td data-label="Position">{span(first.global_position, last.global_position)}</td>
      <td data-label="Time">{time(run.firstAt)}</td>
      <td data-label="Aggregate">
        {first.aggregate_type} <code title={first.aggregate_id}>{shortId(first.aggregate_id)}</code> #
        {span(first.sequence, last.sequence)}
      </td>
      <td data-label="Event">{routineSummary(run, clock)}</td>
      <td data-label="Actor">{actors.join(", ")}</td>
      <td data-label="Hash">
        <code title={last.hash}>{shortHash(last.hash)}</code>
      </td>
    </tr>
  );
}
