// End to end: browser sessions (ADR 0032) in Debian's Chromium against a `mira dev` of their
// own, whose idle sign-out is 12 seconds (Web__IdleSignOutSeconds): a reload and a pasted link
// stay signed in, input keeps the session, and a user left alone is warned, then signed out with
// a message, the session cookie gone; signing in again returns to the same page.
//
// Needs what app.e2e.mjs needs (MIRA_BIN, /usr/bin/chromium, a built app in web/dist).

import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import AxeBuilder from "@axe-core/playwright";
import { chromium } from "playwright-core";
import { chromiumPath, startDev, until } from "./harness.mjs";

const IDLE = 12;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let dev;
let base;
let browser;
const work = mkdtempSync(join(tmpdir(), "mira-e2e-session-"));

before(async () => {
  dev = await startDev(work, { Web__IdleSignOutSeconds: String(IDLE) });
  base = dev.base;
  browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  await dev?.stop();
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
