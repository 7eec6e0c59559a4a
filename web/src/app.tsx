// The app's shell: the session, the route, the live feed, and the page for each route. What
// the pages share with it lives apart, so that they need not import it: the route in nav.tsx,
// the feed's messages in live.ts.

import type { ComponentChildren } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { type AppConfig, AUDITORS, api, holds, setHooks } from "./api";
import {
  cognitoCallback,
  idle,
  onSession,
  reportActivity,
  resumeSession,
  returnPath,
  type Session,
  session,
  signOut,
} from "./auth";
import { type IdleState, idleMessage, watchIdle } from "./idle";
import { broadcast, type FeedState, LiveFeed, socketUrl } from "./live";
import { Link, navigate, useHeading, usePath } from "./nav";
import { AuditPage } from "./pages/audit";
import { JobPage } from "./pages/job";
import { JobsPage } from "./pages/jobs";
import { SignInPage } from "./pages/signin";
import { SlidesPage } from "./pages/slides";
import { ViewerPage } from "./pages/viewer";
import { uploading } from "./upload";

/** Why the last session ended, shown on the sign-in page; kept over a reload (it holds no
 * token), read once. */
const REASON = "mira.signout.reason";
let signedOutBecause = sessionStorage.getItem(REASON) ?? "";
sessionStorage.removeItem(REASON);

export function App() {
  const [config, setConfig] = useState<AppConfig | null>(null);
  const [configError, setConfigError] = useState("");
  const [who, setWho] = useState<Session | null>(session());
  const [feedState, setFeedState] = useState<FeedState>("connecting");
  // Under mira dev a reload asks the gateway's session for a token before showing the sign-in.
  const [resuming, setResuming] = useState(true);
  const [idleState, setIdleState] = useState<IdleState>("active");
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
    api<AppConfig>("/api/app-config").then(
      async (c) => {
        if (c.auth.mode === "dev" && !session()) await resumeSession();
        setResuming(false);
        setConfig(c);
      },
      (e) => setConfigError(String(e.message ?? e)),
    );
    return off;
  }, []);

  // Idle sign-out: the gateway's deadline, watched here, moved by the user's input.
  useEffect(() => {
    if (!who) return;
    sessionStorage.removeItem(REASON);
    if (!idle.deadline) return;
    setIdleState("active");
    const w = watchIdle({
      target: window,
      timeoutSeconds: idle.seconds,
      deadline: idle.deadline,
      report: reportActivity,
      hold: uploading,
      onState: (s) => {
        setIdleState(s);
        if (s === "out") {
          signedOutBecause = idleMessage(idle.seconds);
          sessionStorage.setItem(REASON, signedOutBecause);
          // The page stays where it was: signing in again shows it, its view included.
          signOut(config);
        }
      },
    });
    return () => w.stop();
  }, [who?.user, who?.tenant]);

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
  if (!config || resuming)
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
  else page = <NotFound path={path} />;

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
      {idleState === "warn" && (
        <IdleWarning
          seconds={Math.max(0, Math.round((idle.deadline - Date.now()) / 1000))}
          stay={() => reportActivity().catch(() => {})}
        />
      )}
      {/* A page of its own for each path: its state, and the move to its heading, start afresh. */}
      <main class="page" key={path}>
        {page}
      </main>
    </>
  );
}

/** The warning before an idle sign-out, focus on staying (any key or click also counts). */
function IdleWarning(props: { seconds: number; stay: () => void }) {
  const button = useRef<HTMLButtonElement>(null);
  useEffect(() => button.current?.focus(), []);
  return (
    <div
      class="idle-warning"
      role="alertdialog"
      aria-modal="true"
      aria-labelledby="idle-title"
      aria-describedby="idle-text"
    >
      <h2 id="idle-title">Still there?</h2>
      <p id="idle-text">
        Mira will sign you out in about {props.seconds} seconds without activity, to keep patient data safe on
        a shared workstation.
      </p>
      <button type="button" ref={button} onClick={props.stay}>
        Stay signed in
      </button>
    </div>
  );
}

function NotFound(props: { path: string }) {
  const heading = useHeading("Not found");
  return (
    <>
      <h1 ref={heading} tabIndex={-1}>
        Not found
      </h1>
      <p role="alert">There is no page at {props.path}.</p>
    </>
  );
}
