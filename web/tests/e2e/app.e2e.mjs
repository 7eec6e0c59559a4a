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

/** Measures a PNG in the page (which decodes it). `green`: the share of its pixels that are more
 * green than red or blue. `box`: where the slide lies in a screenshot of the viewer, which is black
 * around the slide: its left and right edges along the middle row and its top along the middle
 * column (lines that cross neither the navigator, top right, nor the scale, bottom left), in
 * device pixels; the slide must lie well inside the viewer. */
async function measure(page, png, what) {
  return page.evaluate(
    async ([b64, what]) => {
      const bmp = new Image();
      bmp.src = `data:image/png;base64,${b64}`;
      await bmp.decode();
      const [w, h] = [bmp.width, bmp.height];
      const c = new OffscreenCanvas(w, h);
      const g = c.getContext("2d");
      g.drawImage(bmp, 0, 0);
      const px = g.getImageData(0, 0, w, h).data;
      if (what === "green") {
        // Mixing with grey keeps each pixel's channels in their order; a green tint puts green first.
        let [green, n] = [0, 0];
        for (let i = 0; i < px.length; i += 4 * 5) {
          if (px[i + 1] > px[i] + 4 && px[i + 1] > px[i + 2] + 4) green += 1;
          n += 1;
        }
        return green / n;
      }
      const lit = (x, y) => {
        const i = (y * w + x) * 4;
        return px[i] + px[i + 1] + px[i + 2] > 60;
      };
      const [row, col] = [Math.floor(h / 2), Math.floor(w / 2)];
      // From 2 pixels in: a fractional element's screenshot may end in a column of the page.
      let [left, right, top] = [2, w - 3, 2];
      while (left < w && !lit(left, row)) left++;
      while (right >= 0 && !lit(right, row)) right--;
      while (top < h && !lit(col, top)) top++;
      return { left, right, top };
    },
    [png.toString("base64"), what],
  );
}

/** Where the slide lies in the viewer, in CSS pixels, from what is on screen. */
async function pictureBox(page, viewer) {
  const dpr = await page.evaluate(() => devicePixelRatio);
  const b = await measure(page, await viewer.screenshot(), "box");
  return { left: b.left / dpr, width: (b.right - b.left + 1) / dpr, top: b.top / dpr };
}

/** Polls `f` until it gives the same value twice running, `gap` ms apart: the view has rested. */
async function settled(what, f, gap = 400) {
  let last = JSON.stringify(await f());
  return until(what, async () => {
    await new Promise((r) => setTimeout(r, gap));
    const v = await f();
    const now = JSON.stringify(v);
    if (now === last) return v;
    last = now;
    return null;
  });
}

/** Checks the scale bar and the magnification against the slide's pixel size and objective power
 * (from the API) at image zoom `zoom` (CSS pixels per slide pixel, measured on screen). */
async function assertScale(page, zoom, slide, where) {
  const { mpp_x: mpp, objective_power: objective } = slide.metadata;
  const bar = page.locator(".scale-bar");
  assert.ok(await bar.isVisible(), `the scale bar is visible ${where}`);
  const { width } = await bar.boundingBox();
  const label = (await page.locator(".scale-label").textContent()).trim();
  const m = label.match(/^(\d+(?:\.\d+)?) (µm|mm)$/);
  assert.ok(m, `the scale's label: ${label}`);
  const um = Number(m[1]) * (m[2] === "mm" ? 1000 : 1);
  assert.ok(um < 1000 === (m[2] === "µm"), `µm below a millimetre, mm from there: ${label}`);
  const mantissa = um / 10 ** Math.floor(Math.log10(um) + 1e-9);
  assert.ok(
    [1, 2, 5].some((n) => Math.abs(mantissa - n) < 1e-6),
    `a round length: ${label}`,
  );
  // The slide pixels under the bar, times the slide's µm per pixel, are the length it is labelled.
  const spans = (width / zoom) * mpp;
  assert.ok(
    Math.abs(spans - um) / um < 0.03,
    `${where}: the bar is ${width.toFixed(1)} px at ${zoom.toFixed(4)} px per pixel, ${spans.toFixed(1)} µm, labelled ${label}`,
  );
  const mag = (await page.locator(".magnification").textContent()).trim();
  const shown = Number(mag.match(/^(\d+(?:\.\d+)?)×/)?.[1]);
  const expected = objective * zoom;
  assert.ok(Math.abs(shown - expected) <= 0.05 + 0.02 * expected, `${where}: ${mag}, expected ${expected}`);
  assert.match(mag, /objective/, "says the magnification comes from the objective power");
}

/** GET `path` from the API as ada of lab-a, as the test's own client, not the page's. */
async function apiAsAda(path) {
  const signIn = await fetch(`${base}/dev/sign-in`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user: "ada", tenant: "lab-a", roles: ["pathologist"] }),
  });
  const { id_token: token } = await signIn.json();
  const res = await fetch(`${base}${path}`, { headers: { Authorization: `Bearer ${token}` } });
  assert.equal(res.status, 200, `GET ${path}`);
  return res.json();
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
    // A green tint over the tissue, not a grey sheet: many pixels become green first.
    const [before, after] = [await measure(page, plain, "green"), await measure(page, masked, "green")];
    assert.ok(
      after > before + 0.05,
      `the mask tints: the share of green pixels goes from ${before} to ${after}`,
    );
    await page.getByLabel("Tissue mask").uncheck();
    await page.getByLabel("Stain-normalised").check();
    await page.waitForTimeout(1500);
    const normalised = await viewer.screenshot();
    assert.notDeepEqual(normalised, plain, "the normalised layer changes the picture");
    await axe(page, "the viewer");
  });

  it("shows a scale bar true to the slide's pixel size, the slide's details, and links to the view", async () => {
    const page = state.a;
    const job = await apiAsAda(`/api/jobs/${state.jobId}`);
    const slide = await apiAsAda(`/api/slides/${job.slide_id}`);
    assert.ok(slide.metadata.mpp_x > 0 && slide.metadata.objective_power > 0, "the test slide has both");
    const viewer = page.locator(".viewer");
    await page.getByRole("heading", { name: slide.name }).waitFor();
    const facts = page.locator(".slide-facts");
    const details = await facts.textContent();
    assert.ok(details.includes(`Pixel size${slide.metadata.mpp_x} µm/px`), `the details: ${details}`);
    // The details fold away from the keyboard.
    await facts.locator("summary").focus();
    await page.keyboard.press("Enter");
    assert.equal(await facts.evaluate((d) => d.open), false, "Enter folds the details");
    await page.keyboard.press("Enter");
    assert.equal(await facts.evaluate((d) => d.open), true);

    // The whole slide, then closer and moved: the zoom is the slide's width on screen over its
    // width in pixels.
    const box = () => pictureBox(page, viewer);
    const home = await settled("the whole slide to be shown", box);
    await assertScale(page, home.width / slide.metadata.width, slide, "on the whole slide");
    await page.getByLabel("Tissue mask").check();
    await page.getByRole("button", { name: "Zoom in" }).click();
    const vb = await viewer.boundingBox();
    await page.mouse.move(vb.x + vb.width / 2, vb.y + vb.height / 2);
    await page.mouse.down();
    await page.mouse.move(vb.x + vb.width / 2, vb.y + vb.height / 2 + 200, { steps: 5 });
    await page.mouse.up();
    const moved = await settled("the view to rest", box);
    const zoom = moved.width / slide.metadata.width;
    assert.ok(
      zoom > (home.width / slide.metadata.width) * 1.3,
      `zoomed in: ${JSON.stringify({ home, moved })}`,
    );
    await assertScale(page, zoom, slide, "zoomed in");
    await shot(page, "viewer-scale", page.locator(".viewer-page"));

    // The address follows the view; opened elsewhere, it shows the same place, layer and mask.
    const link = await settled("the address to follow the view", () => page.evaluate(() => location.href));
    assert.match(new URL(link).hash, /z=/, link);
    const { page: other, ctx } = await context();
    await other.goto(link);
    await other.getByLabel("User name").fill("ada");
    await other.getByLabel("Tenant").fill("lab-a");
    await other.getByLabel("Role").selectOption("pathologist");
    await other.getByRole("button", { name: "Sign in" }).click();
    await other.getByRole("heading", { name: slide.name }).waitFor();
    const otherViewer = other.locator(".viewer");
    await until("tiles to be drawn", async () => (await otherViewer.getAttribute("data-drawn")) === "yes");
    const restored = await settled("the linked view to rest", () => pictureBox(other, otherViewer));
    assert.ok(
      Math.abs(restored.width - moved.width) / moved.width < 0.02 &&
        Math.abs(restored.left - moved.left) <= 3 &&
        Math.abs(restored.top - moved.top) <= 3,
      `the link restores the view: ${JSON.stringify({ moved, restored })}`,
    );
    assert.equal(await other.getByLabel("Stain-normalised").isChecked(), true, "and the layer");
    assert.equal(await other.getByLabel("Tissue mask").isChecked(), true, "and the mask");
    await assertScale(other, restored.width / slide.metadata.width, slide, "from the link");
    await ctx.close();
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

  it("fits a phone: no page scrolls sideways, and the process form opens in view", async () => {
    const { page, ctx } = await context({ width: 390, height: 844 });
    /** Fails with the widest elements when the page is wider than the screen. */
    const fits = async (p, where) => {
      const w = await p.evaluate(() => ({
        width: document.scrollingElement.scrollWidth,
        wide: [...document.querySelectorAll("body *")]
          .filter((el) => el.getBoundingClientRect().right > innerWidth + 0.5)
          .slice(0, 4)
          .map((el) => `${el.tagName.toLowerCase()}.${el.className}`),
      }));
      assert.ok(w.width <= 390, `${where} scrolls sideways at 390 px: ${JSON.stringify(w)}`);
    };
    await signIn(page, "ada", "lab-a", "pathologist");
    const row = page.locator("tr", { hasText: "CMU-1-Small-Region.svs" });
    await row.waitFor();
    await fits(page, "the slide list");
    await shot(page, "phone-slides");
    // A search that matches nothing says so, not that there are no slides.
    const search = page.getByLabel("Search by name");
    await search.fill("no such slide");
    await page.getByText("No slide's name contains “no such slide”.").waitFor();
    assert.equal(await page.getByText("No slides yet.").count(), 0);
    await search.fill("");
    await row.getByRole("button", { name: "Process" }).click();
    const form = page.getByRole("form", { name: /^Process/ });
    await until(
      "the process form in view",
      async () => {
        const b = await form.boundingBox();
        return b && b.y >= 0 && b.y < 844 * 0.5;
      },
      5_000,
    );
    assert.equal(
      await form.evaluate((f) => f.contains(document.activeElement) && document.activeElement.name),
      "priority",
      "the keyboard is on the form's first field",
    );
    await fits(page, "the slide list with the process form");
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.locator("tr[data-job]").first().waitFor();
    await fits(page, "the job list");
    await ctx.close();
    const auditor = await context({ width: 390, height: 844 });
    await signIn(auditor.page, "cy", "lab-a", "auditor");
    await auditor.page.getByRole("link", { name: "Audit" }).click();
    await auditor.page.locator("tr[data-event]").first().waitFor();
    await fits(auditor.page, "the audit trail");
    await auditor.ctx.close();
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
