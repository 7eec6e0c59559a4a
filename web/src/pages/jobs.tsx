import { useCallback, useEffect, useState } from "preact/hooks";
import { api, holds, type Job, type Slide, WRITERS } from "../api";
import type { Session } from "../auth";
import { Badge } from "../badge";
import { percent, time } from "../format";
import { type FeedMessage, useLive } from "../live";
import { jobName } from "../names";
import { Link, useHeading } from "../nav";
import { usePages } from "../pages";
import { PriorityBadge } from "../priority";
import { statusDetail, withLiveUpdate, withSlide } from "../status";
import { TableHead } from "../table";

const ACTIVE = ["submitted", "queued", "running", "retry_scheduled"];
export const STATUSES = [
  "submitted",
  "queued",
  "running",
  "retry_scheduled",
  "cancel_requested",
  "succeeded",
  "failed",
  "cancelled",
];

export function JobProgress(props: { job: Job }) {
  const p = props.job.progress;
  if (props.job.status === "succeeded") return <span>done</span>;
  if (!p) return <span class="muted">—</span>;
  const pct = percent(p.done, p.total);
  return (
    <span class="progress">
      <progress max={100} value={pct} aria-label={`Progress of ${jobName(props.job)}`} />
      <span>{pct} %</span>
    </span>
  );
}

/** Why a job that has not started still waits, after its status: words, not colour. */
export function StatusDetailLine(props: { job: Job }) {
  const d = statusDetail(props.job);
  return d ? (
    <div class="reason" data-detail={d.reason}>
      {d.short}
    </div>
  ) : null;
}

export function JobActions(props: { job: Job; who: Session; onChange: (j: Job) => void }) {
  const [error, setError] = useState("");
  if (!holds(props.who, WRITERS)) return null;
  const act = async (what: "cancel" | "retry") => {
    setError("");
    try {
      await api(`/api/jobs/${props.job.job_id}/${what}`, {
        method: "POST",
        body: what === "cancel" ? {} : undefined,
      });
      props.onChange(await api<Job>(`/api/jobs/${props.job.job_id}`));
    } catch (e) {
      setError((e as Error).message);
    }
  };
  return (
    <span class="actions">
      {ACTIVE.includes(props.job.status) && (
        <button type="button" onClick={() => act("cancel")}>
          Cancel
        </button>
      )}
      {["failed", "cancelled"].includes(props.job.status) && (
        <button type="button" onClick={() => act("retry")}>
          Retry
        </button>
      )}
      {error && (
        <span role="alert" class="error">
          {error}
        </span>
      )}
    </span>
  );
}

/** `all` with `j` from the live feed or an answer merged in, newest submitted first. A job's
 * events are recorded in order, so a state older than the one shown is dropped; `keep` says
 * whether the job belongs in this list (a status filter) at all. */
export function withJob(all: Job[], j: Job, keep: (j: Job) => boolean = () => true): Job[] {
  const i = all.findIndex((x) => x.job_id === j.job_id);
  if (i >= 0 && Date.parse(all[i].updated_at) > Date.parse(j.updated_at)) return all;
  if (!keep(j)) return i < 0 ? all : all.filter((x) => x.job_id !== j.job_id);
  const merged = withLiveUpdate(i >= 0 ? all[i] : undefined, j);
  if (i < 0) return [merged, ...all].sort((a, b) => b.submitted_at.localeCompare(a.submitted_at));
  const copy = [...all];
  copy[i] = merged;
  return copy;
}

/** A job's name as a link to its page, with its priority (STAT only: routine is the rule). */
export function JobLink(props: { job: Job }) {
  return (
    <>
      <Link href={`/jobs/${props.job.job_id}`}>{jobName(props.job)}</Link>{" "}
      <PriorityBadge priority={props.job.priority} />
    </>
  );
}

/** The jobs run on one slide, newest first (`GET /api/jobs?slide_id=`); they update live. */
export function SlideJobs(props: { slideId: string; id: string }) {
  const { slideId } = props;
  const url = useCallback(
    (cursor: string | null) => {
      const q = new URLSearchParams({ slide_id: slideId, limit: "20" });
      if (cursor) q.set("cursor", cursor);
      return `/api/jobs?${q}`;
    },
    [slideId],
  );
  const { items, setItems, next, error, load, loaded } = usePages<Job, string>(url);
  useEffect(() => {
    load(null);
  }, [load]);
  useLive(
    useCallback(
      (m: FeedMessage) => {
        const j = m.job as Job | undefined;
        if (m.type === "job.updated" && j?.slide_id === slideId) setItems((all) => withJob(all, j));
      },
      [slideId, setItems],
    ),
  );
  return (
    <div class="slide-jobs" id={props.id} data-loaded={loaded ? "yes" : "no"}>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      {!loaded && !error && <p class="muted">Loading the slide's jobs…</p>}
      {loaded && items.length === 0 && (
        <p class="muted" data-empty="none">
          No job has been run on this slide.
        </p>
      )}
      {items.length > 0 && (
        <ul>
          {items.map((j) => (
            <li key={j.job_id} data-job={j.job_id} data-status={j.status}>
              <JobLink job={j} /> <Badge status={j.status} /> <span class="muted">by {j.submitted_by}</span>
              {j.status === "succeeded" && (
                <>
                  {" "}
                  <Link href={`/jobs/${j.job_id}/view`}>View</Link>
                </>
              )}
            </li>
          ))}
        </ul>
      )}
      {next && (
        <button type="button" onClick={() => load(next)}>
          More jobs
        </button>
      )}
    </div>
  );
}

export function JobsPage(props: { who: Session }) {
  const [status, setStatus] = useState("");
  const jobsUrl = useCallback(
    (cursor: string | null) => {
      const q = new URLSearchParams({ limit: "50" });
      if (cursor) q.set("cursor", cursor);
      if (status) q.set("status", status);
      return `/api/jobs?${q}`;
    },
    [status],
  );
  const { items: jobs, setItems: setJobs, next, error, load, loaded } = usePages<Job, string>(jobsUrl);
  const heading = useHeading("Jobs");

  useEffect(() => {
    load(null);
  }, [load]);

  const upsert = useCallback(
    (j: Job) => setJobs((all) => withJob(all, j, (x) => !status || x.status === status)),
    [status],
  );

  useLive(
    useCallback(
      (m: FeedMessage) => {
        if (m.type === "job.updated" && m.job) upsert(m.job as Job);
        // A verified slide makes its submitted jobs ready: they now wait for a GPU slot.
        if (m.type === "slide.updated" && m.slide) {
          const s = m.slide as Slide;
          setJobs((all) => all.map((j) => withSlide(j, s)));
        }
      },
      [upsert, setJobs],
    ),
  );

  return (
    <section aria-labelledby="jobs-title">
      <h1 id="jobs-title" ref={heading} tabIndex={-1}>
        Jobs
      </h1>
      <label class="search">
        Status
        <select value={status} onChange={(e) => setStatus(e.currentTarget.value)}>
          <option value="">any</option>
          {STATUSES.map((s) => (
            <option key={s} value={s}>
              {s.replace(/_/g, " ")}
            </option>
          ))}
        </select>
      </label>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      <table class="cards">
        <TableHead
          caption="Jobs, newest first; they update live"
          columns={["Job", "Status", "Progress", "Attempt", "Submitted"]}
          actions
        />
        <tbody>
          {jobs.map((j) => (
            <tr
              key={j.job_id}
              data-job={j.job_id}
              data-status={j.status}
              data-priority={j.priority ?? "routine"}
            >
              <td data-label="Job">
                <JobLink job={j} />
              </td>
              <td data-label="Status">
                <Badge status={j.status} />
                <StatusDetailLine job={j} />
                {j.failure && <div class="reason">{j.failure}</div>}
              </td>
              <td data-label="Progress">
                <JobProgress job={j} />
              </td>
              <td data-label="Attempt">
                {j.attempt} of {j.max_attempts}
              </td>
              <td data-label="Submitted">
                {time(j.submitted_at)}
                <div class="muted">by {j.submitted_by}</div>
              </td>
              <td>
                <JobActions job={j} who={props.who} onChange={upsert} />
                {j.status === "succeeded" && <Link href={`/jobs/${j.job_id}/view`}>View</Link>}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {!loaded && !error && <p class="muted">Loading…</p>}
      {loaded && jobs.length === 0 && (
        <p class="muted" data-empty={status ? "no-match" : "none"}>
          {status
            ? `No job is ${status.replace(/_/g, " ")}.`
            : "No jobs yet: process a slide from the Slides page."}
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
