// Uploading a slide to the URLs `POST /api/slides` answered with: one PUT, or a multipart
// upload whose parts go up in parallel (at most `concurrency` at once), each retried a few
// times. Progress reports bytes and speed; an AbortSignal cancels every request in flight.
//
// A multipart answer holds only the first page of part URLs (at most 100); the rest are asked
// for page by page (`GET /api/slides/{id}/upload/parts?upload_id=&from=`) when the parts
// reach one without a URL, one page request at a time, so a 10,000-part upload keeps a page
// of URLs in memory, not 10,000.

import { ApiError, api, type PartPage, type SlideCreated } from "./api";

/** What `POST /api/slides` answers `upload` with: one PUT, a multipart upload whose first page
 * of part URLs (parts 1..min(100, part_count)) it holds, or null when the slide is uploaded
 * already. */
export type UploadAnswer = SlideCreated["upload"];
export type SingleAnswer = Extract<NonNullable<UploadAnswer>, { url: string }>;
export type MultipartAnswer = Extract<NonNullable<UploadAnswer>, { multipart: unknown }>;

/** `GET /api/slides/{id}/upload/parts?upload_id=&from=N`: parts N..N+len-1. */
export type PartsPage = PartPage;
export type PartUrl = PartPage["parts"][number];

/** Asks for the page of part URLs that starts at part `from`. */
export type PartPages = (from: number, signal: AbortSignal) => Promise<PartsPage>;

export type Part = {
  partNumber: number;
  url: string;
  start: number;
  end: number;
  headers: Record<string, string>;
};
export type Plan = {
  kind: "single" | "multipart";
  uploadId?: string;
  /** The file's size in bytes. */
  size: number;
  /** Bytes in every part but the last (for a single PUT, the whole file). */
  partSize: number;
  partCount: number;
  /** The parts whose URLs are known up front: the one PUT, or a multipart upload's first page. */
  parts: Part[];
};

const NOT_COVERED = "the upload's parts do not cover the file";

function notCovered(why: string): Error {
  return new Error(`${NOT_COVERED} (${why})`);
}

/** The byte range of part `n` (1-based) of a multipart upload. */
function partOf(size: number, partSize: number, n: number, url: string): Part {
  const start = (n - 1) * partSize;
  return { partNumber: n, url, start, end: Math.min(size, start + partSize), headers: {} };
}

/**
 * Parts `from`, `from + 1`, … in order, checked to be exactly the consecutive part numbers
 * asked for (at least one, none past `partCount`).
 */
function pageOf(size: number, partSize: number, partCount: number, from: number, urls: PartUrl[]): Part[] {
  const sorted = [...urls].sort((a, b) => a.part_number - b.part_number);
  if (sorted.length === 0) throw notCovered(`no part URLs from part ${from}`);
  const last = from + sorted.length - 1;
  sorted.forEach((p, i) => {
    if (p.part_number !== from + i || last > partCount) {
      const got = sorted.map((q) => q.part_number);
      throw notCovered(
        `asked for parts from ${from} of ${partCount}, got ${got[0]}..${got[got.length - 1]} (${got.length})`,
      );
    }
  });
  return sorted.map((p) => partOf(size, partSize, p.part_number, p.url));
}

/** The requests that upload `size` bytes as the API answered. */
export function planUpload(size: number, answer: UploadAnswer): Plan {
  if (!answer) throw new Error("the API gave no upload URL: the slide is uploaded already");
  if ("multipart" in answer) {
    const m = answer.multipart;
    const partSize = m.part_size;
    const partCount = m.part_count;
    if (!Number.isSafeInteger(partSize) || partSize <= 0 || !Number.isSafeInteger(partCount)) {
      throw notCovered(`part size ${partSize}, part count ${partCount}`);
    }
    const expected = Math.ceil(size / partSize);
    if (partCount !== expected) {
      throw notCovered(`${partCount} parts of ${partSize} bytes for ${size} bytes, not ${expected}`);
    }
    const parts = partCount === 0 ? [] : pageOf(size, partSize, partCount, 1, m.parts);
    return { kind: "multipart", uploadId: m.upload_id, size, partSize, partCount, parts };
  }
  return {
    kind: "single",
    size,
    partSize: size,
    partCount: 1,
    parts: [{ partNumber: 1, url: answer.url, start: 0, end: size, headers: answer.headers }],
  };
}

/** The API's further pages of part URLs for the multipart upload `uploadId` of `slideId`. */
export function partPages(slideId: string, uploadId: string): PartPages {
  return (from, signal) => {
    const q = new URLSearchParams({ upload_id: uploadId, from: String(from) });
    return api<PartsPage>(`/api/slides/${encodeURIComponent(slideId)}/upload/parts?${q}`, { signal });
  };
}

/** One PUT: resolves to the ETag; reports bytes sent so far. */
export type Put = (
  url: string,
  body: Blob,
  headers: Record<string, string>,
  onBytes: (sent: number) => void,
  signal: AbortSignal,
) => Promise<string>;

export type UploadProgress = { sent: number; total: number; bytesPerSecond: number };

export type UploadOptions = {
  concurrency?: number;
  retries?: number;
  onProgress?: (p: UploadProgress) => void;
  signal?: AbortSignal;
  put?: Put;
  /** Where a multipart upload's further part URLs come from (`partPages`). */
  pages?: PartPages;
  now?: () => number;
};

export type Uploaded = { parts: { part_number: number; etag: string }[] };

let inFlight = 0;

/** Whether an upload is running in this tab: an idle sign-out waits for it (signing out would
 * throw away the parts already sent). */
export function uploading(): boolean {
  return inFlight > 0;
}

/** Runs `plan` over `file`. Rejects with an AbortError when cancelled. */
export async function runUpload(file: Blob, plan: Plan, opts: UploadOptions = {}): Promise<Uploaded> {
  inFlight++;
  try {
    return await runPlan(file, plan, opts);
  } finally {
    inFlight--;
  }
}

async function runPlan(file: Blob, plan: Plan, opts: UploadOptions): Promise<Uploaded> {
  const concurrency = Math.max(1, opts.concurrency ?? 4);
  const retries = opts.retries ?? 2;
  const put = opts.put ?? xhrPut;
  const now = opts.now ?? (() => performance.now());
  const total = plan.size;
  const count = plan.partCount;
  // Bytes of the parts done, and of those in flight (at most `concurrency` of them).
  let doneBytes = 0;
  const sending = new Map<number, number>();
  const started = now();
  const inner = new AbortController();
  const outer = opts.signal;
  const cancel = () => inner.abort();
  outer?.addEventListener("abort", cancel);
  const report = () => {
    let sent = doneBytes;
    for (const n of sending.values()) sent += n;
    const secs = Math.max(0.001, (now() - started) / 1000);
    opts.onProgress?.({ sent, total, bytesPerSecond: sent / secs });
  };
  const etags: string[] = new Array(count).fill("");

  // The parts with a URL that no worker has taken yet: the first page, then each page asked
  // for when a worker reaches a part past `known`. A page is asked for only once every part
  // before it is taken, so this holds one page at most.
  const ready = new Map<number, Part>(plan.parts.map((p) => [p.partNumber, p]));
  let known = plan.parts.length ? plan.parts[plan.parts.length - 1].partNumber : 0;
  let fetching: Promise<void> | null = null;
  const fetchPage = async (from: number) => {
    const pages = opts.pages;
    if (!pages) throw notCovered(`no way to ask for the URLs from part ${from} of ${count}`);
    let page: PartsPage;
    for (let attempt = 0; ; attempt++) {
      if (inner.signal.aborted) throw abortError();
      try {
        page = await pages(from, inner.signal);
        break;
      } catch (e) {
        if (inner.signal.aborted || isAbort(e)) throw abortError();
        // A refusal (4xx) will not change on a retry; a broken connection or a 5xx may.
        if (attempt >= retries || (e instanceof ApiError && e.status < 500)) throw e;
      }
    }
    if (page.upload_id !== plan.uploadId || page.part_size !== plan.partSize || page.part_count !== count) {
      throw notCovered(
        `a page of part URLs for upload ${page.upload_id} (${page.part_count} parts of ${page.part_size} bytes)`,
      );
    }
    for (const p of pageOf(total, plan.partSize, count, from, page.parts)) ready.set(p.partNumber, p);
    known = from + page.parts.length - 1;
  };
  /** Part `n`'s URL, asking for its page when no one has yet (one request at a time). */
  const take = async (n: number): Promise<Part> => {
    for (;;) {
      const part = ready.get(n);
      if (part) {
        ready.delete(n);
        return part;
      }
      if (inner.signal.aborted) throw abortError();
      if (!fetching) {
        fetching = fetchPage(known + 1).finally(() => {
          fetching = null;
        });
      }
      await fetching;
    }
  };

  let next = 1;
  const worker = async () => {
    while (next <= count) {
      const part = await take(next++);
      const size = part.end - part.start;
      for (let attempt = 0; ; attempt++) {
        if (inner.signal.aborted) throw abortError();
        sending.set(part.partNumber, 0);
        try {
          const etag = await put(
            part.url,
            file.slice(part.start, part.end),
            part.headers,
            (n) => {
              if (sending.has(part.partNumber)) {
                sending.set(part.partNumber, n);
                report();
              }
            },
            inner.signal,
          );
          sending.delete(part.partNumber);
          doneBytes += size;
          report();
          etags[part.partNumber - 1] = etag;
          break;
        } catch (e) {
          sending.delete(part.partNumber);
          if (inner.signal.aborted || isAbort(e)) throw abortError();
          if (attempt >= retries) throw e;
        }
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, count) }, worker));
  } catch (e) {
    inner.abort();
    throw e;
  } finally {
    outer?.removeEventListener("abort", cancel);
  }
  report();
  return { parts: etags.map((etag, i) => ({ part_number: i + 1, etag })) };
}

function abortError(): Error {
  return new DOMException("the upload was cancelled", "AbortError");
}

function isAbort(e: unknown): boolean {
  return e instanceof DOMException && e.name === "AbortError";
}

/** PUT with XMLHttpRequest, the one browser API that reports upload progress. */
export const xhrPut: Put = (url, body, headers, onBytes, signal) =>
  new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => onBytes(e.loaded);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(xhr.getResponseHeader("ETag") ?? "");
      else reject(new Error(`the upload was refused (${xhr.status})`));
    };
    xhr.onerror = () => reject(new Error("the upload failed: the connection broke"));
    xhr.onabort = () => reject(abortError());
    signal.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.send(body);
  });

/** A content type the API takes for a slide file, from its name. */
export function slideContentType(name: string): string {
  const ext = name.toLowerCase().split(".").pop() ?? "";
  return (
    {
      svs: "image/x-aperio-svs",
      tif: "image/tiff",
      tiff: "image/tiff",
      ndpi: "image/x-hamamatsu-ndpi",
      scn: "image/x-leica-scn",
    }[ext] ?? "application/octet-stream"
  );
}
