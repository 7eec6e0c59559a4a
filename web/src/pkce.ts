// Sign-in with the Cognito Hosted UI: the authorization-code flow with PKCE (RFC 7636). The
// verifier lives in sessionStorage only across the redirect; tokens stay in memory.

export type CognitoConfig = { domain: string; client_id: string; redirect_url: string };

export function base64url(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** A fresh code verifier: 32 random bytes, 43 characters. */
export function createVerifier(random: (n: number) => Uint8Array = randomBytes): string {
  return base64url(random(32));
}

export function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  crypto.getRandomValues(b);
  return b;
}

/** The S256 code challenge of `verifier`. */
export async function challengeOf(verifier: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  return base64url(new Uint8Array(digest));
}

/** Where to send the browser to sign in. */
export function authorizeUrl(cfg: CognitoConfig, challenge: string, state: string): string {
  const q = new URLSearchParams({
    response_type: "code",
    client_id: cfg.client_id,
    redirect_uri: cfg.redirect_url,
    scope: "openid email profile",
    code_challenge_method: "S256",
    code_challenge: challenge,
    state,
  });
  return `${cfg.domain}/oauth2/authorize?${q}`;
}

export type TokenRequest = { url: string; body: URLSearchParams };

/** The token exchange for the code the Hosted UI sent back. */
export function codeExchange(cfg: CognitoConfig, code: string, verifier: string): TokenRequest {
  return {
    url: `${cfg.domain}/oauth2/token`,
    body: new URLSearchParams({
      grant_type: "authorization_code",
      client_id: cfg.client_id,
      code,
      redirect_uri: cfg.redirect_url,
      code_verifier: verifier,
    }),
  };
}

/** A fresh ID token for a refresh token. */
export function refreshExchange(cfg: CognitoConfig, refreshToken: string): TokenRequest {
  return {
    url: `${cfg.domain}/oauth2/token`,
    body: new URLSearchParams({
      grant_type: "refresh_token",
      client_id: cfg.client_id,
      refresh_token: refreshToken,
    }),
  };
}

export type Tokens = { id_token: string; refresh_token?: string; expires_in: number };

export async function postToken(req: TokenRequest, fetcher: typeof fetch = fetch): Promise<Tokens> {
  const res = await fetcher(req.url, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: req.body,
  });
  if (!res.ok) throw new Error(`the sign-in service answered ${res.status}`);
  return (await res.json()) as Tokens;
}

/**
 * When to renew a token that expires at `exp` (seconds) and was issued at `iat`: a tenth of
 * its life before the end, at least 30 s and at most 5 minutes before, never in the past.
 * Returns milliseconds from `now` (milliseconds).
 */
export function refreshDelay(iat: number, exp: number, now: number): number {
  const life = Math.max(0, exp - iat) * 1000;
  const margin = Math.min(5 * 60_000, Math.max(30_000, life / 10));
  return Math.max(0, exp * 1000 - margin - now);
}
