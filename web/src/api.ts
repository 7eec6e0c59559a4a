// The gateway's API (DESIGN §7): JSON in, JSON out, errors as RFC 9457 problem+json, which
// become an `ApiError` whose message a person can read.

import type { components } from "./api.gen";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly type: string,
    readonly title: string,
    readonly detail: string,
  ) {
    super(detail || title || `HTTP ${status}`);
  }
}

/** Who is signed in, as the token says. */
export type Identity = { user: string; tenant: string; roles: string[] };

type Hooks = {
  /** The current ID token, or null when signed out. */
  token: () => string | null;
  /** Called on a 401: the token is no good any more. */
  unauthorized: (why: string) => void;
};

let hooks: Hooks = { token: () => null, unauthorized: () => {} };

export function setHooks(h: Hooks): void {
  hooks = h;
}

export function bearer(): Record<string, string> {
  const t = hooks.token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

/** A problem+json body (or anything else) as an `ApiError`. */
export async function problemOf(res: Response): Promise<ApiError> {
  let body: { type?: string; title?: string; detail?: string } = {};
  try {
    body = await res.json();
  } catch {
    // Not JSON: the status says what there is to say.
  }
  const title = body.title ?? res.statusText;
  let detail = body.detail ?? "";
  if (res.status === 403 && !detail) detail = "your roles do not allow this";
  return new ApiError(res.status, body.type ?? "about:blank", title, detail);
}

export type RequestOptions = {
  method?: string;
  body?: unknown;
  headers?: Record<string, string>;
  signal?: AbortSignal;
};

/** Calls the API; throws an `ApiError` for any status that is not 2xx. */
export async function api<T>(path: string, opts: RequestOptions = {}): Promise<T> {
  const headers: Record<string, string> = {
    Accept: "application/json",
    ...bearer(),
    ...(opts.headers ?? {}),
  };
  let body: string | undefined;
  if (opts.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(opts.body);
  }
  const res = await fetch(path, { method: opts.method ?? "GET", headers, body, signal: opts.signal });
  if (!res.ok) {
    const e = await problemOf(res);
    if (res.status === 401) hooks.unauthorized(e.message);
    throw e;
  }
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  return (text ? JSON.parse(text) : undefined) as T;
}

/** The claims of a JWT, unverified (the gateway verifies it; the app only shows them). */
export function claimsOf(token: string): Record<string, unknown> {
  const part = token.split(".")[1] ?? "";
  const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
  const json = decodeURIComponent(
    Array.from(atob(b64.padEnd(b64.length + ((4 - (b64.length % 4)) % 4), "=")))
      .map((c) => `%${c.charCodeAt(0).toString(16).padStart(2, "0")}`)
      .join(""),
  );
  return JSON.parse(json);
}

export function identityOf(token: string): Identity & { exp: number } {
  const c = claimsOf(token);
  return {
    user: String(c["cognito:username"] ?? c.sub ?? ""),
    tenant: String(c["custom:tenant"] ?? ""),
    roles: Array.isArray(c["cognito:groups"]) ? (c["cognito:groups"] as string[]) : [],
    exp: Number(c.exp ?? 0),
  };
}

// The API's shapes, from the gateway's OpenAPI document (gateway/openapi.json), generated into
// `api.gen.ts` by `npm run gen:api`. Where the document is looser than what the app relies on,
// the alias says so.

type Schemas = components["schemas"];

/** A job's progress, in tiles. */
export type Progress = NonNullable<Schemas["Job"]["progress"]>;

/** How soon a job should run: a STAT job (a frozen section during surgery) is taken by the next
 * free GPU worker before every routine job waiting. Nothing is preempted. */
export type Priority = NonNullable<Schemas["NewJob"]["priority"]>;

/** A job (`GET /api/jobs/{id}`, the items of `GET /api/jobs`, a live `job.updated`).
 *
 * The document is looser than the API here: it does not list the nullable columns
 * (`worker_id`, `lease_until`, `progress`, `failure`, `manifest_*`) or `priority` as required,
 * though the API always sends them (null when empty). The app reads each as "absent or null",
 * and shows an absent priority as routine. `waiting_for_admission`, which the document requires,
 * is carried by `GET /api/jobs` and `GET /api/jobs/{id}` only; a live `job.updated` does not, so
 * the app's type makes it optional, and absent means unknown (`status.ts`). `slide_name` names
 * the job in lists (`names.ts`). */
export type Job = Omit<Schemas["Job"], "waiting_for_admission"> & {
  waiting_for_admission?: boolean;
  /** The slide's name (null once erased, or not known); absent from an API that predates it. */
  slide_name?: string | null;
};

/** The body of `POST /api/jobs`. */
export type NewJob = Schemas["NewJob"];

/** A job kind's name, as the API takes it. */
export type JobKind = NewJob["kind"];

/** A slide (`GET /api/slides/{id}`, the items of `GET /api/slides`). As with `Job`, the
 * nullable `name`, `metadata` and `rejection` are optional in the document and always sent. */
export type Slide = Schemas["Slide"];

/** What the worker read from a slide when it verified it (`Slide.metadata`, which the document
 * leaves an open object; `events::SlideMetadata` is its shape). A field is absent where the slide
 * does not record it, or records something unusable: nothing is filled in. The API carries no
 * scan date. */
export type SlideMetadata = {
  vendor?: string;
  /** Level 0, in pixels. */
  width?: number;
  height?: number;
  /** Micrometres per level-0 pixel, across and down. */
  mpp_x?: number;
  mpp_y?: number;
  objective_power?: number;
};

/** A slide's `metadata` as `SlideMetadata`. */
export function slideMetadata(metadata: Slide["metadata"]): SlideMetadata {
  const m = metadata ?? {};
  const out: SlideMetadata = {};
  const positive = (v: unknown) => (typeof v === "number" && Number.isFinite(v) && v > 0 ? v : undefined);
  if (typeof m.vendor === "string" && m.vendor.trim()) out.vendor = m.vendor.trim();
  for (const k of ["width", "height", "mpp_x", "mpp_y", "objective_power"] as const) {
    const v = positive(m[k]);
    if (v !== undefined) out[k] = v;
  }
  return out;
}

/** One event of a job's history (`GET /api/jobs/{id}/events`). */
export type TimelineEntry = Schemas["TimelineEntry"];

/** `POST /api/slides`: the new slide and where to upload it. */
export type SlideCreated = Schemas["SlideCreated"];

/** A multipart upload and one page of its part URLs. */
export type PartPage = Schemas["PartPage"];

/** A job's history (`GET /api/jobs/{id}/events`). */
export type Timeline = Schemas["Timeline"];

/** Whether the log verifies for a job's events (`GET /api/jobs/{id}/verify`). */
export type StreamVerification = Schemas["StreamVerification"];

/** A page of slides or jobs: `next` is the cursor of the next page, absent or null on the last. */
export type SlidePage = Schemas["SlidePage"];
export type JobPage = Schemas["JobPage"];

/** A job request. Routine is the API's default, so only STAT is sent: a routine request is the
 * one the API took before it had priorities. */
export function newJob(slideId: string, kind: JobKind, params: NewJob["params"], priority: Priority): NewJob {
  const body: NewJob = { slide_id: slideId, kind, params };
  if (priority === "stat") body.priority = "stat";
  return body;
}

/** The reason the API refused a job's priority, or null when the error is about something else.
 * The gateway names the field first: "priority: STAT jobs may be submitted by pathologist
 * (Jobs__StatGroups)" (403), or an unknown value (422). */
export function priorityRefusal(e: unknown): string | null {
  if (!(e instanceof ApiError) || (e.status !== 403 && e.status !== 422)) return null;
  const m = e.detail.match(/^priority:\s*(.+)$/s);
  return m ? m[1].replace(/\.\s*$/, "") : null;
}

/** How the app signs in, and its WebSocket URL (`GET /api/app-config`). */
export type AppConfig = Schemas["AppConfig"];

export const WRITERS = ["pathologist", "admin"];
export const AUDITORS = ["auditor"];

export function holds(identity: Identity | null, roles: string[]): boolean {
  return !!identity && identity.roles.some((r) => roles.includes(r));
}
