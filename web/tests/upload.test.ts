import { describe, expect, it } from "vitest";
import { type Put, planUpload, runUpload, slideContentType } from "../src/upload";

const multipart = (size: number, partSize: number) => ({
  multipart: {
    upload_id: "u1",
    part_size: partSize,
    expires_at: "2026-12-01T00:00:00Z",
    parts: Array.from({ length: Math.ceil(size / partSize) }, (_, i) => ({
      part_number: i + 1,
      url: `/p/${i + 1}`,
    })).reverse(),
  },
});

describe("planUpload", () => {
  it("plans one PUT with the API's headers", () => {
    const plan = planUpload(10, { method: "PUT", url: "/u", headers: { "x-a": "1" }, expires_at: "" });
    expect(plan).toEqual({
      kind: "single",
      parts: [{ partNumber: 1, url: "/u", start: 0, end: 10, headers: { "x-a": "1" } }],
    });
  });

  it("splits a multipart upload in order, the last part shorter", () => {
    const plan = planUpload(25, multipart(25, 10));
    expect(plan.kind).toBe("multipart");
    expect(plan.uploadId).toBe("u1");
    expect(plan.parts.map((p) => [p.partNumber, p.start, p.end])).toEqual([
      [1, 0, 10],
      [2, 10, 20],
      [3, 20, 25],
    ]);
  });

  it("refuses parts that do not cover the file", () => {
    expect(() => planUpload(35, multipart(25, 10))).toThrow(/do not cover/);
    expect(() => planUpload(5, null)).toThrow(/uploaded already/);
  });
});

/** A transport that records concurrency and finishes each part when told. */
function transport() {
  let inFlight = 0;
  let most = 0;
  const calls: string[] = [];
  const fail = new Map<string, number>();
  const put: Put = async (url, body, _h, onBytes, signal) => {
    calls.push(url);
    inFlight += 1;
    most = Math.max(most, inFlight);
    try {
      onBytes(body.size / 2);
      await new Promise((r) => setTimeout(r, 2));
      if (signal.aborted) throw new DOMException("x", "AbortError");
      const left = fail.get(url) ?? 0;
      if (left > 0) {
        fail.set(url, left - 1);
        throw new Error("the connection broke");
      }
      onBytes(body.size);
      return `"etag-${url}"`;
    } finally {
      inFlight -= 1;
    }
  };
  return { put, calls, fail, most: () => most };
}

describe("runUpload", () => {
  it("keeps at most `concurrency` parts in flight and reports every byte", async () => {
    const t = transport();
    const file = new Blob([new Uint8Array(95)]);
    const seen: number[] = [];
    const done = await runUpload(file, planUpload(95, multipart(95, 10)), {
      concurrency: 3,
      put: t.put,
      onProgress: (p) => {
        expect(p.total).toBe(95);
        seen.push(p.sent);
      },
    });
    expect(t.most()).toBe(3);
    expect(done.parts.map((p) => p.part_number)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    expect(done.parts[9].etag).toBe('"etag-/p/10"');
    expect(seen[seen.length - 1]).toBe(95);
    expect(Math.max(...seen)).toBe(95);
  });

  it("retries a failed part, then gives up", async () => {
    const t = transport();
    t.fail.set("/p/2", 2);
    const file = new Blob([new Uint8Array(30)]);
    const done = await runUpload(file, planUpload(30, multipart(30, 10)), { put: t.put, retries: 2 });
    expect(done.parts).toHaveLength(3);
    expect(t.calls.filter((c) => c === "/p/2")).toHaveLength(3);
    const t2 = transport();
    t2.fail.set("/p/1", 5);
    await expect(
      runUpload(file, planUpload(30, multipart(30, 10)), { put: t2.put, retries: 1 }),
    ).rejects.toThrow(/connection broke/);
  });

  it("cancels every part in flight", async () => {
    const t = transport();
    const ctl = new AbortController();
    const file = new Blob([new Uint8Array(100)]);
    const run = runUpload(file, planUpload(100, multipart(100, 10)), {
      put: t.put,
      signal: ctl.signal,
      concurrency: 2,
    });
    setTimeout(() => ctl.abort(), 1);
    await expect(run).rejects.toMatchObject({ name: "AbortError" });
    expect(t.calls.length).toBeLessThan(10);
  });
});

describe("slideContentType", () => {
  it("names the slide types the API takes", () => {
    expect(slideContentType("CMU-1-Small-Region.svs")).toBe("image/x-aperio-svs");
    expect(slideContentType("x.TIFF")).toBe("image/tiff");
    expect(slideContentType("notes.txt")).toBe("application/octet-stream");
  });
});
