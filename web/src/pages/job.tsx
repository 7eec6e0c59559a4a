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
import { clock, shortHash, time } from "../format";
import { type FeedMessage, useLive } from "../live";
import { Link } from "../nav";
import { PriorityBadge } from "../priority";
import { statusDetail, withSlide } from "../status";
import { TableHead } from "../table";
import { type RoutineRun, routineSummary, span, timelineRows } from "../timeline";
import { JobActions, JobProgress, StatusDetailLine } from "./jobs";
import { Badge } from "./slides";

/** Whether the log verifies for this job's events (`GET /api/jobs/{id}/verify`). */
export function VerifiedBadge(props: { id: string; version: number }) {
  const [v, setV] = useState<StreamVerification | null>(null);
  const [error, setError] = useState("");
  useEffect(() => {
    api<StreamVerification>(`/api/jobs/${props.id}/verify`).then(setV, (e) => setError((e as Error).message));
  }, [props.id, props.version]);
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
  const detail = `${v.events} events re-hashed and chained; ${v.checkpointed} under signed checkpoints${
    v.witnessed_checkpoint ? `; the witness holds checkpoint ${v.witnessed_checkpoint}` : ""
  }`;
  return (
    <span class="badge badge-succeeded" data-verified="yes" title={detail}>
      log verified <span class="visually-hidden">: {detail}</span>
    </span>
  );
}

export function JobPage(props: { id: string; who: Session }) {
  const [job, setJob] = useState<Job | null>(null);
  const [events, setEvents] = useState<TimelineEntry[]>([]);
  const [error, setError] = useState("");
  const [copied, setCopied] = useState("");
  const [showAll, setShowAll] = useState(false);

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
      <h1 id="job-title">Job {job.job_id.slice(0, 8)}</h1>
      <dl class="facts">
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
      <h2>
        Timeline <VerifiedBadge id={job.job_id} version={events.length} />
      </h2>
      <label class="check">
        <input type="checkbox" checked={showAll} onChange={(e) => setShowAll(e.currentTarget.checked)} />
        Show every event
      </label>
      <table>
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
                <td>{r.event.sequence}</td>
                <td>{time(r.event.recorded_at)}</td>
                <td>{r.event.event_type}</td>
                <td>
                  {r.event.actor_kind}: {r.event.actor_id}
                </td>
                <td>
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
      <td>{span(first.sequence, last.sequence)}</td>
      <td>{time(run.firstAt)}</td>
      <td>{routineSummary(run, clock)}</td>
      <td>{actors.join(", ")}</td>
      <td>
        <code title={last.hash}>{shortHash(last.hash)}</code>
      </td>
    </tr>
  );
}
