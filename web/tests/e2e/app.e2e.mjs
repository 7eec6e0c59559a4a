// End to end: the browser app in Debian's Chromium (playwright-core, no browser download)
// against a real `mira dev` on a free port with a fresh data directory: the worker, the
// projector, the WebSocket and the log all run. Run by `npm run e2e` (scripts/test does).
//
// Needs: MIRA_BIN (the `mira` binary, `mira-worker` beside it), MIRA_TESTDATA (the directory
// with CMU-1-Small-Region.svs), /usr/bin/chromium, a Python with `cryptography` (MIRA_PYTHON, or
// python3) for tools/verify_export.py, and a built app in web/dist.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { after, before, describe, it } from "node:test";
import AxeBuilder from "@axe-core/playwright";
import { chromium } from "playwright-core";
import { chromiumPath, startDev, until, web } from "./harness.mjs";

const slidePath = join(
  process.env.MIRA_TESTDATA ?? join(process.env.HOME ?? "", ".cache/mira-testdata"),
  "CMU-1-Small-Region.svs",
);
const shots = resolve(process.env.MIRA_SCREENSHOTS ?? join(web, "test-results/screenshots"));
const python = process.env.MIRA_PYTHON ?? "python3";
const verifier = resolve(web, "../tools/verify_export.py");
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
/** The second slide: the same scan under another name. */
const SECOND = "Second-Section.svs";

let dev;
let base;
let browser;
const work = mkdtempSync(join(tmpdir(), "mira-e2e-"));

before(async () => {
  mkdirSync(shots, { recursive: true });
  dev = await startDev(work, {
    Worker__BandPauseMillis: "250",
    // The job runs for 10 to 30 s: it renews a 6 s lease every 2 s, so its timeline has renewals.
    Worker__LeaseSeconds: "6",
    // Pathologists may submit STAT jobs and admins may not (the default, said here because a
    // test below relies on it).
    Jobs__StatGroups: "pathologist",
    // A checkpoint within seconds of the events (the default waits a minute): the badge and the
    // export have signed checkpoints to show.
    Audit__CheckpointEverySeconds: "2",
  });
  base = dev.base;
  browser = await chromium.launch({ executablePath: chromiumPath, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  await dev?.stop();
  // The data directory (its PostgreSQL cluster, blobs and keys) goes with the run; mira dev's log
  // is kept apart when a test failed (below).
  rmSync(work, { recursive: true, force: true });
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

/** The share of two same-sized PNGs' pixels (sampled) that differ visibly, decoded in the page. */
async function difference(page, a, b) {
  return page.evaluate(
    async ([x, y]) => {
      const decode = async (b64) => {
        const img = new Image();
        img.src = `data:image/png;base64,${b64}`;
        await img.decode();
        const c = new OffscreenCanvas(img.width, img.height);
        const g = c.getContext("2d");
        g.drawImage(img, 0, 0);
        return { w: img.width, h: img.height, px: g.getImageData(0, 0, img.width, img.height).data };
      };
      const [p, q] = [await decode(x), await decode(y)];
      if (p.w !== q.w || p.h !== q.h) return { error: `${p.w}×${p.h} against ${q.w}×${q.h}` };
      let [differ, n] = [0, 0];
      for (let i = 0; i < p.px.length; i += 4 * 3) {
        const d = Math.max(
          Math.abs(p.px[i] - q.px[i]),
          Math.abs(p.px[i + 1] - q.px[i + 1]),
          Math.abs(p.px[i + 2] - q.px[i + 2]),
        );
        if (d > 24) differ += 1;
        n += 1;
      }
      return { share: differ / n };
    },
    [a.toString("base64"), b.toString("base64")],
  );
}

/**
 * Saves a screenshot of the page (or of `locator`) as `name`.png and checks that it shows
 * something: it is compared with a blank render of the same size, the same frame with its
 * content hidden (`visibility: hidden` on everything inside `main`, or inside the element), which
 * keeps the layout, the backgrounds and the header. A page that drew nothing, or only its
 * background, is (almost) that blank render.
 */
async function shot(page, name, locator, options = {}) {
  const target = locator ?? page;
  const png = await target.screenshot({ path: join(shots, `${name}.png`), ...options });
  // Hidden through the CSSOM: the app's CSP refuses a <style> the test would add.
  const root = locator ?? page.locator("main");
  await root.evaluate((el) => {
    window.__blank = [...el.querySelectorAll("*")].map((e) => {
      const was = [e, e.style.getPropertyValue("visibility"), e.style.getPropertyPriority("visibility")];
      e.style.setProperty("visibility", "hidden", "important");
      return was;
    });
  });
  const blank = await target.screenshot(options);
  await page.evaluate(() => {
    for (const [e, v, p] of window.__blank)
      if (v) e.style.setProperty("visibility", v, p);
      else e.style.removeProperty("visibility");
    delete window.__blank;
  });
  const d = await difference(page, png, blank);
  assert.ok(!d.error, `${name}.png and its blank render differ in size: ${d.error}`);
  assert.ok(
    d.share > 0.01,
    `${name}.png is blank: ${(d.share * 100).toFixed(2)} % of it differs from a blank render`,
  );
  assert.ok((await colours(page, png)) > 8, `${name}.png has hardly any colours`);
  console.log(`${name}.png: ${(d.share * 100).toFixed(1)} % differs from its blank render`);
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

/** An ID token from mira dev's sign-in. */
async function tokenFor(user, tenant, role) {
  const res = await fetch(`${base}/dev/sign-in`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user, tenant, roles: [role] }),
  });
  assert.equal(res.status, 200, "sign-in");
  return (await res.json()).id_token;
}

/** Calls the API as ada of lab-a, as the test's own client, not the page's; returns the JSON. */
async function apiAsAda(path, { method = "GET", body } = {}) {
  const token = await tokenFor("ada", "lab-a", "pathologist");
  const res = await fetch(`${base}${path}`, {
    method,
    headers: {
      Authorization: `Bearer ${token}`,
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(res.ok, `${method} ${path}: ${res.status} ${await res.clone().text()}`);
  return res.json();
}

/** An id's short form, as the app shows it (its last 8 hex characters). */
const short = (id) => id.replace(/-/g, "").slice(-8);

/** Runs tools/verify_export.py on an export; its exit code and output. */
function verifyExport(file, key) {
  return new Promise((ok) =>
    execFile(python, [verifier, file, key], (e, stdout, stderr) =>
      ok({ code: e ? (e.code ?? 1) : 0, out: `${stdout}${stderr}` }),
    ),
  );
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

/** A new browser context whose WebSockets pass through the test, which can close them
 * (`sockets`), see the address each was opened with (`urls`), and hold new ones unconnected
 * (`hold`, until `release`): the page then stays offline. */
async function context(viewport = DESKTOP, options = {}) {
  const ctx = await browser.newContext({ viewport, ...options });
  const sockets = [];
  const urls = [];
  let held = null;
  await ctx.routeWebSocket(/\/ws(\?|$)/, async (ws) => {
    urls.push(ws.url());
    // Until connected, the page's socket is neither open nor closed.
    if (held) await held.promise;
    ws.connectToServer();
    sockets.push(ws);
  });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
  const hold = () => {
    let release;
    const promise = new Promise((r) => {
      release = r;
    });
    held = { promise, release };
  };
  const release = () => {
    held?.release();
    held = null;
  };
  return { ctx, page, sockets, urls, hold, release };
}

/** Checks that the page's heading has the keyboard and the tab names the page. */
async function assertLanded(page, title) {
  await until(
    `the page "${title}"`,
    () => page.evaluate((t) => document.title === `${t} · Mira`, title),
    10_000,
  );
  const focused = await page.evaluate(() => document.activeElement?.tagName);
  assert.equal(focused, "H1", `the keyboard is on ${title}'s heading`);
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

/** A job's row in the job list. */
const jobRow = (page, id) => page.locator(`tr[data-job="${id}"]`);
/** A slide's row in the slide list. */
const slideRow = (page, name) => page.locator("tr[data-slide]", { hasText: name });

/** A job's name as the app gives it: "<slide> · <what was asked> · HH:MM". */
const named = (slide, asked) => new RegExp(`^${slide.replace(/[.]/g, "\\.")} · ${asked} · \\d\\d:\\d\\d$`);

describe("the browser app", { concurrency: false }, () => {
  it("signs a pathologist in and uploads two slides with a progress bar to 100 %", async () => {
    const { page, sockets, ...rest } = await context();
    state.a = page;
    state.aSockets = sockets;
    state.aContext = rest;
    await page.goto(`${base}/`);
    await page.getByRole("heading", { name: "Sign in to Mira" }).waitFor();
    await assertLanded(page, "Sign in");
    await axe(page, "the sign-in page");
    await signIn(page, "ada", "lab-a", "pathologist");
    await assertLanded(page, "Slides");
    await page.evaluate(() => {
      window.__loaded = "once";
    });
    const second = join(work, SECOND);
    copyFileSync(slidePath, second);
    for (const [file, name] of [
      [slidePath, "CMU-1-Small-Region.svs"],
      [second, SECOND],
    ]) {
      await page.locator('input[type="file"]').setInputFiles(file);
      const bar = page.getByRole("progressbar", { name: `Upload of ${name}` });
      await until("the upload to finish", async () => (await page.getByText(`Uploaded ${name}`).count()) > 0);
      assert.equal(await bar.getAttribute("data-percent"), "100");
      const row = slideRow(page, name);
      await until(
        `${name} to be verified`,
        async () => (await row.locator(".badge").textContent()) === "verified",
      );
    }
    state.slideRow = slideRow(page, "CMU-1-Small-Region.svs");
    state.slideId = await state.slideRow.getAttribute("data-slide");
    state.secondId = await slideRow(page, SECOND).getAttribute("data-slide");
    await axe(page, "the slide list");
    await shot(page, "slide-list");
  });

  it("runs a Macenko job live, and catches up after the socket drops: two jobs on two slides, told apart by name", async () => {
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
    await axe(page, "the job form");
    await page.getByLabel("Stain normalisation").selectOption("macenko");
    await page.getByLabel("Tile size (pixels)").fill("5000");
    await page.getByRole("button", { name: "Submit job" }).click();
    await page.getByText("16 to 4096 pixels").waitFor();
    await page.getByLabel("Tile size (pixels)").fill("254");
    await page.getByRole("button", { name: "Submit job" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    await assertLanded(page, "Jobs");
    const row = page.locator("tr[data-job]").first();
    state.jobId = await row.getAttribute("data-job");
    assert.match(await row.locator("td a").first().textContent(), named("CMU-1-Small-Region.svs", "Macenko"));
    await until("the job to run", async () => (await row.getAttribute("data-status")) === "running");
    await axe(page, "the job list");

    // A job that will be cancelled while the page is offline: a cancelled job changes no more,
    // so only a catch-up can bring the page its cancellation.
    const doomed = await apiAsAda("/api/jobs", {
      method: "POST",
      body: { slide_id: state.secondId, kind: "wsi.preprocess" },
    });
    state.cancelledJob = doomed.job_id;
    const r4 = jobRow(page, doomed.job_id);
    await r4.waitFor({ timeout: 10_000 });

    // The socket drops and stays down while another client cancels that job and submits two
    // jobs, on two slides, within a second; the page learns of it all by catching up (`since=`)
    // once it is back.
    const { hold, release, urls } = state.aContext;
    const before = urls.length;
    hold();
    state.aSockets[state.aSockets.length - 1].close();
    await page.getByText("Reconnecting…").waitFor({ timeout: 10_000 });
    const [two, three] = await Promise.all(
      [state.slideId, state.secondId].map((slide_id) =>
        apiAsAda("/api/jobs", { method: "POST", body: { slide_id, kind: "wsi.preprocess" } }),
      ),
    );
    [state.job2, state.job3] = [two.job_id, three.job_id];
    await apiAsAda(`/api/jobs/${doomed.job_id}/cancel`, { method: "POST", body: { reason: "e2e" } });
    const listed = await until("the API to list the changes", async () => {
      const { items } = await apiAsAda("/api/jobs?limit=10");
      const both = items.filter((j) => j.job_id === two.job_id || j.job_id === three.job_id);
      const gone = items.find((j) => j.job_id === doomed.job_id)?.status === "cancelled";
      return both.length === 2 && gone && both;
    });
    const apart = Math.abs(Date.parse(listed[0].submitted_at) - Date.parse(listed[1].submitted_at));
    assert.ok(apart < 1000, `submitted within a second (${apart} ms)`);
    assert.equal(
      await page.locator("tr[data-job]").count(),
      2,
      "nothing reaches the page while it is offline",
    );
    assert.notEqual(await r4.getAttribute("data-status"), "cancelled");
    release();
    await page.getByText("Live", { exact: true }).waitFor({ timeout: 20_000 });
    await until(
      "the cancellation to arrive",
      async () => (await r4.getAttribute("data-status")) === "cancelled",
      10_000,
    );
    const [r2, r3] = [jobRow(page, two.job_id), jobRow(page, three.job_id)];
    await r2.waitFor({ timeout: 10_000 });
    await r3.waitFor({ timeout: 10_000 });
    assert.match(
      urls.slice(before).join(" "),
      /[?&]since=/,
      `the page resumes where it was: ${urls.slice(before)}`,
    );
    const [n2, n3] = [
      await r2.locator("td a").first().textContent(),
      await r3.locator("td a").first().textContent(),
    ];
    assert.match(n2, named("CMU-1-Small-Region.svs", "Tile pyramid"));
    assert.match(n3, named(SECOND, "Tile pyramid"));
    assert.notEqual(n2, n3, "two jobs made together have different names");
    assert.match(await r2.locator('td[data-label="Submitted"]').textContent(), /by ada/);

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
    await shot(page, "job-list");
  });

  it("submits a STAT job, which the list and its page mark STAT and the routine job not", async () => {
    const page = state.a;
    await page.getByRole("link", { name: "Slides" }).click();
    await page.getByRole("heading", { name: "Slides" }).waitFor();
    await state.slideRow.getByRole("button", { name: "Process" }).click();
    await page.getByRole("radio", { name: /^STAT/ }).check();
    await page.getByRole("button", { name: "Submit job" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    const known = [state.jobId, state.job2, state.job3, state.cancelledJob];
    const stat = page.locator(`tr[data-job]${known.map((id) => `:not([data-job="${id}"])`).join("")}`);
    await stat.waitFor();
    const routine = jobRow(page, state.jobId);
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
    await page.locator(`a[href="/jobs/${state.statJobId}"]`).click();
    await page
      .getByRole("heading", { level: 1, name: named("CMU-1-Small-Region.svs", "Tile pyramid") })
      .waitFor();
    assert.equal(await page.locator('dd [data-priority="stat"]').textContent(), "STAT");
    assert.equal(await page.locator("[data-short-id]").textContent(), short(state.statJobId));
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
  });

  it("lists each slide's jobs under it", async () => {
    const page = state.a;
    await page.getByRole("link", { name: "Slides" }).click();
    const toggle = state.slideRow.getByRole("button", { name: /^Jobs/ });
    assert.equal(await toggle.getAttribute("aria-expanded"), "false");
    await toggle.click();
    assert.equal(await toggle.getAttribute("aria-expanded"), "true");
    const list = page.locator(`[data-jobs-of="${state.slideId}"] .slide-jobs[data-loaded="yes"]`);
    await list.waitFor();
    const ids = await list.locator("li[data-job]").evaluateAll((li) => li.map((l) => l.dataset.job).sort());
    assert.deepEqual(
      ids,
      [state.jobId, state.job2, state.statJobId].sort(),
      "the jobs on this slide, no other",
    );
    assert.match(await list.locator(`li[data-job="${state.jobId}"] a`).first().textContent(), /Macenko/);
    await axe(page, "the slide list with a slide's jobs");
    await toggle.click();
    assert.equal(await list.count(), 0, "folded away again");
  });

  it("tells an admin, who may not submit STAT jobs here, why, in the server's words", async () => {
    const { page, ctx } = await context();
    await signIn(page, "root", "lab-a", "admin");
    await slideRow(page, "CMU-1-Small-Region.svs").getByRole("button", { name: "Process" }).click();
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

  it("shows the job's timeline, how much of it is under a signed checkpoint, its statistics and downloads", async () => {
    const page = state.a;
    // The relay checkpoints every 2 s here: once it has covered the job, the page says so.
    const v = await until("a checkpoint over the job's events", async () => {
      const r = await apiAsAda(`/api/jobs/${state.jobId}/verify`);
      return r.checkpointed === r.events && r.events > 0 && r;
    });
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.locator(`a[href="/jobs/${state.jobId}"]`).click();
    await page.getByRole("heading", { level: 1, name: named("CMU-1-Small-Region.svs", "Macenko") }).waitFor();
    await assertLanded(page, await page.locator("h1").textContent());
    assert.equal(await page.locator('dd [data-priority="routine"]').textContent(), "routine");
    // The id where one is needed: its last 8 characters (its first ones are its time).
    state.shownShort = await page.locator("[data-short-id]").textContent();
    assert.equal(state.shownShort, short(state.jobId));
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

    // The badge counts the events under a signed checkpoint, as the API does; it never just
    // says "verified".
    const badge = page.locator('[data-verified="yes"]');
    await badge.waitFor({ timeout: 20_000 });
    assert.equal(
      (await badge.textContent()).trim(),
      `${v.checkpointed} of ${v.events} events under a signed checkpoint`,
    );

    // The statistics, from the manifest and stats.json the test reads itself.
    const manifest = await apiAsAda(`/api/jobs/${state.jobId}/results/manifest.json`);
    const stats = await apiAsAda(`/api/jobs/${state.jobId}/results/stats.json`);
    const results = page.locator('.results[data-results="yes"]');
    await results.waitFor({ timeout: 20_000 });
    assert.equal(
      await results.locator('[data-stat="tissue"]').textContent(),
      `${(manifest.tissue.fraction * 100).toFixed(1)} % of the slide`,
    );
    const ti = stats.columns.indexOf("tissue");
    const withTissue = stats.tiles.filter((t) => t[ti] > 0).length;
    assert.ok(withTissue > 0 && withTissue < stats.tiles.length, `tiles with tissue: ${withTissue}`);
    assert.match(
      await results.locator('[data-stat="tiles-with-tissue"]').textContent(),
      new RegExp(`^${withTissue} of ${stats.tiles.length} full-resolution tiles`),
    );
    assert.match(
      await results.locator('[data-stat="pyramid"]').textContent(),
      new RegExp(
        `^${manifest.deepzoom.levels} levels, ${manifest.deepzoom.tiles.toLocaleString("en-US")} tiles`,
      ),
    );
    const [saved] = await Promise.all([
      page.waitForEvent("download"),
      page.getByRole("button", { name: "Download the statistics (stats.json)" }).click(),
    ]);
    assert.equal(saved.suggestedFilename(), `CMU-1-Small-Region-${short(state.jobId)}-stats.json`);
    const doc = JSON.parse(readFileSync(await saved.path(), "utf8"));
    assert.deepEqual(doc.columns, ["col", "row", "tissue", "mean", "std"]);
    assert.equal(doc.tiles.length, stats.tiles.length);
    await axe(page, "the job page");
    await results.scrollIntoViewIfNeeded();
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
    const manifest = await apiAsAda(`/api/jobs/${state.jobId}/results/manifest.json`);
    assert.ok(slide.metadata.mpp_x > 0 && slide.metadata.objective_power > 0, "the test slide has both");
    const viewer = page.locator(".viewer");
    await page.getByRole("heading", { name: slide.name }).waitFor();
    assert.equal(await page.title(), `${slide.name} (viewer) · Mira`);
    assert.match(await page.locator(".subtitle a").textContent(), named(slide.name, "Macenko"));
    const facts = page.locator(".slide-facts");
    const details = await facts.textContent();
    assert.ok(details.includes(`Pixel size${slide.metadata.mpp_x} µm/px`), `the details: ${details}`);
    assert.equal(
      await facts.locator('[data-fact="tissue"]').textContent(),
      `${(manifest.tissue.fraction * 100).toFixed(1)} % of the slide`,
    );
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
    // Only once the list has loaded does an empty one mean something.
    await page.locator('[data-empty="none"]').waitFor();
    assert.equal(await page.locator("tr[data-slide]").count(), 0);
    assert.equal(await page.getByText("CMU-1-Small-Region.svs").count(), 0);
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.getByRole("heading", { name: "Jobs" }).waitFor();
    await page.locator('[data-empty="none"]').waitFor();
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
    const row = slideRow(page, "notes.svs");
    await until(
      "the text file to be rejected",
      async () => (await row.locator(".badge").textContent()) === "rejected",
    );
    const reason = await row.locator(".reason").textContent();
    assert.ok(reason && reason.length > 5, `reason: ${reason}`);
  });

  it("gives an auditor filters by slide, user, event type and short id, readable pages, and an export that verifies", async () => {
    const { page, ctx } = await context();
    await signIn(page, "cy", "lab-a", "auditor");
    await page.getByRole("link", { name: "Audit" }).click();
    await page.getByRole("heading", { name: "Audit trail" }).waitFor();
    await assertLanded(page, "Audit trail");
    /** Applies the filters and waits for the page they select, whose query holds `expect`. */
    const filter = async (expect) => {
      await page.getByRole("button", { name: "Filter" }).click();
      await page.locator(`table[data-query*="${expect}"]`).waitFor();
    };
    await page.locator('table[data-query*="limit=50"]').waitFor();
    const rows = page.locator("tr[data-event]");
    // A page a person reads: 50 events at most, each payload folded away.
    await page.getByLabel("Show every event").check();
    assert.ok((await rows.count()) <= 50, `${await rows.count()} rows`);
    assert.equal(await page.locator("details.payload[open]").count(), 0, "payloads are folded");
    const payload = page.locator("details.payload").first();
    await payload.locator("summary").click();
    assert.ok(await payload.locator("pre").isVisible(), "a payload unfolds");
    await page.getByLabel("Show every event").uncheck();
    await axe(page, "the audit trail");

    // The job's short id, as the job page shows it, finds its events.
    await page.getByLabel("Job or slide id", { exact: true }).fill(state.shownShort);
    await filter(`aggregate_id=${state.shownShort}`);
    const streams = await rows.evaluateAll((r) => [...new Set(r.map((x) => x.dataset.aggregate))]);
    assert.deepEqual(streams, [state.jobId], "the job's events, no other");
    await page.locator('tr[data-event="JobSubmitted"]').waitFor();

    // An event type from the list, across jobs.
    await page.getByLabel("Job or slide id", { exact: true }).fill("");
    const types = await page.getByLabel("Event type", { exact: true }).locator("option").allTextContents();
    assert.ok(types.includes("JobSubmitted") && types.includes("SlideRegistered"), `types: ${types}`);
    await page.getByLabel("Event type", { exact: true }).selectOption("JobSubmitted");
    await filter("event_type=JobSubmitted");
    const submitted = await rows.evaluateAll((r) => r.map((x) => [x.dataset.event, x.dataset.aggregate]));
    assert.ok(
      submitted.every(([e]) => e === "JobSubmitted"),
      JSON.stringify(submitted),
    );
    for (const id of [state.jobId, state.job2, state.job3, state.statJobId])
      assert.ok(
        submitted.some(([, a]) => a === id),
        `${id} was submitted`,
      );

    // A slide by name: its events and its jobs'.
    await page.getByLabel("Event type", { exact: true }).selectOption("");
    await page.getByLabel("Slide", { exact: true }).selectOption({ label: SECOND });
    await filter(`slide=${state.secondId}`);
    await page.getByLabel("Show every event").check();
    const ofSlide = await rows.evaluateAll((r) => [...new Set(r.map((x) => x.dataset.aggregate))].sort());
    assert.deepEqual(
      ofSlide,
      [state.secondId, state.job3, state.cancelledJob].sort(),
      "the slide's and its jobs' events",
    );
    await page.getByLabel("Show every event").uncheck();

    // A user, in any case.
    await page.getByLabel("Slide", { exact: true }).selectOption("");
    await page.getByLabel("User", { exact: true }).fill("ADA");
    await filter("actor=ADA");
    const actors = await rows.evaluateAll((r) => [
      ...new Set(r.map((x) => x.querySelector('[data-label="Actor"]').textContent)),
    ]);
    assert.deepEqual(actors, ["user: ada"]);
    await page.getByLabel("User", { exact: true }).fill("");
    await filter("limit=50");

    // The export: what tools/verify_export.py checks with the public key alone, and refuses once
    // a byte of a payload is changed.
    const [saved] = await Promise.all([
      page.waitForEvent("download"),
      page.getByRole("button", { name: "Export (verifiable)" }).click(),
    ]);
    assert.equal(saved.suggestedFilename(), "mira-audit-lab-a.jsonl");
    const file = join(work, "export.jsonl");
    await saved.saveAs(file);
    const key = join(work, "data", "audit-signing.key.pub");
    const good = await verifyExport(file, key);
    assert.equal(good.code, 0, `the export verifies: ${good.out}`);
    const lines = readFileSync(file, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    const kinds = lines.map((l) => l.kind);
    assert.equal(kinds[0], "header");
    assert.equal(lines[0].tenant, "lab-a");
    assert.ok(kinds.includes("checkpoint"), `a checkpoint in the export: ${[...new Set(kinds)]}`);
    assert.match(good.out, /OK/);
    const text = readFileSync(file, "utf8").split("\n");
    const at = text.findIndex((l) => l && JSON.parse(l).kind === "event" && /\d/.test(JSON.parse(l).payload));
    assert.ok(at > 0, "an event with a digit in its payload");
    const record = JSON.parse(text[at]);
    const i = record.payload.search(/\d/);
    record.payload = `${record.payload.slice(0, i)}${(Number(record.payload[i]) + 1) % 10}${record.payload.slice(i + 1)}`;
    text[at] = JSON.stringify(record);
    const tampered = join(work, "tampered.jsonl");
    writeFileSync(tampered, text.join("\n"));
    const bad = await verifyExport(tampered, key);
    assert.equal(bad.code, 1, `a changed payload is refused: ${bad.out}`);
    assert.match(bad.out, /hash mismatch/);
    await ctx.close();
  });

  it("fits a phone: every page without sideways scrolling and axe-clean, the forms in view, touch on the viewer", async () => {
    const { page, ctx } = await context(PHONE, { hasTouch: true });
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
    const check = async (p, where) => {
      await fits(p, where);
      await axe(p, `${where} at 390×844`);
    };
    await page.goto(`${base}/`);
    await page.getByRole("heading", { name: "Sign in to Mira" }).waitFor();
    await check(page, "the sign-in page");
    await signIn(page, "ada", "lab-a", "pathologist");
    const row = slideRow(page, "CMU-1-Small-Region.svs");
    await row.waitFor();
    await check(page, "the slide list");
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
        // Layout in fractions of a pixel may leave its top a hair above the screen's.
        return b && b.y > -1 && b.y < 844 * 0.5;
      },
      5_000,
    ).catch(async (e) => {
      const b = await form.boundingBox();
      const at = await page.evaluate(() => ({
        y: scrollY,
        h: document.scrollingElement.scrollHeight,
        active: document.activeElement?.outerHTML.slice(0, 80),
      }));
      throw new Error(`${e.message}: ${JSON.stringify({ b, at })}`);
    });
    assert.equal(
      await form.evaluate((f) => f.contains(document.activeElement) && document.activeElement.name),
      "priority",
      "the keyboard is on the form's first field",
    );
    await check(page, "the slide list with the process form");
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.locator("tr[data-job]").first().waitFor();
    await check(page, "the job list");
    await page.locator(`a[href="/jobs/${state.jobId}"]`).click();
    await page.locator('.results[data-results="yes"]').waitFor();
    await page.locator('tr[data-event="JobSucceeded"]').waitFor();
    await check(page, "the job page");
    await page.getByRole("link", { name: "Open the viewer" }).click();
    const viewer = page.locator(".viewer");
    await until("tiles to be drawn", async () => (await viewer.getAttribute("data-drawn")) === "yes");
    await check(page, "the viewer");

    // One finger drags the picture, and the page stays where it is. Closer first: a slide
    // smaller than the viewer is put back in the middle once let go.
    const where = () =>
      page.evaluate(() => ({ hash: location.hash, top: document.scrollingElement.scrollTop }));
    const zOf = (h) => Number(new URLSearchParams(h.slice(1)).get("z"));
    const yOf = (h) => Number(new URLSearchParams(h.slice(1)).get("y"));
    const home = await settled("the view to rest", where);
    await page.getByRole("button", { name: "Zoom in" }).click();
    await page.getByRole("button", { name: "Zoom in" }).click();
    // The address follows the view once it rests (an animation, then 300 ms).
    await until("the address to follow the zoom", async () => zOf((await where()).hash) > zOf(home.hash) * 2);
    await viewer.scrollIntoViewIfNeeded();
    const start = await settled("the view to rest", where, 800);
    const vb = await viewer.boundingBox();
    const x = vb.x + vb.width / 2;
    const y = Math.min(vb.y + vb.height / 2, 844 - 200);
    const cdp = await ctx.newCDPSession(page);
    await cdp.send("Input.dispatchTouchEvent", { type: "touchStart", touchPoints: [{ x, y }] });
    for (let i = 1; i <= 8; i++)
      await cdp.send("Input.dispatchTouchEvent", { type: "touchMove", touchPoints: [{ x, y: y - i * 20 }] });
    await cdp.send("Input.dispatchTouchEvent", { type: "touchEnd", touchPoints: [] });
    await until(
      "the drag to move the view",
      async () => yOf((await where()).hash) > yOf(start.hash) + 20,
      5_000,
    ).catch(() => {});
    const end = await settled("the view to rest after the drag", where, 800);
    assert.equal(end.top, start.top, "the page does not scroll");
    assert.ok(
      yOf(end.hash) > yOf(start.hash) + 20,
      `the drag moves the view: ${JSON.stringify({ start, end })}`,
    );
    await ctx.close();

    const auditor = await context(PHONE);
    await signIn(auditor.page, "cy", "lab-a", "auditor");
    await auditor.page.getByRole("link", { name: "Audit" }).click();
    await auditor.page.locator("tr[data-event]").first().waitFor();
    await check(auditor.page, "the audit trail");
    assert.equal(await auditor.page.getByLabel("Show every event").isChecked(), false);
    await auditor.ctx.close();
  });
});

process.on("exit", () => {
  if (process.exitCode) {
    const log = join(web, "test-results", "mira-dev.log");
    mkdirSync(dirname(log), { recursive: true });
    writeFileSync(log, dev.log());
    console.error(`mira dev's log: ${log}\n${dev.log().split("\n").slice(-40).join("\n")}`);
  }
});
