//! `mira dev` (DESIGN §9): the whole platform on embedded defaults, for one developer on one
//! machine. A private PostgreSQL cluster under the data directory (unless `DATABASE_URL` is
//! set), the migrations, the in-memory bus, the local blob store, a local identity provider
//! whose JWKS the gateway fetches over HTTP exactly as it fetches Cognito's, and the relay,
//! projector and handlers in the gateway's process.

use std::io::Write;
use std::net::TcpListener as StdListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The login role the processes of `mira dev`'s private cluster connect as.
pub const APP_ROLE: &str = "mira_service";

/// The identity key's file in a data directory.
const IDENTITY_KEY: &str = "identity-rsa.pem";

/// The local identity provider's issuer and app client id. Fixed, so tokens outlive restarts.
pub const ISSUER: &str = "urn:mira:dev";
pub const AUDIENCE: &str = "mira-dev";
use crate::api::DEV_JWKS_PATH;

// ---------------------------------------------------------------------------------------------
// The local identity provider

/// An RSA signing key in the data directory, created on first use, and its JWKS.
pub struct DevIdp {
    key: EncodingKey,
    kid: String,
    jwks: serde_json::Value,
}

impl std::fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdp").field("kid", &self.kid).finish()
    }
}

impl DevIdp {
    /// The identity key of `data_dir`, created on `mira dev`'s first start there.
    pub fn open_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        Self::load(data_dir, true)
    }

    /// The identity key of `data_dir`; never creates one (`mira dev token`).
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        Self::load(data_dir, false)
    }

    fn load(data_dir: &Path, create: bool) -> anyhow::Result<Self> {
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        let path = data_dir.join(IDENTITY_KEY);
        let pem = match std::fs::read_to_string(&path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
                let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                    .map_err(|_| anyhow::anyhow!("cannot generate the local identity key"))?;
                let der: Pkcs8V1Der = kp
                    .as_der()
                    .map_err(|_| anyhow::anyhow!("cannot encode the local identity key"))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
                let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
                for line in b64.as_bytes().chunks(64) {
                    pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                    pem.push('\n');
                }
                pem.push_str("-----END PRIVATE KEY-----\n");
                write_private(&path, pem.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
                pem
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let key = EncodingKey::from_rsa_pem(pem.as_bytes())
            .with_context(|| format!("{} is not an RSA key", path.display()))?;
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256)?;
        let public = serde_json::to_value(&jwk)?;
        let kid = {
            use sha2::Digest;
            let n = public["n"].as_str().unwrap_or_default();
            hex::encode(&sha2::Sha256::digest(n.as_bytes())[..8])
        };
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        Ok(Self {
            key,
            kid,
            jwks: json!({ "keys": [jwk] }),
        })
    }

    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// An ID token shaped like Cognito's, valid for `ttl`.
    pub fn token(&self, sub: &str, tenant: &str, groups: &[String], ttl: Duration) -> anyhow::Result<String> {
        mira_events::TenantId::parse(tenant).context("--tenant")?;
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "token_use": "id",
            "custom:tenant": tenant, "cognito:groups": groups, "cognito:username": sub,
            "iat": now, "auth_time": now, "exp": now + ttl.as_secs() as i64,
        });
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&h, &claims, &self.key)?)
    }
}

impl crate::api::DevIdentity for DevIdp {
    fn jwks(&self) -> &serde_json::Value {
        DevIdp::jwks(self)
    }

    fn token(&self, sub: &str, tenant: &str, groups: &[String], ttl: Duration) -> anyhow::Result<String> {
        DevIdp::token(self, sub, tenant, groups, ttl)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(bytes)
}

// ---------------------------------------------------------------------------------------------
// The private PostgreSQL cluster

/// A PostgreSQL cluster owned by `mira dev`, stopped when dropped.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// (uid, gid) of `postgres` when running as root: initdb refuses root.
    run_as: Option<(u32, u32)>,
    started: bool,
}

/// The highest `/usr/lib/postgresql/<N>/bin` with N ≥ 15.
pub fn find_postgres() -> anyhow::Result<(u32, PathBuf)> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        for e in rd.flatten() {
            let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let bin = e.path().join("bin");
            if v >= 15 && bin.join("initdb").exists() && bin.join("pg_ctl").exists() {
                found.push((v, bin));
            }
        }
    }
    found.sort();
    found.pop().context(
        "no PostgreSQL 15 or newer under /usr/lib/postgresql (install Debian's postgresql package, or set DATABASE_URL)",
    )
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `postgres`'s uid and gid, from /etc/passwd.
fn postgres_user() -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok((f[2].parse()?, f[3].parse()?));
        }
    }
    bail!("running as root, and there is no `postgres` user to run PostgreSQL as (initdb refuses root)")
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c.env("LC_ALL", "C").stdin(Stdio::null());
        c
    }

    /// Can the cluster's user create and use `dir`?
    fn reachable(run_as: Option<(u32, u32)>, dir: &Path) -> bool {
        let Some((uid, gid)) = run_as else { return true };
        use std::os::unix::process::CommandExt;
        Command::new("/bin/sh")
            .arg("-c")
            .arg("test -d \"$0\" && test -w \"$0\" && test -x \"$0\"")
            .arg(dir)
            .uid(uid)
            .gid(gid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Finds or creates the cluster for `data_dir` (initdb on first use).
    pub fn prepare(data_dir: &Path) -> anyhow::Result<Self> {
        let (_, bin) = find_postgres()?;
        let run_as = if is_root() { Some(postgres_user()?) } else { None };
        let mut dir = data_dir.join("postgres");
        let pointer = data_dir.join("postgres.location");
        if let Ok(p) = std::fs::read_to_string(&pointer) {
            dir = PathBuf::from(p.trim());
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
            if !Self::reachable(run_as, &dir) {
                // The postgres user cannot reach the data directory (say, under /root): keep
                // the cluster where it can, and remember where.
                let _ = std::fs::remove_dir(&dir);
                let tag = {
                    use sha2::Digest;
                    let abs = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
                    hex::encode(&sha2::Sha256::digest(abs.to_string_lossy().as_bytes())[..6])
                };
                dir = PathBuf::from(format!("/var/tmp/mira-dev-{tag}/postgres"));
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                for d in [dir.parent().unwrap_or(&dir), dir.as_path()] {
                    std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
                }
                if !Self::reachable(run_as, &dir) {
                    bail!("the postgres user cannot use {} either", dir.display());
                }
                std::fs::write(&pointer, dir.to_string_lossy().as_bytes())?;
            }
        }
        let mut cluster = Self {
            dir,
            bin,
            port: 0,
            run_as,
            started: false,
        };
        if !cluster.dir.join("PG_VERSION").exists() {
            let out = cluster
                .command("initdb")
                .args(["-D"])
                .arg(&cluster.dir)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ])
                .output()
                .context("cannot run initdb")?;
            if !out.status.success() {
                bail!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        cluster.port = 0;
        Ok(cluster)
    }

    /// Removes a `postmaster.pid` left by a server that is gone.
    fn recover_stale_pid(&mut self) -> anyhow::Result<()> {
        let pid_file = self.dir.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            return Ok(());
        };
        let pid = text.lines().next().unwrap_or("").trim().to_owned();
        let alive = process_alive(&pid, &["postgres", "postmaster"]);
        if alive {
            // No other `mira dev` holds this data directory (see `claim_data_dir`): this
            // server outlived a `mira dev` that was killed. Stop it and start afresh.
            tracing::warn!(pid, "stopping a PostgreSQL left running by an earlier mira dev");
            self.started = true;
            self.stop();
            if self.started {
                bail!("PostgreSQL (pid {pid}) on {} would not stop", self.dir.display());
            }
            return Ok(());
        }
        tracing::warn!(pid, "removing a stale postmaster.pid");
        std::fs::remove_file(&pid_file)?;
        Ok(())
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        self.recover_stale_pid()?;
        self.port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = self.dir.join("server.log");
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=on",
                self.port
            ))
            .args(["-w", "-t", "60", "start"])
            .output()
            .context("cannot run pg_ctl")?;
        if !out.status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last: Vec<&str> = tail.lines().rev().take(3).collect();
            bail!(
                "PostgreSQL did not start ({}): {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                last.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        self.started = true;
        Ok(())
    }

    pub fn url(&self, database: &str) -> String {
        self.url_as("postgres", database)
    }

    pub fn url_as(&self, role: &str, database: &str) -> String {
        format!("postgres://{role}@127.0.0.1:{}/{database}", self.port)
    }

    pub fn stop(&mut self) {
        if !self.started {
            return;
        }
        let r = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match r {
            Ok(s) if s.success() => self.started = false,
            other => tracing::error!(?other, dir = %self.dir.display(), "PostgreSQL did not stop"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Running it

/// Is `pid` a live (not zombie) process named one of `names`?
fn process_alive(pid: &str, names: &[&str]) -> bool {
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "<pid> (<comm>) <state> ...": the name may hold spaces, so split at the last ')'.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].trim_start().chars().next().unwrap_or('X');
    names.contains(&comm) && !matches!(state, 'Z' | 'X' | 'x')
}

/// Makes this process the one `mira dev` of `data_dir`, or says which process is.
fn claim_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    let lock = data_dir.join("mira-dev.pid");
    if let Ok(pid) = std::fs::read_to_string(&lock) {
        let pid = pid.trim();
        let ours = pid == std::process::id().to_string();
        let alive = process_alive(pid, &["mira"]);
        if alive && !ours {
            bail!("another mira dev (pid {pid}) is using {}", data_dir.display());
        }
    }
    std::fs::write(&lock, std::process::id().to_string()).with_context(|| format!("cannot write {}", lock.display()))
}

#[derive(Debug, Clone)]
pub struct DevOptions {
    pub data_dir: PathBuf,
    pub listen: String,
}

/// Runs the platform until `shutdown`. `announce` receives the lines to show the user once
/// everything is up. The private cluster, if any, is stopped on every way out.
pub async fn run(
    file: Option<&Path>,
    env: Vec<(String, String)>,
    opts: &DevOptions,
    shutdown: tokio_util::sync::CancellationToken,
    announce: impl FnOnce(&[String]),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("cannot create {}", opts.data_dir.display()))?;
    let data = std::fs::canonicalize(&opts.data_dir)?;
    claim_data_dir(&data)?;
    let idp = DevIdp::open_or_create(&data)?;
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let mut env: std::collections::BTreeMap<String, String> = env.into_iter().collect();
    let mut cluster = None;
    if !env.contains_key("DATABASE_URL") {
        let d = data.clone();
        let c = tokio::task::spawn_blocking(move || -> anyhow::Result<Cluster> {
            let mut c = Cluster::prepare(&d)?;
            c.start()?;
            Ok(c)
        })
        .await??;
        let admin = mira_eventlog::db::connect(&c.url("postgres"), 1, Duration::from_secs(10)).await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'mira')")
            .fetch_one(&admin)
            .await?;
        if !exists {
            sqlx::query("CREATE DATABASE mira").execute(&admin).await?;
        }
        // The processes connect as a login role that owns nothing; `postgres` owns the schema
        // and only migrates (ADR 0012).
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        ))
        .execute(&admin)
        .await?;
        admin.close().await;
        env.insert("Database__MigrationUrl".into(), c.url("mira"));
        env.insert("DATABASE_URL".into(), c.url_as(APP_ROLE, "mira"));
        cluster = Some(c);
    }
    let at = |p: &str| data.join(p).display().to_string();
    for (k, v) in [
        ("Messaging__Provider", "InMemory".to_owned()),
        ("Storage__Provider", "Local".to_owned()),
        ("Storage__LocalDir", at("blobs")),
        ("Keyring__LocalDir", at("keyring")),
        ("Audit__SigningKeyFile", at("audit-signing.key")),
        ("Audit__WitnessDir", at("witness")),
        ("AWS__Cognito__Issuer", ISSUER.to_owned()),
        ("AWS__Cognito__ClientId", AUDIENCE.to_owned()),
        ("AWS__Cognito__JwksUrl", format!("http://{addr}{DEV_JWKS_PATH}")),
    ] {
        env.insert(k.into(), v);
    }
    // The browser app: `web/dist` of the directory `mira dev` runs from, unless set.
    env.entry("Web__Dir".into()).or_insert_with(|| "web/dist".to_owned());
    let settings = crate::config::Settings::load(file, env)?;
    crate::database::migrate(&settings).await?;
    // Keys are created here, on the first start, and nowhere else (`mira keys init`).
    let keys = mira_keys::init(&settings).await?;
    for l in keys.lines.iter().filter(|l| l.contains("(created)")) {
        tracing::info!("created {l}");
    }
    let pool = mira_eventlog::db::connect_with(&settings).await?;
    let mut worker = spawn_worker(&settings, &data);
    let url = format!("http://{addr}");
    let data_arg = shell_quote(&data.display().to_string());
    let mut lines = vec![
        format!("Mira is running at {url}"),
        format!("  data directory: {}", data.display()),
        format!(
            "  audit: checkpoints signed with {} and copied to {}",
            settings.audit.signing_key_file.display(),
            settings
                .audit
                .witness_dir
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
        ),
    ];
    match &cluster {
        Some(c) => lines.push(format!(
            "  database: private PostgreSQL cluster in {} (port {}); the processes connect as {APP_ROLE}, which owns nothing",
            c.dir.display(),
            c.port
        )),
        None => lines.push("  database: DATABASE_URL".to_owned()),
    }
    match &worker {
        Ok(w) => lines.push(format!(
            "  worker: mira-worker (pid {}); its first line says whether it runs on the GPU or the CPU, and why",
            w.id().unwrap_or_default()
        )),
        Err(why) => lines.push(format!("  worker: not running ({why}); uploaded slides wait for one")),
    }
    match settings.web.dir.as_deref().filter(|d| d.join("index.html").is_file()) {
        Some(_) => lines.push(format!(
            "  the browser app: open {url}/ and sign in with any user name, tenant and role"
        )),
        None => lines.push(format!(
            "  the browser app is not built ({} has no index.html): scripts/dev builds it",
            settings.web.dir.as_deref().unwrap_or(Path::new("Web__Dir")).display()
        )),
    }
    lines.push("  or sign in with a token from the local identity provider:".to_owned());
    let exe = std::env::current_exe()
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|_| "mira".into());
    lines.push(format!("    TOKEN=$({exe} dev token)"));
    lines.push(format!(
        "    (from any directory; or `{exe} dev token --data-dir {data_arg}`)"
    ));
    lines.push(format!("    curl -H \"Authorization: Bearer $TOKEN\" {url}/api/jobs"));
    lines.push("  Ctrl-C stops everything; the data stays for the next start.".to_owned());
    record_running(&data, &url);
    announce(&lines);
    {
        let (stopping, pg) = (shutdown.clone(), cluster.is_some());
        tokio::spawn(async move {
            stopping.cancelled().await;
            eprintln!(
                "mira dev: stopping: the API and WebSocket, relay, projector, handlers and the worker (the job in hand finishes first){}",
                if pg { ", then PostgreSQL" } else { "" }
            );
        });
    }
    let options = crate::server::Options::everything(Some(std::sync::Arc::new(idp)));
    let result = crate::server::run(&settings, pool.clone(), listener, &options, shutdown).await;
    forget_running();
    if let Ok(w) = &mut worker {
        stop_worker(w).await;
    }
    pool.close().await;
    if let Some(mut c) = cluster {
        tokio::task::spawn_blocking(move || c.stop()).await?;
    }
    let _ = std::fs::remove_file(data.join("mira-dev.pid"));
    result
}

/// Starts `mira-worker run` (found beside this `mira`) as a child on the same database,
/// keyring and blob store. The worker feeds itself from the log with a relay of its own.
fn spawn_worker(settings: &crate::config::Settings, data: &Path) -> Result<tokio::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("mira-worker");
    if !bin.exists() {
        return Err(format!("{} was not built", bin.display()));
    }
    let mut cmd = tokio::process::Command::new(&bin);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", crate::telemetry::DEV_FILTER);
    }
    cmd.arg("run")
        .env("DATABASE_URL", settings.database_url().map_err(|e| e.to_string())?)
        .env("Messaging__Provider", "InMemory")
        .env("Storage__Provider", "Local")
        .env("Storage__LocalDir", data.join("blobs"))
        .env("Keyring__LocalDir", data.join("keyring"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// SIGTERM, then up to 60 s for the job in hand, then SIGKILL.
async fn stop_worker(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    if tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .is_err()
    {
        tracing::warn!("the worker did not stop within 60 s; killing it");
        let _ = child.kill().await;
    }
}

/// Where a running `mira dev` records its data directory, so that `mira dev token` finds it
/// from any working directory: `$XDG_RUNTIME_DIR`, else `/run/user/<uid>`, else the temporary
/// directory (per user).
pub fn runtime_record() -> PathBuf {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .or_else(|| Some(PathBuf::from(format!("/run/user/{uid}"))).filter(|d| d.is_dir()))
        .unwrap_or_else(|| std::env::temp_dir().join(format!("mira-{uid}")));
    dir.join("mira-dev.json")
}

/// The record of the running `mira dev`: its pid, data directory and URL.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Running {
    pub pid: u32,
    pub data_dir: PathBuf,
    pub url: String,
}

fn record_running(data: &Path, url: &str) {
    let rec = runtime_record();
    let running = Running {
        pid: std::process::id(),
        data_dir: data.to_path_buf(),
        url: url.to_owned(),
    };
    let write = || -> std::io::Result<()> {
        if let Some(p) = rec.parent() {
            std::fs::create_dir_all(p)?;
        }
        let tmp = rec.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&running).unwrap_or_default())?;
        std::fs::rename(&tmp, &rec)
    };
    if let Err(e) = write() {
        tracing::warn!(file = %rec.display(), error = %e, "cannot record the running mira dev; `mira dev token` will need --data-dir");
    }
}

fn forget_running() {
    let rec = runtime_record();
    let ours = std::fs::read(&rec)
        .ok()
        .and_then(|b| serde_json::from_slice::<Running>(&b).ok())
        .is_some_and(|r| r.pid == std::process::id());
    if ours {
        let _ = std::fs::remove_file(rec);
    }
}

/// The running `mira dev`, if its record names a live process.
pub fn running() -> Option<Running> {
    let r: Running = serde_json::from_slice(&std::fs::read(runtime_record()).ok()?).ok()?;
    process_alive(&r.pid.to_string(), &["mira"]).then_some(r)
}

/// The data directory `mira dev token` signs for: `--data-dir` when given; else `./.mira` when
/// it holds an identity key; else the running `mira dev`'s. It never creates a key: a token
/// signed by a new key would only be refused.
pub fn token_data_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = given {
        if d.join(IDENTITY_KEY).exists() {
            return Ok(d.to_path_buf());
        }
        bail!(
            "{} has no identity key ({IDENTITY_KEY}): start `mira dev --data-dir {}` first",
            d.display(),
            d.display()
        );
    }
    let local = PathBuf::from(".mira");
    if local.join(IDENTITY_KEY).exists() {
        return Ok(local);
    }
    if let Some(r) = running() {
        if r.data_dir.join(IDENTITY_KEY).exists() {
            return Ok(r.data_dir);
        }
    }
    bail!(
        "no mira dev found: ./.mira has no identity key and {} names no running mira dev; start `mira dev` (or pass --data-dir)",
        runtime_record().display()
    )
}

/// `mira dev token`: an ID token the running `mira dev` of `data_dir` accepts.
pub fn token(data_dir: &Path, sub: &str, tenant: &str, groups: &[String], ttl: Duration) -> anyhow::Result<String> {
    let idp = DevIdp::open(data_dir)?;
    idp.token(sub, tenant, groups, ttl)
}

fn shell_quote(s: &str) -> String {
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
