import { afterEach, describe, expect, it, vi } from "vitest";
import { ApiError, setHooks } from "../src/api";
import {
  type MultipartAnswer,
  type PartPages,
  type PartsPage,
  type Put,
  partPages,
  planUpload,
  runUpload,
  slideContentType,
} from "../src/upload";

const PAGE = 100;
const urlsOf = (from: number, to: number) =>
  Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => ({
    part_number: from + i,
    url: `/p/${from + i}`,
  }));

/** The API's answer for `size` bytes in parts of `partSize`: the first page of URLs, reversed. */
const multipart = (
  size: number,
  partSize: number,
  partCount = Math.ceil(size / partSize),
): MultipartAnswer => ({
  multipart: {
    upload_id: "u1",
    part_size: partSize,
    part_count: partCount,
    expires_at: "2026-12-01T00:00:00Z",
    parts: urlsOf(1, Math.min(PAGE, partCount)).reverse(),
  },
});

/** The API's further pages for the same upload; records what was asked and how many at once. */
function pagesServer(size: number, partSize: number, page = PAGE) {
  const partCount = Math.ceil(size / partSize);
  const asked: number[] = [];
  let inFlight = 0;
  let most = 0;
  const pages: PartPages = async (from) => {
    asked.push(from);
    inFlight += 1;
    most = Math.max(most, inFlight);
    try {
      await new Promise((r) => setTimeout(r, 3));
      if (from < 1 || from > partCount) throw new ApiError(400, "t", "Bad Request", "from is out of range");
      return {
        upload_id: "u1",
        part_size: partSize,
        part_count: partCount,
        parts: urlsOf(from, Math.min(from + page - 1, partCount)),
        expires_at: "2026-12-01T00:00:00Z",
      };
    } finally {
      inFlight -= 1;
    }
  };
  return { pages, asked, most: () => most };
}

describe("planUpload", () => {
  it("plans one PUT with the API's headers", () => {
    const plan = planUpload(10, { method: "PUT", url: "/u", headers: { "x-a": "1" }, expires_at: "" });
    expect(plan).toEqual({
      kind: "single",
      size: 10,
      partSize: 10,
      partCount: 1,
      parts: [{ partNumber: 1, url: "/u", start: 0, end: 10, headers: { "x-a": "1" } }],
    });
  });

  it("splits a multipart upload in order, the last part shorter", () => {
    const plan = planUpload(25, multipart(25, 10));
    expect(plan.kind).toBe("multipart");
    expect(plan.uploadId).toBe("u1");
    expect(plan.partCount).toBe(3);
    expect(plan.parts.map((p) => [p.partNumber, p.start, p.end])).toEqual([
      [1, 0, 10],
      [2, 10, 20],
      [3, 20, 25],
    ]);
  });

  it("takes a first page of 100 URLs for a 250-part upload", () => {
    const plan = planUpload(997, multipart(997, 4));
    expect(plan.partCount).toBe(250);
    expect(plan.parts).toHaveLength(100);
    expect(plan.parts[99]).toMatchObject({ partNumber: 100, start: 396, end: 400 });
  });

  it("refuses parts that do not cover the file", () => {
    expect(() => planUpload(35, multipart(25, 10))).toThrow(/do not cover/);
    expect(() => planUpload(5, null)).toThrow(/uploaded already/);
  });

  it("refuses a part count that does not match the size", () => {
    // Every URL is there and reaches the end of the file, but 4 parts of 10 are not 25 bytes.
    const tooMany = multipart(25, 10, 4);
    tooMany.multipart.parts = urlsOf(1, 3);
    expect(() => planUpload(25, tooMany)).toThrow(
      /do not cover the file \(4 parts of 10 bytes for 25 bytes, not 3\)/,
    );
    // Too few: 2 parts of 10 cannot hold 25 bytes.
    expect(() => planUpload(25, multipart(25, 10, 2))).toThrow(/do not cover/);
    // A part size of 0 would never end.
    const zero = multipart(25, 10);
    zero.multipart.part_size = 0;
    expect(() => planUpload(25, zero)).toThrow(/do not cover/);
  });

  it("refuses a first page whose part numbers are not 1, 2, 3…", () => {
    const gap = multipart(25, 10);
    gap.multipart.parts = [urlsOf(1, 1)[0], urlsOf(3, 3)[0]];
    expect(() => planUpload(25, gap)).toThrow(/do not cover/);
    const none = multipart(25, 10);
    none.multipart.parts = [];
    expect(() => planUpload(25, none)).toThrow(/do not cover/);
  });
});

/** A transport that records concurrency and finishes each part when told. */
function transport() {
  let inFlight = 0;
  let most = 0;
  const calls: string[] = [];
  const bodies = new Map<string, Blob[]>();
  const fail = new Map<string, number>();
  const put: Put = async (url, body, _h, onBytes, signal) => {
    calls.push(url);
    bodies.set(url, [...(bodies.get(url) ?? []), body]);
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
  return { put, calls, bodies, fail, most: () => most };
}

/** `n` bytes, each the low byte of its offset mod 251, so that any two ranges differ. */
const fileOf = (n: number) => {
  const bytes = Uint8Array.from({ length: n }, (_, i) => i % 251);
  return { bytes, blob: new Blob([bytes]) };
};

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

  it("uploads one PUT with the API's headers", async () => {
    const file = fileOf(10);
    const seen: { url: string; headers: Record<string, string>; size: number }[] = [];
    const done = await runUpload(
      file.blob,
      planUpload(10, { method: "PUT", url: "/u", headers: { "x-a": "1" }, expires_at: "" }),
      {
        put: async (url, body, headers) => {
          seen.push({ url, headers, size: body.size });
          return '"e"';
        },
      },
    );
    expect(seen).toEqual([{ url: "/u", headers: { "x-a": "1" }, size: 10 }]);
    expect(done.parts).toEqual([{ part_number: 1, etag: '"e"' }]);
  });

  it("asks for a 250-part upload's URLs page by page, as the parts reach them, and PUTs every part once", async () => {
    const size = 997; // 249 parts of 4 bytes and a last one of 1
    const file = fileOf(size);
    const s = pagesServer(size, 4);
    const t = transport();
    // What had been PUT (the highest part number) when each page was asked for.
    const putWhenAsked: number[] = [];
    const pages: PartPages = (from, signal) => {
      putWhenAsked.push(Math.max(0, ...t.calls.map((c) => Number(c.split("/")[2]))));
      return s.pages(from, signal);
    };
    const seen: number[] = [];
    const done = await runUpload(file.blob, planUpload(size, multipart(size, 4)), {
      put: t.put,
      pages,
      concurrency: 4,
      onProgress: (p) => {
        expect(p.total).toBe(size);
        seen.push(p.sent);
      },
    });
    expect(s.asked).toEqual([101, 201]);
    expect(s.most()).toBe(1);
    // Lazily: page 2 once parts 1..100 are taken, not before; page 3 once 101..200 are.
    expect(putWhenAsked[0]).toBeGreaterThanOrEqual(100 - 4 + 1);
    expect(putWhenAsked[0]).toBeLessThanOrEqual(100);
    expect(putWhenAsked[1]).toBeGreaterThanOrEqual(200 - 4 + 1);
    expect(putWhenAsked[1]).toBeLessThanOrEqual(200);
    expect(t.most()).toBe(4);
    // Every part PUT once, with its own bytes.
    expect([...t.calls].sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)))).toEqual(
      urlsOf(1, 250).map((p) => p.url),
    );
    for (let n = 1; n <= 250; n++) {
      const [body] = t.bodies.get(`/p/${n}`) ?? [];
      const start = (n - 1) * 4;
      const end = n === 250 ? size : start + 4;
      expect(body.size, `part ${n}`).toBe(end - start);
      expect(new Uint8Array(await body.arrayBuffer()), `part ${n}`).toEqual(file.bytes.slice(start, end));
    }
    expect(t.bodies.get("/p/250")?.[0].size).toBe(size - 249 * 4);
    expect(done.parts).toHaveLength(250);
    expect(done.parts.map((p) => p.part_number)).toEqual(urlsOf(1, 250).map((p) => p.part_number));
    expect(done.parts.every((p) => p.etag === `"etag-/p/${p.part_number}"`)).toBe(true);
    expect(seen[seen.length - 1]).toBe(size);
    expect(Math.max(...seen)).toBe(size);
  });

  it("takes pages shorter than 100 as they come", async () => {
    const size = 250 * 4;
    const s = pagesServer(size, 4, 60);
    const t = transport();
    const done = await runUpload(fileOf(size).blob, planUpload(size, multipart(size, 4)), {
      put: t.put,
      pages: s.pages,
      concurrency: 3,
    });
    expect(s.asked).toEqual([101, 161, 221]);
    expect(new Set(t.calls).size).toBe(250);
    expect(t.calls).toHaveLength(250);
    expect(done.parts).toHaveLength(250);
  });

  it("fails clearly when a page holds other parts than those asked for", async () => {
    const size = 250 * 4;
    const answer = multipart(size, 4);
    const plan = planUpload(size, answer);
    const wrong = (shift: (from: number) => { from: number; to: number }) => {
      const asked: number[] = [];
      const pages: PartPages = async (from) => {
        asked.push(from);
        const r = shift(from);
        return {
          upload_id: "u1",
          part_size: 4,
          part_count: 250,
          parts: urlsOf(r.from, r.to),
          expires_at: "",
        } satisfies PartsPage;
      };
      return { pages, asked };
    };
    // One part off: asked for 101.., got 102..201.
    const off = wrong((from) => ({ from: from + 1, to: from + 100 }));
    const t = transport();
    await expect(runUpload(fileOf(size).blob, plan, { put: t.put, pages: off.pages })).rejects.toThrow(
      /the upload's parts do not cover the file \(asked for parts from 101 of 250, got 102\.\.201/,
    );
    expect(off.asked).toEqual([101]);
    // The first page went up; nothing from the wrong page did.
    expect(t.calls.every((c) => Number(c.slice(3)) <= 100)).toBe(true);
    expect(t.calls.length).toBeGreaterThan(90);
    // Past the end: 201..300 of 250.
    const past = wrong((from) => ({ from, to: from + 99 }));
    await expect(
      runUpload(fileOf(size).blob, plan, { put: transport().put, pages: past.pages }),
    ).rejects.toThrow(/do not cover the file \(asked for parts from 201 of 250, got 201\.\.300/);
    // Empty: no progress would ever be made.
    const empty = wrong(() => ({ from: 1, to: 0 }));
    await expect(
      runUpload(fileOf(size).blob, plan, { put: transport().put, pages: empty.pages }),
    ).rejects.toThrow(/do not cover the file \(no part URLs from part 101\)/);
    expect(empty.asked).toEqual([101]);
  });

  it("fails clearly when a page is for another upload, or the URLs cannot be asked for", async () => {
    const size = 250 * 4;
    const plan = planUpload(size, multipart(size, 4));
    const other: PartPages = async (from) => ({
      upload_id: "u1",
      part_size: 8,
      part_count: 125,
      parts: urlsOf(from, from + 99),
      expires_at: "",
    });
    await expect(runUpload(fileOf(size).blob, plan, { put: transport().put, pages: other })).rejects.toThrow(
      /do not cover the file/,
    );
    await expect(runUpload(fileOf(size).blob, plan, { put: transport().put })).rejects.toThrow(
      /do not cover the file \(no way to ask for the URLs from part 101 of 250\)/,
    );
  });

  it("retries a page request that broke, not one the API refused", async () => {
    const size = 150 * 4;
    const s = pagesServer(size, 4);
    let broken = 1;
    const flaky: PartPages = async (from, signal) => {
      if (broken-- > 0) throw new TypeError("Failed to fetch");
      return s.pages(from, signal);
    };
    const done = await runUpload(fileOf(size).blob, planUpload(size, multipart(size, 4)), {
      put: transport().put,
      pages: flaky,
    });
    expect(done.parts).toHaveLength(150);
    expect(s.asked).toEqual([101]);
    let refused = 0;
    const refusing: PartPages = async () => {
      refused += 1;
      throw new ApiError(400, "t", "Bad Request", "from is out of range");
    };
    await expect(
      runUpload(fileOf(size).blob, planUpload(size, multipart(size, 4)), {
        put: transport().put,
        pages: refusing,
      }),
    ).rejects.toThrow(/from is out of range/);
    expect(refused).toBe(1);
  });

  it("cancels a page request in flight", async () => {
    const size = 150 * 4;
    const ctl = new AbortController();
    let signalled = false;
    // The request hangs until cancelled; the person cancels as soon as it is asked for.
    const slow: PartPages = (_from, signal) =>
      new Promise((_, reject) => {
        signal.addEventListener("abort", () => {
          signalled = true;
          reject(new DOMException("x", "AbortError"));
        });
        setTimeout(() => ctl.abort(), 1);
      });
    const t = transport();
    const run = runUpload(fileOf(size).blob, planUpload(size, multipart(size, 4)), {
      put: t.put,
      pages: slow,
      signal: ctl.signal,
    });
    await expect(run).rejects.toMatchObject({ name: "AbortError" });
    expect(signalled).toBe(true);
    expect(t.calls.every((c) => Number(c.slice(3)) <= 100)).toBe(true);
  });
});

describe("partPages", () => {
  afterEach(() => {
    vi.unstubAllGlobals();
    setHooks({ token: () => null, unauthorized: () => {} });
  });

  it("asks the API for the page from a part, with the bearer token", async () => {
    setHooks({ token: () => "a.b.c", unauthorized: () => {} });
    const page: PartsPage = {
      upload_id: "u 1",
      part_size: 4,
      part_count: 250,
      parts: urlsOf(101, 200),
      expires_at: "",
    };
    const fetch = vi.fn(async (_url: string, _init: RequestInit) => new Response(JSON.stringify(page)));
    vi.stubGlobal("fetch", fetch);
    const ctl = new AbortController();
    expect(await partPages("s/1", "u 1")(101, ctl.signal)).toEqual(page);
    const [url, init] = fetch.mock.calls[0];
    expect(url).toBe("/api/slides/s%2F1/upload/parts?upload_id=u+1&from=101");
    expect(init.method).toBe("GET");
    expect(init.signal).toBe(ctl.signal);
    expect((init.headers as Record<string, string>).Authorization).toBe("Bearer a.b.c");
  });
});

describe("slideContentType", () => {
  it("names the slide types the API takes", () => {
    expect(slideContentType("CMU-1-Small-Region.svs")).toBe("image/x-aperio-svs");
    expect(slideContentType("x.TIFF")).toBe("image/tiff");
    expect(slideContentType("notes.txt")).toBe("application/octet-stream");
  });
});
