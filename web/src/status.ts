// What a job's status means while it waits (issue 33, ADR 0027). A job ready to run (its slide
// verified, or its retry due) is not queued at once: the lifecycle handlers admit it to a GPU
// queue when its turn comes. The API says so in `waiting_for_admission`, over REST only; the
// live feed's `job.updated` does not carry it, so a live update keeps the value last fetched
// while the job stays where it was, and forgets it once the job moves on.

import type { Job, Slide } from "./api";

/** Why a job that has not started is still waiting, in words: `short` after its status in
 * lists, `explain` on its page. */
export type StatusDetail = {
  reason: "admission" | "slide";
  short: string;
  explain: string;
};

/** The statuses in which a job can wait for its admission. */
const ADMITTABLE = ["submitted", "retry_scheduled"];

export const WAITING_FOR_SLOT = "waiting for a GPU slot";
export const WAITING_FOR_SLIDE = "waiting for its slide to be verified";

type Shown = Pick<Job, "status" | "waiting_for_admission"> & Partial<Pick<Job, "priority">>;

/** Why the job waits, or null when it does not (queued, running, finished) or the app does not
 * know: a job the API has not said about, as after a live update that moved it back. */
export function statusDetail(job: Shown): StatusDetail | null {
  if (!ADMITTABLE.includes(job.status)) return null;
  if (job.waiting_for_admission === true)
    return {
      reason: "admission",
      short: WAITING_FOR_SLOT,
      // STAT jobs do not take turns: the handlers admit them as soon as they see them.
      explain:
        job.priority === "stat"
          ? "Ready to run: a STAT job does not wait for its turn; it is queued for a GPU next."
          : "Ready to run: it waits its turn for a GPU (tenants take turns; a few jobs are queued at a time).",
    };
  // Not ready: a submitted job waits for its slide's verdict. A scheduled retry that is not due
  // yet needs no more words than its status.
  if (job.status === "submitted" && job.waiting_for_admission === false)
    return { reason: "slide", short: WAITING_FOR_SLIDE, explain: "It runs once its slide is verified." };
  return null;
}

/** A job from the live feed, merged over the one shown. A REST answer carries
 * `waiting_for_admission` and is taken as it is; a live update does not, so the value shown is
 * kept while the status stays the same, false once the job is queued, running or finished (it
 * no longer waits), and unknown when it comes back to a status that can wait. So is the slide's
 * name, which an update may not carry. */
export function withLiveUpdate(shown: Job | undefined, live: Job): Job {
  // The slide's name, which names the job, is kept where an update does not carry it.
  const update =
    live.slide_name === undefined && shown?.job_id === live.job_id && shown.slide_name !== undefined
      ? { ...live, slide_name: shown.slide_name }
      : live;
  if (update.waiting_for_admission !== undefined) return update;
  if (!ADMITTABLE.includes(update.status)) return { ...update, waiting_for_admission: false };
  if (shown && shown.job_id === update.job_id && shown.status === update.status)
    return { ...update, waiting_for_admission: shown.waiting_for_admission };
  return { ...update, waiting_for_admission: undefined };
}

/** A submitted job after its slide changed on the live feed, which says nothing about jobs. A
 * verified slide makes the job ready, and a ready job that is not queued waits for its admission;
 * a rejected or deleted slide ends the job (its own update follows), so it waits for nothing
 * the app can name. */
export function withSlide(job: Job, slide: Pick<Slide, "slide_id" | "status">): Job {
  if (job.slide_id !== slide.slide_id || job.status !== "submitted") return job;
  if (slide.status === "verified")
    return job.waiting_for_admission === true ? job : { ...job, waiting_for_admission: true };
  if (slide.status === "rejected" || slide.status === "deleted")
    return { ...job, waiting_for_admission: undefined };
  return job;
}
