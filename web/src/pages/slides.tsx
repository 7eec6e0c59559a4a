import { Fragment } from "preact";
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { api, holds, type Slide, type SlideCreated, WRITERS } from "../api";
import type { Session } from "../auth";
import { Badge } from "../badge";
import { bytes, time } from "../format";
import { type FeedMessage, useLive } from "../live";
import { navigate, useHeading } from "../nav";
import { usePages } from "../pages";
import { TableHead } from "../table";
import { partPages, planUpload, runUpload, slideContentType, type UploadProgress } from "../upload";
import { JobForm } from "./jobform";
import { SlideJobs } from "./jobs";

/** `set` with `id` added, or taken out when it is there. */
function toggled(set: ReadonlySet<string>, id: string): ReadonlySet<string> {
  const out = new Set(set);
  if (!out.delete(id)) out.add(id);
  return out;
}

type Upload = {
  name: string;
  progress: UploadProgress;
  cancel: AbortController;
  error?: string;
  done?: boolean;
};

export function SlidesPage(props: { who: Session }) {
  const slidesUrl = useCallback((cursor: string | null) => {
    const q = new URLSearchParams({ limit: "50" });
    if (cursor) q.set("cursor", cursor);
    return `/api/slides?${q}`;
  }, []);
  const {
    items: slides,
    setItems: setSlides,
    next,
    error,
    load,
    loaded,
  } = usePages<Slide, string>(slidesUrl);
  const heading = useHeading("Slides");
  /** The slides whose jobs are listed under them. */
  const [open, setOpen] = useState<ReadonlySet<string>>(new Set());
  const [query, setQuery] = useState("");
  const [upload, setUpload] = useState<Upload | null>(null);
  const [processing, setProcessing] = useState<string | null>(null);
  const [dragging, setDragging] = useState(false);
  const input = useRef<HTMLInputElement>(null);
  const canWrite = holds(props.who, WRITERS);

  useEffect(() => {
    load(null);
  }, [load]);

  useLive(
    useCallback((m: FeedMessage) => {
      if (m.type !== "slide.updated" || !m.slide) return;
      const s = m.slide as Slide;
      setSlides((all) => {
        const i = all.findIndex((x) => x.slide_id === s.slide_id);
        if (i < 0) return [s, ...all];
        const copy = [...all];
        copy[i] = s;
        return copy;
      });
    }, []),
  );

  const start = async (file: File) => {
    const cancel = new AbortController();
    const state: Upload = {
      name: file.name,
      progress: { sent: 0, total: file.size, bytesPerSecond: 0 },
      cancel,
    };
    setUpload(state);
    try {
      const created = await api<SlideCreated>("/api/slides", {
        method: "POST",
        body: {
          name: file.name,
          size_bytes: file.size,
          content_type: slideContentType(file.name),
          file_name: file.name,
        },
        headers: { "Idempotency-Key": crypto.randomUUID() },
      });
      const plan = planUpload(file.size, created.upload);
      const done = await runUpload(file, plan, {
        signal: cancel.signal,
        pages: plan.uploadId ? partPages(created.slide_id, plan.uploadId) : undefined,
        onProgress: (p) => setUpload((u) => (u && u.cancel === cancel ? { ...u, progress: p } : u)),
      });
      await api(`/api/slides/${created.slide_id}/uploaded`, {
        method: "POST",
        body: plan.kind === "multipart" ? { upload_id: plan.uploadId, parts: done.parts } : {},
      });
      setUpload((u) => (u && u.cancel === cancel ? { ...u, done: true } : u));
      load(null);
    } catch (e) {
      const err = e as Error;
      const message = err.name === "AbortError" ? "Cancelled." : err.message;
      setUpload((u) => (u && u.cancel === cancel ? { ...u, error: message } : u));
    }
  };

  const shown = slides.filter((s) => !query || (s.name ?? "").toLowerCase().includes(query.toLowerCase()));
  const p = upload?.progress;
  const pct = p?.total ? Math.floor((p.sent / p.total) * 100) : 0;

  return (
    <section aria-labelledby="slides-title">
      <h1 id="slides-title" ref={heading} tabIndex={-1}>
        Slides
      </h1>
      {canWrite && (
        // biome-ignore lint/a11y/noStaticElementInteractions: dropping a file adds to the file picker inside, which the keyboard reaches.
        <div
          class={`dropzone${dragging ? " dragging" : ""}`}
          onDragOver={(e) => {
            e.preventDefault();
            setDragging(true);
          }}
          onDragLeave={() => setDragging(false)}
          onDrop={(e) => {
            e.preventDefault();
            setDragging(false);
            const f = e.dataTransfer?.files?.[0];
            if (f) start(f);
          }}
        >
          <p>Drop a slide here, or</p>
          <label class="button">
            Choose a slide file
            <input
              ref={input}
              type="file"
              class="visually-hidden"
              accept=".svs,.tif,.tiff,.ndpi,.scn,.mrxs,.vms,.bif"
              onChange={(e) => {
                const f = e.currentTarget.files?.[0];
                if (f) start(f);
                e.currentTarget.value = "";
              }}
            />
          </label>
        </div>
      )}
      {upload && (
        <div class="upload" aria-live="polite">
          <p>
            {upload.done ? "Uploaded" : upload.error ? "Upload stopped" : "Uploading"}{" "}
            <strong>{upload.name}</strong>
          </p>
          <progress max={100} value={pct} aria-label={`Upload of ${upload.name}`} data-percent={pct} />
          <p class="muted">
            {pct} % · {bytes(p?.sent ?? 0)} of {bytes(p?.total ?? 0)} ·{" "}
            {bytes(Math.round(p?.bytesPerSecond ?? 0))}/s
          </p>
          {!upload.done && !upload.error && (
            <button type="button" onClick={() => upload.cancel.abort()}>
              Cancel upload
            </button>
          )}
          {upload.error && (
            <p role="alert" class="error">
              {upload.error}
            </p>
          )}
        </div>
      )}
      <label class="search">
        Search by name
        <input type="search" value={query} onInput={(e) => setQuery(e.currentTarget.value)} />
      </label>
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
      <table class="cards">
        <TableHead
          caption="Slides, newest first"
          columns={["Name", "Status", "Size", "Registered"]}
          actions
        />
        <tbody>
          {shown.map((s) => (
            <Fragment key={s.slide_id}>
              <tr data-slide={s.slide_id}>
                <td data-label="Name">{s.name ?? <em>name erased</em>}</td>
                <td data-label="Status">
                  <Badge status={s.status} />
                  {s.rejection && <div class="reason">{s.rejection}</div>}
                </td>
                <td data-label="Size">{bytes(s.size_bytes)}</td>
                <td data-label="Registered">{time(s.registered_at)}</td>
                <td>
                  <span class="actions">
                    {canWrite && ["uploaded", "verified"].includes(s.status) && (
                      <button
                        type="button"
                        onClick={() => setProcessing(processing === s.slide_id ? null : s.slide_id)}
                      >
                        Process
                      </button>
                    )}
                    <button
                      type="button"
                      aria-expanded={open.has(s.slide_id)}
                      // The list exists only while open.
                      aria-controls={open.has(s.slide_id) ? `jobs-of-${s.slide_id}` : undefined}
                      onClick={() => setOpen(toggled(open, s.slide_id))}
                    >
                      Jobs<span class="visually-hidden"> on {s.name ?? "this slide"}</span>
                    </button>
                  </span>
                </td>
              </tr>
              {open.has(s.slide_id) && (
                <tr class="slide-jobs-row" data-jobs-of={s.slide_id}>
                  <td colSpan={5}>
                    <SlideJobs slideId={s.slide_id} id={`jobs-of-${s.slide_id}`} />
                  </td>
                </tr>
              )}
            </Fragment>
          ))}
        </tbody>
      </table>
      {!loaded && !error && <p class="muted">Loading…</p>}
      {loaded && shown.length === 0 && (
        <p class="muted" data-empty={slides.length === 0 ? "none" : "no-match"}>
          {slides.length === 0
            ? "No slides yet."
            : `No slide's name contains “${query}”${next ? " among those loaded: load more to search further" : ""}.`}
        </p>
      )}
      {next && (
        <button type="button" onClick={() => load(next)}>
          Load more
        </button>
      )}
      {processing && (
        <JobForm
          key={processing}
          slideId={processing}
          slideName={slides.find((s) => s.slide_id === processing)?.name ?? processing}
          onDone={() => {
            setProcessing(null);
            navigate("/jobs");
          }}
          onCancel={() => setProcessing(null)}
        />
      )}
    </section>
  );
}
