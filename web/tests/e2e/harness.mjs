// What both end-to-end files share: a free port, polling, and a `mira dev` of their own on a
// fresh data directory.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const web = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
export const bin =
  process.env.MIRA_BIN ?? join(process.env.CARGO_TARGET_DIR ?? "/var/tmp/mira-target", "debug/mira");
export const chromiumPath = process.env.MIRA_CHROMIUM ?? "/usr/bin/chromium";

export const freePort = () =>
  new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });

/** Polls `f` until it returns a truthy value, or fails after `ms` with `what`. */
export async function until(what, f, ms = 60_000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Starts `mira dev` on a free port with its data under `work` and `settings` over the
 * environment (no DATABASE_URL: it runs its own PostgreSQL); resolves once it serves.
 * `dev.log()` is everything it printed; `dev.stop()` stops it. */
export async function startDev(work, settings) {
  const port = await freePort();
  const env = {
    ...process.env,
    Web__Dir: join(web, "dist"),
    XDG_RUNTIME_DIR: join(work, "run"),
    ...settings,
  };
  delete env.DATABASE_URL;
  mkdirSync(env.XDG_RUNTIME_DIR, { recursive: true });
  const proc = spawn(bin, ["dev", "--listen", `127.0.0.1:${port}`, "--data-dir", join(work, "data")], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  proc.stdout.on("data", (d) => (log += d));
  proc.stderr.on("data", (d) => (log += d));
  await until("mira dev to come up", () => log.includes("Ctrl-C") || proc.exitCode !== null, 120_000);
  assert.equal(proc.exitCode, null, `mira dev exited:\n${log}`);
  return {
    base: `http://127.0.0.1:${port}`,
    log: () => log,
    stop: async () => {
      if (proc.exitCode !== null) return;
      proc.kill("SIGINT");
      await until("mira dev to stop", () => proc.exitCode !== null, 60_000).catch(() => proc.kill("SIGKILL"));
    },
  };
}
