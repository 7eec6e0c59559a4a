import { useState } from "preact/hooks";
import type { AppConfig } from "../api";
import { cognitoSignIn, devSignIn } from "../auth";
import { useHeading } from "../nav";

export function SignInPage(props: { config: AppConfig; reason: string }) {
  const auth = props.config.auth;
  // mira dev's own defaults (those of `mira dev token`), from the gateway: the app holds no
  // identity of its own.
  const dev = auth.mode === "dev" ? auth : { user: "", tenant: "", role: "pathologist" };
  const [user, setUser] = useState(dev.user);
  const [tenant, setTenant] = useState(dev.tenant);
  const [role, setRole] = useState(dev.role);
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const heading = useHeading("Sign in");
  return (
    <main class="page signin">
      <h1 ref={heading} tabIndex={-1}>
        Sign in to Mira
      </h1>
      {props.reason && <p class="notice">{props.reason}</p>}
      {auth.mode === "dev" && (
        <form
          onSubmit={async (e) => {
            e.preventDefault();
            setBusy(true);
            setError("");
            try {
              await devSignIn(user.trim(), tenant.trim(), [role]);
            } catch (err) {
              setError(String((err as Error).message));
            } finally {
              setBusy(false);
            }
          }}
        >
          <p>This is mira dev: sign in as anyone, in any tenant, with any role.</p>
          <label>
            User name
            <input
              name="user"
              value={user}
              required
              maxLength={128}
              onInput={(e) => setUser(e.currentTarget.value)}
            />
          </label>
          <label>
            Tenant
            <input name="tenant" value={tenant} required onInput={(e) => setTenant(e.currentTarget.value)} />
          </label>
          <label>
            Role
            <select name="role" value={role} onChange={(e) => setRole(e.currentTarget.value)}>
              <option value="pathologist">pathologist</option>
              <option value="auditor">auditor</option>
              <option value="admin">admin</option>
            </select>
          </label>
          <button type="submit" disabled={busy}>
            Sign in
          </button>
        </form>
      )}
      {auth.mode === "cognito" && (
        <button type="button" onClick={() => cognitoSignIn(auth).catch((e) => setError(String(e.message)))}>
          Sign in with your lab account
        </button>
      )}
      {auth.mode === "none" && <p role="alert">This gateway has no sign-in configured.</p>}
      {error && (
        <p role="alert" class="error">
          {error}
        </p>
      )}
    </main>
  );
}
