// What people call jobs and slides (issue 37). A job is named by its slide, what was asked and
// when: "CMU-1.svs · Macenko · 14:02", with its submitter and priority beside it. Ids are UUIDv7,
// whose first characters are the time they were made (six jobs made within a minute share them),
// so where an id is needed the short form is its last 8 hex characters, which the API's filters
// take as well.

import type { Job } from "./api";
import { KIND_LABELS, PRESENTATION } from "./jobwords";

/** An id's short form: its last 8 characters (hex digits for a UUID). */
export function shortId(id: string): string {
  return id.replace(/-/g, "").slice(-8);
}

/** Whether `s` is an id or a short one: a whole UUID, or 8 hex digits. */
export function isIdOrShort(s: string): boolean {
  return (
    /^[0-9a-f]{8}$/i.test(s) || /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(s)
  );
}

type Named = Pick<Job, "slide_id" | "kind" | "params" | "submitted_at"> & { slide_name?: string | null };

/** A slide's name for a job; a slide whose name is erased (or not known) by its short id. */
export function slideNameOf(job: Pick<Named, "slide_id" | "slide_name">): string {
  const n = job.slide_name?.trim();
  return n ? n : `slide ${shortId(job.slide_id)}`;
}

/** What was asked, in the form's words: the stain normalisation when there is one ("Macenko"),
 * otherwise the kind ("Tile pyramid"). */
export function whatAsked(job: Pick<Named, "kind" | "params">): string {
  const normalize = job.params?.normalize;
  if (typeof normalize === "string" && normalize !== "none")
    return PRESENTATION.normalize?.options?.[normalize] ?? normalize;
  return KIND_LABELS[job.kind] ?? job.kind;
}

const two = (n: number) => String(n).padStart(2, "0");

/** When, for a name: the local time of day ("14:02") on the day of `now`, with the date before
 * it ("2026-12-06 14:02") on any other day. */
export function whenAsked(iso: string, now: Date = new Date()): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const hm = `${two(d.getHours())}:${two(d.getMinutes())}`;
  const sameDay =
    d.getFullYear() === now.getFullYear() && d.getMonth() === now.getMonth() && d.getDate() === now.getDate();
  return sameDay ? hm : `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${hm}`;
}

/** A job's name: "CMU-1.svs · Macenko · 14:02". */
export function jobName(job: Named, now: Date = new Date()): string {
  return [slideNameOf(job), whatAsked(job), whenAsked(job.submitted_at, now)].join(" · ");
}

/** A name for a file the app saves: the slide's name without its extension, the job's short id
 * and what the file is ("CMU-1-3f9a12bc-stats.json"); only letters, digits, `.`, `_` and `-`. */
export function fileName(
  job: Pick<Named, "slide_id" | "slide_name"> & { job_id: string },
  what: string,
): string {
  const base = slideNameOf(job)
    .replace(/\.[A-Za-z0-9]{2,5}$/, "")
    .replace(/[^A-Za-z0-9._-]+/g, "-")
    .replace(/^[-.]+|-+$/g, "");
  return [base || "slide", shortId(job.job_id), what].join("-");
}
