// The app's shell: the session, the route, the live feed, and the page for each route. What
// the pages share with it lives apart, so that they need not import it: the route in nav.tsx,
// the feed's messages in live.ts.

import type { ComponentChildren } from "preact";
import { useEffect, useMemo, useState } from "preact/hooks";
import { type AppConfig, AUDITORS, api, holds, setHooks } from "./api";
import { cognitoCallback, onSession, returnPath, type Session, session, signOut } from "./auth";
import { broadcast, type FeedState, LiveFeed, socketUrl } from "./live";
import { Link, navigate, usePath } from "./nav";
import { AuditPage } from "./pages/audit";
import { JobPage } from "./pages/job";
import { JobsPage } from "./pages/jobs";
import { SignInPage } from "./pages/signin";
import { SlidesPage } from "./pages/slides";
import { ViewerPage } from "./pages/viewer";

/** Why the last session ended, shown on the sign-in page. */
let signedOutBecause = "";

export function App() {
  const [config, setConfig] = useState<AppConfig | null>(null);
  const [configError, setConfigError] = useState("");
  const [who, setWho] = useState<Session | null>(session());
  const [feedState, setFeedState] = useState<FeedState>("connecting");
  const path = usePath();

  useEffect(() => {
    setHooks({
      token: () => session()?.token ?? null,
      unauthorized: (why) => {
        signedOutBecause = `You were signed out: ${why}.`;
        signOut(null);
      },
    });
    const off = onSession(setWho);
    api<AppConfig>("/api/app-config").then(setConfig, (e) => setConfigError(String(e.message ?? e)));
    return off;
  }, []);

  // Back from the Hosted UI.
  useEffect(() => {
    if (config?.auth.mode === "cognito" && location.pathname === "/signed-in") {
      cognitoCallback(config.auth, new URLSearchParams(location.search)).then(
        () => navigate(returnPath()),
        (e) => {
          // Signed out, on the sign-in page, which says why; at the same address, to try again.
          signedOutBecause = String(e.message ?? e);
          navigate(returnPath());
        },
      );
    }
  }, [config]);

  const feed = useMemo(() => {
    if (!who || !config) return null;
    return new LiveFeed({
      url: socketUrl(location, config.ws_url ?? null),
      token: () => session()?.token ?? null,
      onMessage: broadcast,
      onState: setFeedState,
    });
  }, [who?.user, who?.tenant, config]);

  useEffect(() => {
    if (!feed) return;
    feed.start();
    return () => feed.stop();
  }, [feed]);

  if (configError)
    return (
      <main class="page">
        <p role="alert">Mira cannot be reached: {configError}</p>
      </main>
    );
  if (!config)
    return (
      <main class="page">
        <p>Loading…</p>
      </main>
    );
  if (!who) return <SignInPage config={config} reason={signedOutBecause} />;

  let page: ComponentChildren;
  const view = path.match(/^\/jobs\/([0-9a-f-]{36})\/view$/);
  const job = path.match(/^\/jobs\/([0-9a-f-]{36})$/);
  if (view) page = <ViewerPage id={view[1]} />;
  else if (job) page = <JobPage id={job[1]} who={who} />;
  else if (path === "/jobs") page = <JobsPage who={who} />;
  else if (path === "/audit") page = <AuditPage who={who} />;
  else if (path === "/" || path === "/signed-in") page = <SlidesPage who={who} />;
  else page = <p role="alert">Not found: there is no page at {path}.</p>;

  return (
    <>
      <header class="bar">
        <strong class="brand">Mira</strong>
        <nav aria-label="Main">
          <Link href="/">Slides</Link>
          <Link href="/jobs">Jobs</Link>
          {holds(who, AUDITORS) && <Link href="/audit">Audit</Link>}
        </nav>
        <span class={`live live-${feedState}`} role="status" aria-live="polite">
          {feedState === "live"
            ? "Live"
            : feedState === "reconnecting"
              ? "Reconnecting…"
              : feedState === "connecting"
                ? "Connecting…"
                : "Offline"}
        </span>
        <span class="who">
          {who.user} · {who.tenant} · {who.roles.join(", ") || "no role"}
        </span>
        <button
          type="button"
          onClick={() => {
            signedOutBecause = "";
            signOut(config);
          }}
        >
          Sign out
        </button>
      </header>
      <main class="page">{page}</main>
    </>
  );
}
