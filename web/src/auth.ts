// The session: the ID token in memory, renewed before it expires, and signing in and out in
// either of the two ways `GET /api/app-config` names (mira dev's sign-in, or Cognito).
//
// Under mira dev the gateway also keeps a session cookie (ADR 0032) the app cannot read: a
// reload, a pasted link or a second tab asks `/api/session/refresh` for a token, and the idle
// deadline lives there too (idle.ts watches it here).

import { type AppConfig, claimsOf, type Identity, identityOf } from "./api";
import {
  authorizeUrl,
  type CognitoConfig,
  challengeOf,
  codeExchange,
  createVerifier,
  postToken,
  refreshDelay,
  refreshExchange,
} from "./pkce";

export type Session = Identity & { token: string; exp: number };

type Listener = (s: Session | null) => void;

let current: Session | null = null;
let refreshToken: string | null = null;
let timer: ReturnType<typeof setTimeout> | undefined;
let renew: (() => Promise<void>) | null = null;
const listeners = new Set<Listener>();

export function session(): Session | null {
  return current;
}

export function onSession(l: Listener): () => void {
  listeners.add(l);
  return () => listeners.delete(l);
}

function set(token: string | null): void {
  clearTimeout(timer);
  current = token ? { ...identityOf(token), token } : null;
  for (const l of listeners) l(current);
  if (current && renew) {
    const iat = Number(claimsOf(current.token).iat ?? current.exp - 3600);
    const again = renew;
    timer = setTimeout(
      () => {
        again().catch(() => set(null));
      },
      refreshDelay(iat, current.exp, Date.now()),
    );
  }
}

/** What `/api/session/refresh` and `/activity` answer. */
type SessionAnswer = {
  id_token: string;
  expires_at: string;
  idle_deadline: string;
  idle_sign_out_seconds: number;
};

/** The gateway's idle deadline (ms since the epoch) and timeout of the current session; 0 when
 * it keeps none (Cognito). */
export const idle = { deadline: 0, seconds: 0 };

async function sessionCall(what: "refresh" | "activity" | "end"): Promise<SessionAnswer | null> {
  const res = await fetch(`/api/session/${what}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: "{}",
    credentials: "same-origin",
  });
  if (res.status === 204) return null;
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.detail ?? `the session: ${res.status}`);
  return body as SessionAnswer;
}

function adopt(a: SessionAnswer | null): void {
  if (!a) throw new Error("the session answered nothing");
  idle.deadline = Date.parse(a.idle_deadline);
  idle.seconds = a.idle_sign_out_seconds;
  renew = async () => adopt(await sessionCall("refresh"));
  set(a.id_token);
}

/** A page opened (a reload, a pasted link, another tab): the gateway's session, if there is
 * one, gives a token. False when there is none (or it ended). */
export async function resumeSession(): Promise<boolean> {
  try {
    adopt(await sessionCall("refresh"));
    return true;
  } catch {
    return false;
  }
}

/** The user did something: the gateway moves the deadline; its new value (ms). */
export async function reportActivity(): Promise<number> {
  adopt(await sessionCall("activity"));
  return idle.deadline;
}

/** mira dev: a token for any user, tenant and role, and the gateway's session cookie. */
export async function devSignIn(user: string, tenant: string, roles: string[]): Promise<void> {
  const get = async () => {
    const res = await fetch("/dev/sign-in", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user, tenant, roles }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(body.detail ?? `sign-in failed (${res.status})`);
    return body.id_token as string;
  };
  const first = await get();
  // The sign-in set the session cookie: from here on, tokens come from the session.
  if (await resumeSession()) return;
  renew = async () => set(await get());
  set(first);
}

const VERIFIER = "mira.pkce.verifier";
const STATE = "mira.pkce.state";
const RETURN = "mira.return";

/** Cognito: off to the Hosted UI. The page it starts from is kept, fragment and all (a viewer's
 * link carries its view there), so that a pasted link survives the round trip. */
export async function cognitoSignIn(cfg: CognitoConfig): Promise<void> {
  const verifier = createVerifier();
  const state = createVerifier();
  sessionStorage.setItem(VERIFIER, verifier);
  sessionStorage.setItem(STATE, state);
  if (location.pathname === "/signed-in") sessionStorage.removeItem(RETURN);
  else sessionStorage.setItem(RETURN, location.pathname + location.search + location.hash);
  location.assign(authorizeUrl(cfg, await challengeOf(verifier), state));
}

/** Where to go once back from the Hosted UI: the page the sign-in started from (a path of this
 * app only), or the slide list. Read once. */
export function returnPath(): string {
  const p = sessionStorage.getItem(RETURN);
  sessionStorage.removeItem(RETURN);
  // `//host` and `/\host` name another origin.
  return p && /^\/(?![/\\])/.test(p) ? p : "/";
}

/** Cognito: back from the Hosted UI with `?code=&state=`. */
export async function cognitoCallback(cfg: CognitoConfig, params: URLSearchParams): Promise<void> {
  const verifier = sessionStorage.getItem(VERIFIER);
  const state = sessionStorage.getItem(STATE);
  sessionStorage.removeItem(VERIFIER);
  sessionStorage.removeItem(STATE);
  const code = params.get("code");
  if (!verifier || !code || params.get("state") !== state)
    throw new Error("the sign-in did not come back as sent: try again");
  const t = await postToken(codeExchange(cfg, code, verifier));
  refreshToken = t.refresh_token ?? null;
  renew = async () => {
    if (!refreshToken) throw new Error("no refresh token");
    set((await postToken(refreshExchange(cfg, refreshToken))).id_token);
  };
  set(t.id_token);
}

export function signOut(config: AppConfig | null): void {
  renew = null;
  refreshToken = null;
  if (idle.deadline) sessionCall("end").catch(() => {});
  idle.deadline = 0;
  set(null);
  if (config?.auth.mode === "cognito") {
    const a = config.auth;
    const q = new URLSearchParams({ client_id: a.client_id, logout_uri: new URL("/", location.href).href });
    location.assign(`${a.domain}/logout?${q}`);
  }
}
