// End to end: browser sessions (ADR 0032) in Debian's Chromium against a `mira dev` of their
// own, whose idle sign-out is 12 seconds (Web__IdleSignOutSeconds): a reload and a pasted link
// stay signed in, input keeps the session, and a user left alone is warned, then signed out with
// a message, the session cookie gone; signing in again returns to the same page.
//
// Needs what app.e2e.mjs needs (MIRA_BIN, /usr/bin/chromium, a built app in web/dist).

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import AxeBuilder from "@axe-core/playwright";
import { chromium } from "playwright-core";

const web = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const bin =
  process.env.MIRA_BIN ?? join(process.env.CARGO_TARGET_DIR ?? "/var/tmp/mira-target", "debug/mira");
const chromiumPath = process.env.MIRA_CHROMIUM ?? "/usr/bin/chromium";
const IDLE = 12;

const freePort = () =>
  new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });

async function until(what, f, ms = 60_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let dev;
let devLog = "";
let base;
let browser;
const work = mkdtempSync(join(tmpdir(), "mira-e2e-session-"));

before(async () => {
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  const env = {
    ...process.env,
    Web__Dir: join(web, "dist"),
    Web__IdleSignOutSeconds: String(IDLE),
    XDG_RUNTIME_DIR: join(work, "run"),
  };
  delete env.DATABASE_URL;
  mkdirSync(env.XDG_RUNTIME_DIR, { recursive: true });
  dev = spawn(bin, ["dev", "--listen", `127.0.0.1:${port}`, "--data-dir", join(work, "data")], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  dev.stdout.on("data", (d) => (devLog += d));
  dev.stderr.on("data", (d) => (devLog += d));
  await until("mira dev to come up", () => devLog.includes("Ctrl-C") || dev.exitCode !== null, 120_000);
  assert.equal(dev.exitCode, null, `mira dev exited:\n${devLog}`);
  browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  if (dev && dev.exitCode === null) {
    dev.kill("SIGINT");
    await until("mira dev to stop", () => dev.exitCode !== null, 60_000).catch(() => dev.kill("SIGKILL"));
  }
  rmSync(work, { recursive: true, force: true });
});

const signInForm = (page) => page.getByRole("button", { name: "Sign in" });

async function signIn(page, user, tenant) {
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Tenant").fill(tenant);
  await page.getByLabel("Role").selectOption("pathologist");
  await signInForm(page).click();
}

async function sessionCookie(ctx) {
  // The cookie is scoped to /api/session: a URL there, not the origin, lists it.
  return (await ctx.cookies(`${base}/api/session/refresh`)).find((c) => c.name === "mira-dev-session");
}

describe("browser sessions", { concurrency: false }, () => {
  it("survive a reload and a pasted link, not a fresh browser; the form starts from mira dev's defaults", async () => {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await ctx.newPage();
    await page.goto(`${base}/jobs`);
    // The identity the form offers is mira dev token's own, from the gateway, not one of the app's.
    await signInForm(page).waitFor();
    assert.equal(await page.getByLabel("User name").inputValue(), "dev-user");
    assert.equal(await page.getByLabel("Tenant").inputValue(), "dev");
    await signIn(page, "ada", "lab-a");
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    const cookie = await sessionCookie(ctx);
    assert.ok(cookie, "the sign-in set the session cookie");
    assert.equal(cookie.httpOnly, true);
    assert.equal(cookie.sameSite, "Strict");
    assert.equal(await page.evaluate(() => document.cookie), "", "script reads no cookie");

    await page.reload();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    assert.equal(await signInForm(page).count(), 0, "a reload stays signed in");
    assert.match(await page.locator(".who").innerText(), /ada · lab-a/);

    // A pasted link in a second tab of the same browser.
    const tab = await ctx.newPage();
    await tab.goto(`${base}/audit`);
    await tab.locator("main h1").first().waitFor();
    assert.equal(await signInForm(tab).count(), 0, "a second tab is signed in");
    await tab.close();

    // Another browser has no session.
    const other = await browser.newContext();
    const stranger = await other.newPage();
    await stranger.goto(`${base}/jobs`);
    await signInForm(stranger).waitFor();
    await other.close();

    // Signing out ends the gateway's session: a reload asks to sign in.
    await page.getByRole("button", { name: "Sign out" }).click();
    await signInForm(page).waitFor();
    await until("the cookie to be cleared", async () => !(await sessionCookie(ctx)), 5_000);
    await page.reload();
    await signInForm(page).waitFor();
    await ctx.close();
  });

  it("stay while the user works, warn, then sign out when idle and return to the same page", async () => {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await ctx.newPage();
    await page.goto(`${base}/jobs?status=failed`);
    await signIn(page, "ada", "lab-a");
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    assert.ok(await sessionCookie(ctx), "signed in with a session cookie");
    // Input every 2 s for 16 s (more than the 12 s timeout): still signed in, never warned.
    for (let i = 0; i < 8; i++) {
      await sleep(2000);
      await page.keyboard.press("Shift");
      assert.equal(
        await page.getByRole("alertdialog").count(),
        0,
        `warned at ${(i + 1) * 2} s despite input`,
      );
    }
    assert.equal(await signInForm(page).count(), 0);
    // Then left alone (the mouse moving is no activity): warned, then signed out.
    const warning = page.getByRole("alertdialog");
    await page.mouse.move(200, 200);
    await warning.waitFor({ timeout: IDLE * 1000 });
    assert.match(await warning.innerText(), /sign you out/);
    assert.equal(
      await page.evaluate(() => document.activeElement?.textContent),
      "Stay signed in",
      "focus on staying",
    );
    const r = await new AxeBuilder({ page }).include(".idle-warning").analyze();
    const bad = r.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
    assert.deepEqual(
      bad.map((v) => v.id),
      [],
      "axe on the warning",
    );
    await signInForm(page).waitFor({ timeout: IDLE * 1000 });
    assert.match(
      await page.locator(".notice").innerText(),
      /signed out after 12 seconds without activity\. Sign in to return to where you were\./,
    );
    await until("the cookie to be cleared", async () => !(await sessionCookie(ctx)), 5_000);
    // The gateway refuses the old session too (its deadline passed), whatever the page does.
    const refused = await page.evaluate(async () => {
      const res = await fetch("/api/session/refresh", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: "{}",
      });
      return res.status;
    });
    assert.equal(refused, 401);
    // Signing in again returns to where the user was.
    await signIn(page, "ada", "lab-a");
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    assert.equal(new URL(page.url()).pathname + new URL(page.url()).search, "/jobs?status=failed");
    await ctx.close();
  });
});
