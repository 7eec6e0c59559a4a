import { useCallback, useEffect, useState } from "preact/hooks";
import { api, holds, type Job, type Slide, WRITERS } from "../api";
import type { Session } from "../auth";
import { percent, time } from "../format";
import { type FeedMessage, useLive } from "../live";
import { Link } from "../nav";
import { usePages } from "../pages";
import { PriorityBadge } from "../priority";
import { statusDetail, withLiveUpdate, withSlide } from "../status";
import { TableHead } from "../table";
import { Badge } from "./slides";

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
      <progress max={100} value={pct} aria-label={`Job ${props.job.job_id.slice(0, 8)} progress`} />
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
  const { items: jobs, setItems: setJobs, next, error, load } = usePages<Job, string>(jobsUrl);

  useEffect(() => {
    load(null);
  }, [load]);

  const upsert = useCallback(
    (j: Job) =>
      setJobs((all) => {
        const i = all.findIndex((x) => x.job_id === j.job_id);
        // A job's events are recorded in order: a state older than the one shown is dropped.
        if (i >= 0 && Date.parse(all[i].updated_at) > Date.parse(j.updated_at)) return all;
        if (status && j.status !== status) return all.filter((x) => x.job_id !== j.job_id);
        const merged = withLiveUpdate(i >= 0 ? all[i] : undefined, j);
        if (i < 0) return [merged, ...all].sort((a, b) => b.submitted_at.localeCompare(a.submitted_at));
        const copy = [...all];
        copy[i] = merged;
        return copy;
      }),
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
      <h1 id="jobs-title">Jobs</h1>
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
                <Link href={`/jobs/${j.job_id}`}>{j.job_id.slice(0, 8)}</Link>{" "}
                <PriorityBadge priority={j.priority} />{" "}
                <span class="muted">{String(j.params.normalize ?? "")}</span>
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
              <td data-label="Submitted">{time(j.submitted_at)}</td>
              <td>
                <JobActions job={j} who={props.who} onChange={upsert} />
                {j.status === "succeeded" && <Link href={`/jobs/${j.job_id}/view`}>View</Link>}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {jobs.length === 0 && (
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
