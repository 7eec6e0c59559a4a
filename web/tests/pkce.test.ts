import { describe, expect, it } from "vitest";
import {
  authorizeUrl,
  challengeOf,
  codeExchange,
  createVerifier,
  postToken,
  refreshDelay,
  refreshExchange,
} from "../src/pkce";

const cfg = {
  domain: "https://lab.auth.eu-west-1.amazoncognito.com",
  client_id: "c1",
  redirect_url: "https://mira.example/signed-in",
};

describe("PKCE", () => {
  it("computes RFC 7636's S256 challenge", async () => {
    // RFC 7636, appendix B.
    expect(await challengeOf("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")).toBe(
      "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
    );
  });

  it("makes 43-character verifiers from 32 random bytes", () => {
    const v = createVerifier(() => new Uint8Array(32).fill(255));
    expect(v).toHaveLength(43);
    expect(v).toMatch(/^[A-Za-z0-9_-]+$/);
    expect(createVerifier()).not.toBe(createVerifier());
  });

  it("sends the browser to the Hosted UI with the challenge", () => {
    const u = new URL(authorizeUrl(cfg, "CH", "ST"));
    expect(u.origin + u.pathname).toBe("https://lab.auth.eu-west-1.amazoncognito.com/oauth2/authorize");
    expect(Object.fromEntries(u.searchParams)).toMatchObject({
      response_type: "code",
      client_id: "c1",
      redirect_uri: cfg.redirect_url,
      code_challenge_method: "S256",
      code_challenge: "CH",
      state: "ST",
    });
  });

  it("exchanges the code with the verifier, and refreshes", async () => {
    const req = codeExchange(cfg, "CODE", "VER");
    expect(req.url).toBe(`${cfg.domain}/oauth2/token`);
    expect(Object.fromEntries(req.body)).toEqual({
      grant_type: "authorization_code",
      client_id: "c1",
      code: "CODE",
      redirect_uri: cfg.redirect_url,
      code_verifier: "VER",
    });
    expect(Object.fromEntries(refreshExchange(cfg, "R").body)).toEqual({
      grant_type: "refresh_token",
      client_id: "c1",
      refresh_token: "R",
    });
    let sent: RequestInit | undefined;
    const fake = (async (_u: string, init: RequestInit) => {
      sent = init;
      return new Response(JSON.stringify({ id_token: "x.y.z", expires_in: 3600 }), { status: 200 });
    }) as unknown as typeof fetch;
    expect((await postToken(req, fake)).id_token).toBe("x.y.z");
    const headers = sent?.headers as Record<string, string> | undefined;
    expect(headers?.["Content-Type"]).toBe("application/x-www-form-urlencoded");
    const refused = (async () => new Response("{}", { status: 400 })) as unknown as typeof fetch;
    await expect(postToken(req, refused)).rejects.toThrow(/400/);
  });

  it("renews a tenth of the token's life before it ends, within 30 s to 5 min", () => {
    // An hour-long token: 5 minutes before the end.
    expect(refreshDelay(0, 3600, 0)).toBe(3300_000);
    // Five minutes: 30 s before.
    expect(refreshDelay(0, 300, 0)).toBe(270_000);
    // Ten hours: at most 5 minutes before.
    expect(refreshDelay(0, 36000, 0)).toBe(36000_000 - 300_000);
    // Already past the margin: now.
    expect(refreshDelay(0, 3600, 3500_000)).toBe(0);
  });
});
