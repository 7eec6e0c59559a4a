import { useCallback, useEffect, useState } from "preact/hooks";
import {
  ApiError,
  api,
  type Job,
  type Slide,
  type StreamVerification,
  type Timeline,
  type TimelineEntry,
} from "../api";
import type { Session } from "../auth";
import { Badge } from "../badge";
import { download } from "../download";
import { clock, shortHash, time } from "../format";
import { type FeedMessage, useLive } from "../live";
import { fileName, jobName, shortId, slideNameOf } from "../names";
import { Link, useHeading } from "../nav";
import { PriorityBadge } from "../priority";
import { type Manifest, percentOf, type StatsSummary, summarizeStats } from "../results";
import { statusDetail, withSlide } from "../status";
import { TableHead } from "../table";
import { type RoutineRun, routineSummary, span, timelineRows } from "../timeline";
import { checkpointWords } from "../verify";
import { JobActions, JobProgress, StatusDetailLine } from "./jobs";

/** How long the badge waits before asking again while some of the job's events are not under a
 * signed checkpoint yet (the relay writes one every minute or thousand events, by default). */
const RECHECK_MS = 30_000;

/** Whether the log verifies for this job's events, and how many a signed checkpoint covers
 * (`GET /api/jobs/{id}/verify`, verify.ts). */
export function VerifiedBadge(props: { id: string; version: number }) {
  const [v, setV] = useState<StreamVerification | null>(null);
  const [error, setError] = useState("");
  const [round, setRound] = useState(0);
  useEffect(() => {
    let gone = false;
    api<StreamVerification>(`/api/jobs/${props.id}/verify`).then(
      (r) => {
        if (!gone) setV(r);
      },
      (e) => {
        if (!gone) setError((e as Error).message);
      },
    );
    return () => {
      gone = true;
    };
  }, [props.id, props.version, round]);
  const pending = !!v && !("reason" in v) && v.checkpointed < v.events;
  useEffect(() => {
    if (!pending) return;
    const t = setTimeout(() => setRound((n) => n + 1), RECHECK_MS);
    return () => clearTimeout(t);
  }, [pending, v]);
  if (error)
    return (
      <span class="badge badge-unknown" title={error}>
        log not verified: {error}
      </span>
    );
  if (!v) return <span class="badge">verifying the log…</span>;
  if ("reason" in v)
    return (
      <span class="badge badge-failed" role="alert">
        log does not verify: {v.reason} (position {v.position})
      </span>
    );
  const words = checkpointWords(v);
  const detail = `The log re-hashes and chains the job's ${v.events} events; ${v.checkpointed} are under signed checkpoints${
    v.witnessed_checkpoint ? `; the witness holds checkpoint ${v.witnessed_checkpoint}` : ""
  }.`;
  return (
    <span
      class={`badge ${words.all ? "badge-succeeded" : "badge-pending"}`}
      data-verified="yes"
      data-events={v.events}
      data-checkpointed={v.checkpointed}
      title={detail}
    >
      {words.text}
    </span>
  );
}

export function JobPage(props: { id: string; who: Session }) {
  const [job, setJob] = useState<Job | null>(null);
  const [events, setEvents] = useState<TimelineEntry[]>([]);
  const [error, setError] = useState("");
  const [copied, setCopied] = useState("");
  const [showAll, setShowAll] = useState(false);
  const heading = useHeading(job ? jobName(job) : error ? "Job not found" : null);

  const load = useCallback(async () => {
    try {
      const [j, t] = await Promise.all([
        api<Job>(`/api/jobs/${props.id}`),
        api<Timeline>(`/api/jobs/${props.id}/events`),
      ]);
      setJob(j);
      setEvents(t.events);
    } catch (e) {
      setError(
        e instanceof ApiError && e.status === 404
          ? "Not found: no such job in your tenant."
          : (e as Error).message,
      );
    }
  }, [props.id]);

  useEffect(() => {
    load();
  }, [load]);

  useLive(
    useCallback(
      (m: FeedMessage) => {
        if (m.type === "job.updated" && (m.job as Job | undefined)?.job_id === props.id) load();
        // The job's own update does not come when its slide is verified: the job is then ready.
        if (m.type === "slide.updated" && m.slide) {
          const s = m.slide as Slide;
          setJob((j) => j && withSlide(j, s));
        }
      },
      [props.id, load],
    ),
  );

  if (error)
    return (
      <p role="alert" class="error">
        {error}
      </p>
    );
  if (!job) return <p>Loading…</p>;
  const detail = statusDetail(job);
  return (
    <section aria-labelledby="job-title">
      <h1 id="job-title" ref={heading} tabIndex={-1}>
        {jobName(job)}
      </h1>
      <dl class="facts">
        <dt>Slide</dt>
        <dd>{slideNameOf(job)}</dd>
        <dt>Status</dt>
        <dd>
          <Badge status={job.status} /> <JobProgress job={job} />
          <StatusDetailLine job={job} />
          {detail && <p class="muted">{detail.explain}</p>}
        </dd>
        <dt>Priority</dt>
        <dd>
          <PriorityBadge priority={job.priority} showRoutine />
          {job.priority === "stat" && (
            <span class="muted"> taken before routine jobs waiting; it does not stop a running one</span>
          )}
        </dd>
        <dt>Kind</dt>
        <dd>
          {job.kind} <code>{JSON.stringify(job.params)}</code>
        </dd>
        <dt>Job id</dt>
        <dd>
          {/* The short id is what the audit trail's filter takes; the whole id is in the address. */}
          <code data-short-id={shortId(job.job_id)}>{shortId(job.job_id)}</code>
        </dd>
        <dt>Attempt</dt>
        <dd>
          {job.attempt} of {job.max_attempts}
        </dd>
        <dt>Submitted</dt>
        <dd>
          {time(job.submitted_at)} by {job.submitted_by}
        </dd>
        {job.failure && (
          <>
            <dt>Failure</dt>
            <dd>{job.failure}</dd>
          </>
        )}
      </dl>
      <p>
        <JobActions job={job} who={props.who} onChange={setJob} />
        {job.status === "succeeded" && <Link href={`/jobs/${job.job_id}/view`}>Open the viewer</Link>}
      </p>
      {job.status === "succeeded" && <JobResults job={job} />}
      <h2>
        Timeline <VerifiedBadge id={job.job_id} version={events.length} />
      </h2>
      <label class="check">
        <input type="checkbox" checked={showAll} onChange={(e) => setShowAll(e.currentTarget.checked)} />
        Show every event
      </label>
      <table class="cards">
        <TableHead
          caption="The job's events from the log, oldest first"
          columns={["#", "Time", "Event", "Actor", "Hash"]}
        />
        <tbody>
          {timelineRows(events, { showAll }).map((r) =>
            r.kind === "routine" ? (
              <RoutineRow key={r.events[0].event_id} run={r} />
            ) : (
              <tr key={r.event.event_id} data-event={r.event.event_type}>
                <td data-label="#">{r.event.sequence}</td>
                <td data-label="Time">{time(r.event.recorded_at)}</td>
                <td data-label="Event">{r.event.event_type}</td>
                <td data-label="Actor">
                  {r.event.actor_kind}: {r.event.actor_id}
                </td>
                <td data-label="Hash">
                  <code title={r.event.hash}>{shortHash(r.event.hash)}</code>{" "}
                  <button
                    type="button"
                    class="small"
                    aria-label={`Copy the hash of event ${r.event.sequence}`}
                    onClick={() =>
                      navigator.clipboard?.writeText(r.event.hash).then(() => setCopied(r.event.hash))
                    }
                  >
                    {copied === r.event.hash ? "Copied" : "Copy"}
                  </button>
                </td>
              </tr>
            ),
          )}
        </tbody>
      </table>
    </section>
  );
}

/** One row for a run of lease renewals and progress reports: sequence range, times, actors, last hash. */
function RoutineRow(props: { run: RoutineRun<TimelineEntry> }) {
  const { run } = props;
  const first = run.events[0];
  const last = run.events[run.events.length - 1];
  const actors = [...new Set(run.events.map((e) => `${e.actor_kind}: ${e.actor_id}`))];
  return (
    <tr data-event="lease-extensions" data-count={run.leases} data-progress={run.progress}>
      <td data-label="#">{span(first.sequence, last.sequence)}</td>
      <td data-label="Time">{time(run.firstAt)}</td>
      <td data-label="Event">{routineSummary(run, clock)}</td>
      <td data-label="Actor">{actors.join(", ")}</td>
      <td data-label="Hash">
        <code title={last.hash}>{shortHash(last.hash)}</code>
      </td>
    </tr>
  );
}

/** A succeeded job's results: what the manifest and `stats.json` say (results.ts), and the files
 * to download. */
function JobResults(props: { job: Job }) {
  const { job } = props;
  const results = `/api/jobs/${job.job_id}/results`;
  const [manifest, setManifest] = useState<Manifest | null>(null);
  const [stats, setStats] = useState<StatsSummary | null>(null);
  const [error, setError] = useState("");
  const [saveError, setSaveError] = useState("");
  useEffect(() => {
    let gone = false;
    (async () => {
      const m = await api<Manifest>(`${results}/manifest.json`);
      if (gone) return;
      setManifest(m);
      const s = summarizeStats(await api<unknown>(`${results}/${m.stats ?? "stats.json"}`));
      if (!gone) setStats(s);
    })().catch((e) => {
      if (!gone) setError((e as Error).message);
    });
    return () => {
      gone = true;
    };
  }, [results]);
  const save = (path: string, what: string) => {
    setSaveError("");
    download(`${results}/${path}`, fileName(job, what)).catch((e) => setSaveError((e as Error).message));
  };
  const dz = manifest?.deepzoom;
  return (
    <section aria-labelledby="results-title" class="results" data-results={stats ? "yes" : "no"}>
      <h2 id="results-title">Results</h2>
      {error && (
        <p role="alert" class="error">
          The results could not be read: {error}
        </p>
      )}
      {!manifest && !error && <p class="muted">Loading the results…</p>}
      {manifest && (
        <dl class="facts">
          <dt>Tissue</dt>
          <dd data-stat="tissue">
            {manifest.tissue?.fraction !== undefined
              ? `${percentOf(manifest.tissue.fraction)} of the slide`
              : "no tissue mask was asked for"}
          </dd>
          {stats && (
            <>
              <dt>Tiles with tissue</dt>
              <dd data-stat="tiles-with-tissue">
                {stats.withTissue === null
                  ? `${stats.tiles.toLocaleString()} full-resolution tiles`
                  : `${stats.withTissue.toLocaleString()} of ${stats.tiles.toLocaleString()} full-resolution tiles; ${stats.mostlyTissue?.toLocaleString()} at least half tissue`}
              </dd>
              {stats.meanTissue !== null && (
                <>
                  <dt>Mean tissue per tile</dt>
                  <dd data-stat="mean-tissue">{percentOf(stats.meanTissue)}</dd>
                </>
              )}
              {stats.meanBrightness !== null && (
                <>
                  <dt>Mean brightness</dt>
                  <dd data-stat="brightness">
                    {Math.round(stats.meanBrightness)} of 255
                    {stats.withTissue === null ? "" : ", in the tiles with tissue"}
                  </dd>
                </>
              )}
            </>
          )}
          <dt>Slide size</dt>
          <dd>
            {manifest.slide.width.toLocaleString()} × {manifest.slide.height.toLocaleString()} pixels
          </dd>
          {dz?.levels !== undefined && dz.tiles !== undefined && (
            <>
              <dt>Pyramid</dt>
              <dd data-stat="pyramid">
                {dz.levels} levels, {dz.tiles.toLocaleString()} tiles
                {dz.tile_size ? ` of ${dz.tile_size} pixels` : ""}
                {dz.format ? ` (${dz.format.toUpperCase()})` : ""}
                {manifest.normalized ? ", and a stain-normalised copy" : ""}
              </dd>
            </>
          )}
        </dl>
      )}
      {manifest && (
        <div class="downloads">
          {manifest.tissue && (
            <button type="button" onClick={() => save(manifest.tissue?.mask ?? "mask.png", "mask.png")}>
              Download the tissue mask (PNG)
            </button>
          )}
          <button type="button" onClick={() => save(manifest.stats ?? "stats.json", "stats.json")}>
            Download the statistics (stats.json)
          </button>
          <button type="button" onClick={() => save("manifest.json", "manifest.json")}>
            Download the manifest (manifest.json)
          </button>
        </div>
      )}
      {saveError && (
        <p role="alert" class="error">
          The download failed: {saveError}
        </p>
      )}
    </section>
  );
}
