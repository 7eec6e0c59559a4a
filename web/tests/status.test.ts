import { describe, expect, it } from "vitest";
import type { Job } from "../src/api";
import { statusDetail, withLiveUpdate, withSlide } from "../src/status";

function job(over: Partial<Job> = {}): Job {
  return {
    job_id: "j1",
    slide_id: "s1",
    slide_name: "CMU-1.svs",
    kind: "wsi.preprocess",
    params: {},
    status: "submitted",
    attempt: 1,
    max_attempts: 3,
    priority: "routine",
    worker_id: null,
    lease_until: null,
    progress: null,
    failure: null,
    manifest_key: null,
    manifest_sha256: null,
    submitted_by: "ana",
    submitted_at: "2026-12-07T10:00:00Z",
    updated_at: "2026-12-07T10:00:00Z",
    ...over,
  };
}

describe("why a job waits", () => {
  it("says a ready job waits for a GPU slot, and why", () => {
    expect(statusDetail(job({ waiting_for_admission: true }))).toEqual({
      reason: "admission",
      short: "waiting for a GPU slot",
      explain:
        "Ready to run: it waits its turn for a GPU (tenants take turns; a few jobs are queued at a time).",
    });
    // A retry that is due waits for its turn the same way.
    expect(statusDetail(job({ status: "retry_scheduled", waiting_for_admission: true }))?.short).toBe(
      "waiting for a GPU slot",
    );
    // A STAT job takes no turn.
    const stat = statusDetail(job({ priority: "stat", waiting_for_admission: true }));
    expect(stat?.short).toBe("waiting for a GPU slot");
    expect(stat?.explain).not.toContain("tenants take turns");
  });

  it("says a submitted job that is not ready waits for its slide", () => {
    const d = statusDetail(job({ waiting_for_admission: false }));
    expect(d?.reason).toBe("slide");
    expect(d?.short).toBe("waiting for its slide to be verified");
    expect(d?.short).not.toContain("GPU");
    // A retry not due yet, or a job the API has not said about, gets no words.
    expect(statusDetail(job({ status: "retry_scheduled", waiting_for_admission: false }))).toBeNull();
    expect(statusDetail(job({ waiting_for_admission: undefined }))).toBeNull();
  });

  it("says nothing for a queued, running or finished job, whatever the flag says", () => {
    for (const status of [
      "queued",
      "running",
      "cancel_requested",
      "succeeded",
      "failed",
      "cancelled",
    ] as const) {
      expect(statusDetail(job({ status, waiting_for_admission: true })), status).toBeNull();
      expect(statusDetail(job({ status, waiting_for_admission: false })), status).toBeNull();
    }
  });
});

describe("a live update merged over the job shown", () => {
  const waiting = job({ waiting_for_admission: true });

  it("leaves no waiting text once the job is queued, running or finished", () => {
    for (const status of ["queued", "running", "succeeded", "failed", "cancelled"] as const) {
      // `job.updated` does not carry the flag.
      const live = job({ status, updated_at: "2026-12-07T10:01:00Z" });
      const merged = withLiveUpdate(waiting, live);
      expect(merged.status).toBe(status);
      expect(merged.waiting_for_admission, status).toBe(false);
      expect(statusDetail(merged), status).toBeNull();
    }
  });

  it("keeps what REST said while the job stays where it was", () => {
    const live = job({ updated_at: "2026-12-07T10:01:00Z" });
    expect(withLiveUpdate(waiting, live).waiting_for_admission).toBe(true);
    expect(statusDetail(withLiveUpdate(waiting, live))?.reason).toBe("admission");
    const slide = job({ waiting_for_admission: false });
    expect(statusDetail(withLiveUpdate(slide, live))?.reason).toBe("slide");
  });

  it("keeps the slide's name when the update does not carry it, and takes a new one", () => {
    const { slide_name: _, ...bare } = job({ status: "running" });
    expect(withLiveUpdate(waiting, bare as Job).slide_name).toBe("CMU-1.svs");
    expect(withLiveUpdate(waiting, job({ slide_name: null })).slide_name).toBeNull();
    expect(withLiveUpdate(undefined, bare as Job).slide_name).toBeUndefined();
  });

  it("does not know again when the job comes back to a status that can wait", () => {
    const running = job({ status: "running", waiting_for_admission: false });
    const retry = withLiveUpdate(running, job({ status: "retry_scheduled" }));
    expect(retry.waiting_for_admission).toBeUndefined();
    expect(statusDetail(retry)).toBeNull();
    // A job first seen live: unknown too.
    expect(withLiveUpdate(undefined, job()).waiting_for_admission).toBeUndefined();
    // Another job's state is never taken.
    expect(withLiveUpdate(waiting, job({ job_id: "j2" })).waiting_for_admission).toBeUndefined();
  });

  it("takes a REST answer as it is", () => {
    const rest = job({ status: "submitted", waiting_for_admission: false });
    expect(withLiveUpdate(waiting, rest).waiting_for_admission).toBe(false);
  });
});

describe("a submitted job when its slide changes", () => {
  const forSlide = job({ waiting_for_admission: false });

  it("waits for a GPU slot once its slide is verified", () => {
    const ready = withSlide(forSlide, { slide_id: "s1", status: "verified" });
    expect(statusDetail(ready)?.short).toBe("waiting for a GPU slot");
  });

  it("no longer claims to wait for a rejected slide, and ignores other slides and statuses", () => {
    expect(statusDetail(withSlide(forSlide, { slide_id: "s1", status: "rejected" }))).toBeNull();
    expect(withSlide(forSlide, { slide_id: "s2", status: "verified" })).toBe(forSlide);
    expect(withSlide(forSlide, { slide_id: "s1", status: "uploaded" })).toBe(forSlide);
    const queued = job({ status: "queued", waiting_for_admission: false });
    expect(withSlide(queued, { slide_id: "s1", status: "verified" })).toBe(queued);
  });
});
