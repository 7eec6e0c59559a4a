// Uploading a slide to the URLs `POST /api/slides` answered with: one PUT, or a multipart
// upload whose parts go up in parallel (at most `concurrency` at once), each retried a few
// times. Progress reports bytes and speed; an AbortSignal cancels every request in flight.

export type SingleAnswer = {
  method: string;
  url: string;
  headers: Record<string, string>;
  expires_at: string;
};
export type MultipartAnswer = {
  multipart: {
    upload_id: string;
    part_size: number;
    parts: { part_number: number; url: string }[];
    expires_at: string;
  };
};
export type UploadAnswer = SingleAnswer | MultipartAnswer | null;

export type Part = {
  partNumber: number;
  url: string;
  start: number;
  end: number;
  headers: Record<string, string>;
};
export type Plan = { kind: "single" | "multipart"; uploadId?: string; parts: Part[] };

/** The requests that upload `size` bytes as the API answered. */
export function planUpload(size: number, answer: UploadAnswer): Plan {
  if (!answer) throw new Error("the API gave no upload URL: the slide is uploaded already");
  if ("multipart" in answer) {
    const m = answer.multipart;
    const parts = [...m.parts]
      .sort((a, b) => a.part_number - b.part_number)
      .map((p) => {
        const start = (p.part_number - 1) * m.part_size;
        return {
          partNumber: p.part_number,
          url: p.url,
          start,
          end: Math.min(size, start + m.part_size),
          headers: {},
        };
      });
    const covered = parts.length ? parts[parts.length - 1].end : 0;
    if (covered !== size || parts.some((p, i) => p.partNumber !== i + 1 || p.start >= p.end)) {
      throw new Error("the upload's parts do not cover the file");
    }
    return { kind: "multipart", uploadId: m.upload_id, parts };
  }
  return {
    kind: "single",
    parts: [{ partNumber: 1, url: answer.url, start: 0, end: size, headers: answer.headers }],
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
  now?: () => number;
};

export type Uploaded = { parts: { part_number: number; etag: string }[] };

/** Runs `plan` over `file`. Rejects with an AbortError when cancelled. */
export async function runUpload(file: Blob, plan: Plan, opts: UploadOptions = {}): Promise<Uploaded> {
  const concurrency = Math.max(1, opts.concurrency ?? 4);
  const retries = opts.retries ?? 2;
  const put = opts.put ?? xhrPut;
  const now = opts.now ?? (() => performance.now());
  const total = plan.parts.reduce((n, p) => n + (p.end - p.start), 0);
  const sentBy = new Map<number, number>();
  const started = now();
  const inner = new AbortController();
  const outer = opts.signal;
  const cancel = () => inner.abort();
  outer?.addEventListener("abort", cancel);
  const report = () => {
    const sent = [...sentBy.values()].reduce((a, b) => a + b, 0);
    const secs = Math.max(0.001, (now() - started) / 1000);
    opts.onProgress?.({ sent, total, bytesPerSecond: sent / secs });
  };
  const etags = new Map<number, string>();
  const queue = [...plan.parts];
  const worker = async () => {
    for (let p = queue.shift(); p; p = queue.shift()) {
      const part = p;
      for (let attempt = 0; ; attempt++) {
        if (inner.signal.aborted) throw abortError();
        try {
          const etag = await put(
            part.url,
            file.slice(part.start, part.end),
            part.headers,
            (n) => {
              sentBy.set(part.partNumber, n);
              report();
            },
            inner.signal,
          );
          sentBy.set(part.partNumber, part.end - part.start);
          report();
          etags.set(part.partNumber, etag);
          break;
        } catch (e) {
          sentBy.set(part.partNumber, 0);
          if (inner.signal.aborted || isAbort(e)) throw abortError();
          if (attempt >= retries) throw e;
        }
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(concurrency, plan.parts.length) }, worker));
  } catch (e) {
    inner.abort();
    throw e;
  } finally {
    outer?.removeEventListener("abort", cancel);
  }
  report();
  return {
    parts: plan.parts.map((p) => ({ part_number: p.partNumber, etag: etags.get(p.partNumber) ?? "" })),
  };
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
