// End to end: the browser app in Debian's Chromium (playwright-core, no browser download)
// against a real `mira dev` on a free port with a fresh data directory: the worker, the
// projector, the WebSocket and the log all run. Run by `npm run e2e` (scripts/test does).
//
// Needs: MIRA_BIN (the `mira` binary, `mira-worker` beside it), MIRA_TESTDATA (the directory
// with CMU-1-Small-Region.svs), /usr/bin/chromium, and a built app in web/dist.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
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
const slidePath = join(
  process.env.MIRA_TESTDATA ?? join(process.env.HOME ?? "", ".cache/mira-testdata"),
  "CMU-1-Small-Region.svs",
);
const shots = resolve(process.env.MIRA_SCREENSHOTS ?? join(web, "test-results/screenshots"));
const chromiumPath = process.env.MIRA_CHROMIUM ?? "/usr/bin/chromium";

const freePort = () =>
  new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });

/** Polls `f` until it returns a truthy value, or fails after `ms` with `what`. */
async function until(what, f, ms = 60_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

let dev;
let devLog = "";
let base;
let browser;
const work = mkdtempSync(join(tmpdir(), "mira-e2e-"));

before(async () => {
  mkdirSync(shots, { recursive: true });
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  const env = {
    ...process.env,
    Web__Dir: join(web, "dist"),
    XDG_RUNTIME_DIR: join(work, "run"),
    Worker__BandPauseMillis: "250",
    // The job runs for 10 to 30 s: it renews a 6 s lease every 2 s, so its timeline has renewals.
    Worker__LeaseSeconds: "6",
    // Pathologists may submit STAT jobs and admins may not (the default, said here because a
    // test below relies on it).
    Jobs__StatGroups: "pathologist",
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
});

/** Decodes a PNG in the page and counts its distinct colours (a blank image has one). */
async function colours(page, png) {
  return page.evaluate(async (b64) => {
    // The page's CSP allows data: images, not data: fetches.
    const bmp = new Image();
    bmp.src = `data:image/png;base64,${b64}`;
    await bmp.decode();
    const c = new OffscreenCanvas(bmp.width, bmp.height);
    const g = c.getContext("2d");
    g.drawImage(bmp, 0, 0);
    const px = g.getImageData(0, 0, bmp.width, bmp.height).data;
    const seen = new Set();
    for (let i = 0; i < px.length; i += 4 * 7) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
    return seen.size;
  }, png.toString("base64"));
}

async function shot(page, name, locator) {
  const png = await (locator ?? page).screenshot({ path: join(shots, `${name}.png`) });
  assert.ok((await colours(page, png)) > 8, `${name}.png is blank`);
  return png;
}

async function axe(page, where) {
  const r = await new AxeBuilder({ page }).analyze();
  const bad = r.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  assert.deepEqual(
    bad.map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(" ")).join("; ")})`),
    [],
    `axe on ${where}`,
  );
}

/** A new browser context whose WebSockets pass through the test, which can close them. */
async function context(viewport = { width: 1280, height: 800 }) {
  const ctx = await browser.newContext({ viewport });
  const sockets = [];
  await ctx.routeWebSocket(/\/ws(\?|$)/, (ws) => {
    ws.connectToServer();
    sockets.push(ws);
  });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  return { ctx, page, sockets };
}

async function signIn(page, user, tenant, role) {
  await page.goto(`${base}/`);
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Tenant").fill(tenant);
  await page.getByLabel("Role").selectOption(role);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Slides" }).waitFor();
}

const state = {};

describe("the browser app", { concurrency: false }, () => {
  it("signs a pathologist in and uploads a slide with a progress bar to 100 %", async () => {
    const { page, sockets } = await context();
    state.a = page;
    state.aSockets = sockets;
    await page.goto(`${base}/`);
    await axe(page, "the sign-in page");
    await signIn(page, "ada", "lab-a", "pathologist");
    await page.evaluate(() => {
      window.__loaded = "once";
    });
    await page.locator('input[type="file"]').setInputFiles(slidePath);
    const bar = page.getByRole("progressbar", { name: /Upload of CMU-1-Small-Region.svs/ });
    await until(
      "the upload to finish",
      async () => (await page.getByText("Uploaded CMU-1-Small-Region.svs").count()) > 0,
    );
    assert.equal(await bar.getAttribute("data-percent"), "100");
    const row = page.locator("tr", { hasText: "CMU-1-Small-Region.svs" });
    await until(
      "the slide to be verified",
      async () => (await row.locator(".badge").textContent()) === "verified",
    );
    state.slideRow = row;
    await axe(page, "the slide list");
    await shot(page, "slide-list");
  });

  it("submits a Macenko job and watches it run to success in the list, with no reload", async () => {
    const page = state.a;
    // Every status each job row shows, in order, recorded in the page.
    await page.evaluate(() => {
      window.__statuses = {};
      const note = (el) => {
        const id = el.getAttribute("data-job");
        const s = el.getAttribute("data-status");
        window.__statuses[id] = window.__statuses[id] ?? [];
        const seen = window.__statuses[id];
        if (seen[seen.length - 1] !== s) seen.push(s);
      };
      new MutationObserver(() => {
        for (const el of document.querySelectorAll("tr[data-job]")) note(el);
      }).observe(document.body, {
        subtree: true,
        childList: true,
        attributes: true,
        attributeFilter: ["data-status"],
      });
    });
    await state.slideRow.getByRole("button", { name: "Process" }).click();
    assert.equal(await page.getByRole("radio", { name: "Routine" }).isChecked(), true, "routine by default");
    await page.getByLabel("Stain normalisation").selectOption("macenko");
    await page.getByLabel("Tile size (pixels)").fill("5000");
    await page.getByRole("button", { name: "Submit job" }).click();
    await page.getByText("16 to 4096 pixels").waitFor();
    await page.getByLabel("Tile size (pixels)").fill("254");
    await page.getByRole("button", { name: "Submit job" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    const row = page.locator("tr[data-job]").first();
    state.jobId = await row.getAttribute("data-job");
    // While it runs, the socket drops: the page says so, resumes, and misses nothing.
    await until("the job to run", async () => (await row.getAttribute("data-status")) === "running");
    await axe(page, "the job list");
    state.aSockets[state.aSockets.length - 1].close();
    await page.getByText("Reconnecting…").waitFor({ timeout: 10_000 });
    await page.getByText("Live", { exact: true }).waitFor({ timeout: 20_000 });
    await until(
      "the job to succeed",
      async () => (await row.getAttribute("data-status")) === "succeeded",
      180_000,
    );
    const seen = await page.evaluate((id) => window.__statuses[id], state.jobId);
    const order = ["submitted", "queued", "running", "succeeded"];
    assert.deepEqual(
      seen.filter((s) => order.includes(s)),
      order.filter((s) => seen.includes(s)),
      `statuses in order: ${seen}`,
    );
    assert.ok(seen.includes("running") && seen.at(-1) === "succeeded", `seen: ${seen}`);
    assert.equal(await page.evaluate(() => window.__loaded), "once", "the page did not reload");
  });

  it("submits a STAT job, which the list and its page mark STAT and the routine job not", async () => {
    const page = state.a;
    await page.getByRole("link", { name: "Slides" }).click();
    await page.getByRole("heading", { name: "Slides" }).waitFor();
    await state.slideRow.getByRole("button", { name: "Process" }).click();
    await page.getByRole("radio", { name: /^STAT/ }).check();
    await page.getByRole("button", { name: "Submit job" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    const rows = page.locator("tr[data-job]");
    await until("both jobs in the list", async () => (await rows.count()) === 2);
    const stat = page.locator(`tr[data-job]:not([data-job="${state.jobId}"])`);
    const routine = page.locator(`tr[data-job="${state.jobId}"]`);
    state.statJobId = await stat.getAttribute("data-job");
    assert.equal(await stat.getAttribute("data-priority"), "stat");
    assert.equal(await stat.locator(".badge-stat").textContent(), "STAT");
    assert.equal(await routine.getAttribute("data-priority"), "routine");
    assert.equal(await routine.locator(".badge-stat").count(), 0, "a routine job has no STAT badge");
    assert.ok(!(await routine.locator("td").first().textContent()).includes("STAT"));
    await axe(page, "the job list with a STAT job");
    // It goes through the queue and the worker like any other job.
    await until(
      "the STAT job to succeed",
      async () => (await stat.getAttribute("data-status")) === "succeeded",
      180_000,
    );
    // By its address: two jobs made within a minute share their ids' first eight characters.
    await page.locator(`a[href="/jobs/${state.statJobId}"]`).click();
    await page.getByRole("heading", { name: `Job ${state.statJobId.slice(0, 8)}` }).waitFor();
    assert.equal(await page.locator('dd [data-priority="stat"]').textContent(), "STAT");
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
  });

  it("tells an admin, who may not submit STAT jobs here, why, in the server's words", async () => {
    const { page, ctx } = await context();
    await signIn(page, "root", "lab-a", "admin");
    const row = page.locator("tr", { hasText: "CMU-1-Small-Region.svs" });
    await row.getByRole("button", { name: "Process" }).click();
    await page.getByRole("radio", { name: /^STAT/ }).check();
    await page.getByRole("button", { name: "Submit job" }).click();
    const refusal = page.locator("#err-priority");
    await refusal.waitFor();
    assert.match(
      await refusal.textContent(),
      /STAT jobs may be submitted by pathologist \(Jobs__StatGroups\)/,
    );
    assert.equal(await page.getByRole("form", { name: /^Process/ }).count(), 1, "still on the form");
    await axe(page, "the job form with a refused priority");
    await page.getByRole("radio", { name: "Routine" }).check();
    assert.equal(await refusal.count(), 0, "choosing Routine clears the refusal");
    await ctx.close();
  });

  it("shows the job's timeline with hashes and the log's verified badge", async () => {
    const page = state.a;
    await page.locator(`a[href="/jobs/${state.jobId}"]`).click();
    await page.getByRole("heading", { name: `Job ${state.jobId.slice(0, 8)}` }).waitFor();
    assert.equal(await page.locator('dd [data-priority="routine"]').textContent(), "routine");
    for (const e of ["JobSubmitted", "JobQueued", "JobStarted", "JobSucceeded"]) {
      await page.locator(`tr[data-event="${e}"]`).first().waitFor();
    }
    const hash = await page.locator('tr[data-event="JobSucceeded"] code').getAttribute("title");
    assert.match(hash, /^[0-9a-f]{64}$/);
    // A running attempt's lease renewals and progress reports are grouped by default; the
    // checkbox shows each one. A lone progress report stays a row of its own.
    const renewals = page.locator('tr[data-event="JobLeaseExtended"]');
    const reports = page.locator('tr[data-event="JobProgressed"]');
    const summaries = page.locator('tr[data-event="lease-extensions"]');
    assert.equal(await renewals.count(), 0, "no single renewal rows by default");
    await summaries.first().waitFor();
    const counts = await summaries.evaluateAll((rows) =>
      rows.map((r) => ({ leases: Number(r.dataset.count), progress: Number(r.dataset.progress) })),
    );
    const total = counts.reduce((a, c) => a + c.leases, 0);
    const hiddenReports = counts.reduce((a, c) => a + c.progress, 0);
    assert.ok(total >= 1, `renewal counts: ${JSON.stringify(counts)}`);
    const loneReports = await reports.count();
    await page.locator('[data-verified="yes"]').waitFor({ timeout: 20_000 });
    await axe(page, "the job page");
    await shot(page, "job-page");
    await page.getByLabel("Show every event").check();
    await until("each renewal to have its row", async () => (await renewals.count()) === total);
    assert.equal(await reports.count(), loneReports + hiddenReports, "each progress report has its row");
    assert.equal(await summaries.count(), 0);
    await axe(page, "the job page with its lease renewals");
  });

  it("draws the pyramid, the mask overlay and the normalised layer", async () => {
    const page = state.a;
    await page.getByRole("link", { name: "Open the viewer" }).click();
    const viewer = page.locator(".viewer");
    await until("tiles to be drawn", async () => (await viewer.getAttribute("data-drawn")) === "yes");
    await page.waitForTimeout(1500);
    const plain = await shot(page, "viewer", viewer);
    await page.getByLabel("Tissue mask").check();
    await page.waitForTimeout(800);
    const masked = await viewer.screenshot();
    assert.notDeepEqual(masked, plain, "the mask overlay changes the picture");
    await page.getByLabel("Tissue mask").uncheck();
    await page.getByLabel("Stain-normalised").check();
    await page.waitForTimeout(1500);
    const normalised = await viewer.screenshot();
    assert.notDeepEqual(normalised, plain, "the normalised layer changes the picture");
    await axe(page, "the viewer");
  });

  it("keeps tenant B out of tenant A's slides and jobs", async () => {
    const { page, ctx } = await context();
    await signIn(page, "bob", "lab-b", "pathologist");
    assert.equal(await page.getByText("CMU-1-Small-Region.svs").count(), 0);
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    assert.equal(await page.locator("tr[data-job]").count(), 0);
    await page.evaluate((id) => {
      history.pushState(null, "", `/jobs/${id}`);
      dispatchEvent(new PopStateEvent("popstate"));
    }, state.jobId);
    await page.getByText("Not found: no such job in your tenant.").waitFor();
    await ctx.close();
  });

  it("shows why a file that is no slide was rejected", async () => {
    const page = state.a;
    await page.getByRole("link", { name: "Slides" }).click();
    const fake = join(work, "notes.svs");
    writeFileSync(fake, "these are notes, not a slide\n".repeat(100));
    await page.locator('input[type="file"]').setInputFiles(fake);
    const row = page.locator("tr", { hasText: "notes.svs" });
    await until(
      "the text file to be rejected",
      async () => (await row.locator(".badge").textContent()) === "rejected",
    );
    const reason = await row.locator(".reason").textContent();
    assert.ok(reason && reason.length > 5, `reason: ${reason}`);
  });

  it("passes axe at phone size", async () => {
    const { page, ctx } = await context({ width: 390, height: 844 });
    await signIn(page, "cy", "lab-c", "auditor");
    await axe(page, "the slide list at 390×844");
    await page.getByRole("link", { name: "Audit" }).click();
    await page.getByRole("heading", { name: "Audit trail" }).waitFor();
    assert.equal(await page.getByLabel("Show every event").isChecked(), false);
    await axe(page, "the audit trail at 390×844");
    await ctx.close();
  });
});

process.on("exit", () => {
  if (process.exitCode) {
    writeFileSync(join(work, "mira-dev.log"), devLog);
    console.error(
      `mira dev's log: ${join(work, "mira-dev.log")}\n${devLog.split("\n").slice(-40).join("\n")}`,
    );
  }
});
