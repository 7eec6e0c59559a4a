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

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
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

/// A PostgreSQL cluster owned by `mira dev`, stopped when dropped. It listens on loopback
/// only and asks every login for a password (scram-sha-256), made at `initdb` and kept in
/// [`PASSWORDS`] (mode 0600): on a shared machine, another local user cannot log in.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// (uid, gid) of `postgres` when running as root: initdb refuses root.
    run_as: Option<(u32, u32)>,
    started: bool,
    /// The passwords of `postgres` and [`APP_ROLE`]; `None` for a cluster made before mira dev
    /// set passwords (trust), until [`Cluster::secure`] sets them.
    pub passwords: Option<Passwords>,
}

/// The cluster's passwords, in the data directory.
pub const PASSWORDS: &str = "postgres.passwords";

/// The passwords of the private cluster's login roles: the owner, the one login of older data
/// directories ([`APP_ROLE`]), and each process's own (ADR 0012).
#[derive(Clone, PartialEq, Eq)]
pub struct Passwords {
    pub owner: String,
    pub service: String,
    /// Each process's login (`mira_svc_<process>`) and its password.
    pub logins: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords(***)")
    }
}

impl Passwords {
    fn generate() -> anyhow::Result<Self> {
        let mut p = Self {
            owner: Self::one()?,
            service: Self::one()?,
            logins: Default::default(),
        };
        p.complete()?;
        Ok(p)
    }

    fn one() -> anyhow::Result<String> {
        let mut b = [0u8; 24];
        getrandom::getrandom(&mut b).map_err(|e| anyhow::anyhow!("cannot generate a password: {e}"))?;
        Ok(hex::encode(b))
    }

    /// Gives every process's login a password (a data directory from before they had their
    /// own has none); whether any was missing.
    fn complete(&mut self) -> anyhow::Result<bool> {
        let mut changed = false;
        for p in crate::config::DbProcess::ALL {
            if let std::collections::btree_map::Entry::Vacant(e) = self.logins.entry(p.default_login()) {
                e.insert(Self::one()?);
                changed = true;
            }
        }
        Ok(changed)
    }

    /// `data_dir`'s passwords, if it has them.
    pub fn load(data_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = data_dir.join(PASSWORDS);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut owner = None;
        let mut service = None;
        let mut logins = std::collections::BTreeMap::new();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("postgres", pw)) => owner = Some(pw.trim().to_owned()),
                Some((APP_ROLE, pw)) => service = Some(pw.trim().to_owned()),
                Some((login, pw)) if login.starts_with("mira_svc_") && !pw.trim().is_empty() => {
                    logins.insert(login.to_owned(), pw.trim().to_owned());
                }
                _ => {}
            }
        }
        match (owner, service) {
            (Some(owner), Some(service)) if !owner.is_empty() && !service.is_empty() => {
                Ok(Some(Self { owner, service, logins }))
            }
            _ => bail!(
                "{} is damaged: it must name the passwords of postgres and {APP_ROLE}",
                path.display()
            ),
        }
    }

    fn save(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = data_dir.join(PASSWORDS);
        let mut text = format!("postgres {}\n{APP_ROLE} {}\n", self.owner, self.service);
        for (login, pw) in &self.logins {
            text.push_str(&format!("{login} {pw}\n"));
        }
        // A new file renamed over the old: a crash midway leaves the old passwords, not none.
        let tmp = path.with_extension(format!("new-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        write_private(&tmp, text.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .with_context(|| format!("cannot write {}", path.display()))
    }
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

    /// Finds or creates the cluster for `data_dir` (initdb on first use, with a password).
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
            passwords: Passwords::load(data_dir)?,
        };
        if !cluster.dir.join("PG_VERSION").exists() {
            let passwords = Passwords::generate()?;
            // initdb reads the owner's password from a file the cluster's user can read:
            // one of its own, in a directory only it can enter, removed once initdb is done.
            let scratch = cluster.dir.with_file_name(format!(".initdb-{}", std::process::id()));
            std::fs::create_dir_all(&scratch)?;
            let pwfile = scratch.join("pw");
            write_private(&pwfile, passwords.owner.as_bytes())?;
            if let Some((uid, gid)) = run_as {
                for p in [&scratch, &pwfile] {
                    std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
                }
            }
            set_mode(&scratch, 0o700)?;
            let out = cluster
                .command("initdb")
                .args(["-D"])
                .arg(&cluster.dir)
                .args([
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output()
                .context("cannot run initdb");
            let _ = std::fs::remove_dir_all(&scratch);
            let out = out?;
            if out.status.success() {
                let _ = std::fs::remove_file(data_dir.join(PASSWORDS));
                passwords.save(data_dir)?;
                cluster.passwords = Some(passwords);
            } else {
                bail!(
                    "initdb failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        if cluster.passwords.is_none() && !cluster.trusts() {
            bail!(
                "{} is missing: the PostgreSQL cluster in {} asks for the passwords it held; restore the file, or move that cluster away to start afresh",
                data_dir.join(PASSWORDS).display(),
                cluster.dir.display()
            );
        }
        cluster.port = 0;
        Ok(cluster)
    }

    /// Does the cluster still let logins in without a password (made by an older mira dev)?
    fn trusts(&self) -> bool {
        std::fs::read_to_string(self.dir.join("pg_hba.conf"))
            .map(|t| {
                t.lines()
                    .map(str::trim)
                    .filter(|l| !l.starts_with('#'))
                    .any(|l| l.split_whitespace().last() == Some("trust"))
            })
            .unwrap_or(false)
    }

    /// A cluster an older mira dev made with `trust`: give its roles passwords, then make
    /// every login ask for one (scram-sha-256) and reload. Runs on the started cluster.
    pub async fn secure(&mut self, data_dir: &Path) -> anyhow::Result<()> {
        if self.passwords.is_some() {
            return Ok(());
        }
        let passwords = Passwords::generate()?;
        let admin =
            mira_eventlog::db::connect(&self.url_with("postgres", None, "postgres"), 1, Duration::from_secs(10))
                .await?;
        sqlx::raw_sql(&format!(
            "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD '{}'; \
             DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             ALTER ROLE {APP_ROLE} PASSWORD '{}'",
            passwords.owner, passwords.service
        ))
        .execute(&admin)
        .await?;
        admin.close().await;
        let _ = std::fs::remove_file(data_dir.join(PASSWORDS));
        passwords.save(data_dir)?;
        let hba = self.dir.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "# mira dev: loopback only, every login with a password\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n",
        )
        .with_context(|| format!("cannot write {}", hba.display()))?;
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(&hba, Some(uid), Some(gid))?;
        }
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .arg("reload")
            .output()
            .context("cannot run pg_ctl reload")?;
        if !out.status.success() {
            bail!("pg_ctl reload failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        tracing::info!("the private cluster now asks every login for a password ({PASSWORDS})");
        self.passwords = Some(passwords);
        Ok(())
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

    /// The owner's URL of `database`, with its password.
    pub fn url(&self, database: &str) -> String {
        let pw = self.passwords.as_ref().map(|p| p.owner.as_str());
        self.url_with("postgres", pw, database)
    }

    /// Each process's login URL of `database`, with its password, and the setting it goes in.
    pub fn login_urls(&self, database: &str) -> Vec<(&'static str, String)> {
        crate::config::DbProcess::ALL
            .iter()
            .map(|p| {
                let login = p.default_login();
                let pw = self
                    .passwords
                    .as_ref()
                    .and_then(|x| x.logins.get(&login))
                    .map(String::as_str);
                (p.setting(), self.url_with(&login, pw, database))
            })
            .collect()
    }

    fn url_with(&self, role: &str, password: Option<&str>, database: &str) -> String {
        match password {
            Some(pw) => format!("postgres://{role}:{pw}@127.0.0.1:{}/{database}", self.port),
            None => format!("postgres://{role}@127.0.0.1:{}/{database}", self.port),
        }
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

impl Cluster {
    /// Stops the server without waiting for its clients (a second Ctrl-C).
    fn stop_now(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.dir)
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.started = false;
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
    /// A non-loopback `listen` is refused without it: it exposes the local sign-in.
    pub expose_sign_in: bool,
    /// A database to use instead of the private cluster (`--database-url`).
    pub database_url: Option<String>,
}

/// The files `keys init` makes in a data directory, which only the first start may make.
fn key_files(data: &Path) -> [PathBuf; 3] {
    [
        data.join("audit-signing.key"),
        data.join("keyring").join("KEYRING"),
        data.join("witness"),
    ]
}

/// The mark of a data directory whose keys were made (by its first start).
const KEYS_MADE: &str = "keys.made";

/// Keys are made once, on a data directory's first start; afterwards a missing one stops
/// `mira dev` (a new signing key would make every older checkpoint look forged).
fn check_keys(data: &Path) -> anyhow::Result<bool> {
    let first = !data.join(KEYS_MADE).exists();
    if first {
        return Ok(true);
    }
    for f in key_files(data) {
        if !f.exists() {
            bail!(
                "{} is missing: mira dev made its keys on this data directory's first start and will not make new ones \
                 (checkpoints signed by the old key would then look forged); restore it, or make a new key knowingly \
                 with `mira keys init` (Audit__SigningKeyFile, Keyring__LocalDir, Audit__WitnessDir naming {})",
                f.display(),
                data.display()
            );
        }
    }
    Ok(false)
}

/// Only the user who runs `mira dev` reads what it keeps: the data directory can be entered
/// (0711: the cluster's user reaches its directory inside) but not listed, and the keys, the
/// keyring, the witness and the blobs are the user's alone.
fn restrict(data: &Path) -> anyhow::Result<()> {
    set_mode(data, 0o711).with_context(|| format!("cannot restrict {}", data.display()))?;
    for d in ["keyring", "witness", "blobs"] {
        let p = data.join(d);
        std::fs::create_dir_all(&p)?;
        set_mode(&p, 0o700).with_context(|| format!("cannot restrict {}", p.display()))?;
    }
    // Every file at the top (keys, passwords, marks), the public audit key excepted.
    for e in std::fs::read_dir(data)?.flatten() {
        let p = e.path();
        let public = p.extension().is_some_and(|x| x == "pub");
        if e.file_type().is_ok_and(|t| t.is_file()) && !public {
            set_mode(&p, 0o600).with_context(|| format!("cannot restrict {}", p.display()))?;
        }
    }
    Ok(())
}

/// How long `mira dev`'s worker may take over the job in hand on Ctrl-C
/// (`Worker__DrainSeconds`, unless set).
const DEV_DRAIN_SECONDS: u64 = 5;

/// Runs the platform until `shutdown`. `announce` receives the lines to show the user once
/// everything is up. The private cluster, if any, is stopped on every way out. A second
/// signal after `shutdown` stops everything at once.
pub async fn run(
    file: Option<&Path>,
    env: Vec<(String, String)>,
    opts: &DevOptions,
    shutdown: tokio_util::sync::CancellationToken,
    announce: impl FnOnce(&[String]),
) -> anyhow::Result<()> {
    // The address first: a refusal makes nothing.
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() && !opts.expose_sign_in {
        bail!(
            "--listen {} is not a loopback address: anyone who reaches it could sign in as any user, tenant and role; \
             pass --expose-sign-in to do that knowingly",
            opts.listen
        );
    }
    std::fs::create_dir_all(&opts.data_dir).with_context(|| format!("cannot create {}", opts.data_dir.display()))?;
    let data = std::fs::canonicalize(&opts.data_dir)?;
    claim_data_dir(&data)?;
    let first_start = check_keys(&data)?;
    let idp = DevIdp::open_or_create(&data)?;
    let mut env: std::collections::BTreeMap<String, String> = env.into_iter().collect();
    // Only a database named on the command line: a DATABASE_URL left in the shell may name a
    // shared or production database, which mira dev would migrate.
    let inherited = env.remove("DATABASE_URL").is_some() | env.remove("Database__MigrationUrl").is_some();
    let mut notes = Vec::new();
    if inherited && opts.database_url.is_none() {
        notes.push(
            "  note: DATABASE_URL is set in this shell; mira dev ignores it and uses its private cluster (--database-url URL uses another database)"
                .to_owned(),
        );
    }
    let mut cluster = None;
    match &opts.database_url {
        Some(url) => {
            env.insert("DATABASE_URL".into(), url.clone());
        }
        None => {
            let d = data.clone();
            let mut c = tokio::task::spawn_blocking(move || -> anyhow::Result<Cluster> {
                let mut c = Cluster::prepare(&d)?;
                c.start()?;
                Ok(c)
            })
            .await??;
            c.secure(&data).await?;
            let admin = mira_eventlog::db::connect(&c.url("postgres"), 1, Duration::from_secs(10)).await?;
            let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'mira')")
                .fetch_one(&admin)
                .await?;
            if !exists {
                sqlx::query("CREATE DATABASE mira").execute(&admin).await?;
            }
            admin.close().await;
            // Each process connects as its own login, holding only its grants: `mira migrate`
            // below creates them with these passwords (ADR 0012).
            if let Some(p) = c.passwords.as_mut() {
                if p.complete()? {
                    p.save(&data)?;
                }
            }
            env.insert("Database__MigrationUrl".into(), c.url("mira"));
            for (setting, url) in c.login_urls("mira") {
                if setting == crate::config::DbProcess::Api.setting() {
                    env.insert("DATABASE_URL".into(), url.clone());
                }
                env.insert(setting.into(), url);
            }
            cluster = Some(c);
        }
    }
    let at = |p: &str| data.join(p).display().to_string();
    // The gateway fetches the local JWKS from itself, at a loopback name it answers.
    let jwks_host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    for (k, v) in [
        ("Messaging__Provider", "InMemory".to_owned()),
        ("Storage__Provider", "Local".to_owned()),
        ("Storage__LocalDir", at("blobs")),
        ("Keyring__LocalDir", at("keyring")),
        ("Audit__SigningKeyFile", at("audit-signing.key")),
        ("Audit__WitnessDir", at("witness")),
        ("AWS__Cognito__Issuer", ISSUER.to_owned()),
        ("AWS__Cognito__ClientId", AUDIENCE.to_owned()),
        ("AWS__Cognito__JwksUrl", format!("http://{jwks_host}{DEV_JWKS_PATH}")),
    ] {
        env.insert(k.into(), v);
    }
    if opts.expose_sign_in {
        env.insert("Web__AllowRemoteDevSignIn".into(), "true".into());
    }
    // The browser app: `web/dist` of the directory `mira dev` runs from, unless set.
    env.entry("Web__Dir".into()).or_insert_with(|| "web/dist".to_owned());
    // Metrics on a loopback port of their own, as operators scrape them.
    if !env.contains_key("Api__MetricsListen") {
        let port = StdListener::bind("127.0.0.1:0")?.local_addr()?.port();
        env.insert("Api__MetricsListen".into(), format!("127.0.0.1:{port}"));
    }
    env.entry("Api__ShutdownGraceSeconds".into())
        .or_insert_with(|| "2".to_owned());
    // One person on one machine: the viewer's tiles come through this gateway too (a redirect
    // and the local store's GET for each), so the per-client rate is a local one's.
    env.entry("Api__RequestsPerSecond".into())
        .or_insert_with(|| "1000".to_owned());
    env.entry("Worker__DrainSeconds".into())
        .or_insert_with(|| DEV_DRAIN_SECONDS.to_string());
    let settings = crate::config::Settings::load(file, env)?;
    crate::database::migrate(&settings).await?;
    // Keys are made here on the data directory's first start, and nowhere else
    // (`mira keys init`); later starts use them or stop (see `check_keys`).
    if first_start {
        let keys = mira_keys::init(&settings).await?;
        for l in keys.lines.iter().filter(|l| l.contains("(created)")) {
            tracing::info!("created {l}");
        }
        std::fs::write(data.join(KEYS_MADE), chrono::Utc::now().to_rfc3339())?;
    }
    restrict(&data)?;
    let pool = mira_eventlog::db::connect_with(&settings).await?;
    let mut worker = spawn_worker(&settings, &data, "run");
    // Uploads are verified by a process of their own, on CPUs, as on AWS (ADR 0026).
    let mut verifier = spawn_worker(&settings, &data, "verify");
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
    let exe = std::env::current_exe()
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|_| "mira".into());
    match &cluster {
        Some(c) => lines.push(format!(
            "  database: private PostgreSQL cluster in {} (port {}), a password for every login; each process connects as its own login (mira_svc_api, mira_svc_worker, …), which owns nothing; `{exe} dev url` prints a URL for psql",
            c.dir.display(),
            c.port
        )),
        None => lines.push("  database: the one --database-url names".to_owned()),
    }
    lines.extend(notes);
    if let Some(m) = &settings.api.metrics_listen {
        lines.push(format!("  metrics: http://{m}/metrics"));
    }
    // Traces: where they go (`--otlp`, or the standard variable), or how to see them.
    match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        Some(url) => lines.push(format!(
            "  traces: sent over OTLP/HTTP to {url} (services mira-dev and mira-worker)"
        )),
        None => lines.push(format!(
            "  traces: off; `{exe} dev --otlp http://127.0.0.1:4318` sends them to a collector you run (a local Jaeger shows them at http://127.0.0.1:16686)"
        )),
    }
    match &worker {
        Ok(w) => lines.push(format!(
            "  worker: mira-worker (pid {}); its first line says whether it runs on the GPU or the CPU, and why",
            w.id().unwrap_or_default()
        )),
        Err(why) => lines.push(format!("  worker: not running ({why}); queued jobs wait for one")),
    }
    match &verifier {
        Ok(w) => lines.push(format!(
            "  verifier: mira-worker verify (pid {}); it checks uploaded slides, on the CPU",
            w.id().unwrap_or_default()
        )),
        Err(why) => lines.push(format!("  verifier: not running ({why}); uploaded slides wait for one")),
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
    lines.push(format!("    TOKEN=$({exe} dev token)"));
    lines.push(format!(
        "    (from any directory; or `{exe} dev token --data-dir {data_arg}`)"
    ));
    lines.push(format!("    curl -H \"Authorization: Bearer $TOKEN\" {url}/api/jobs"));
    lines.push("  Ctrl-C stops everything (a second Ctrl-C at once); the data stays for the next start.".to_owned());
    record_running(&data, &url);
    announce(&lines);
    let drain = settings.worker.drain_seconds;
    {
        let (stopping, pg) = (
            shutdown.clone(),
            cluster.as_ref().map(|c| (c.dir.clone(), c.bin.clone(), c.run_as)),
        );
        let worker_pids: Vec<u32> = [&worker, &verifier]
            .into_iter()
            .filter_map(|w| w.as_ref().ok().and_then(|w| w.id()))
            .collect();
        let data = data.clone();
        tokio::spawn(async move {
            stopping.cancelled().await;
            eprintln!(
                "mira dev: stopping: the API and WebSocket, relay, projector, handlers, the worker and the verifier (the work in hand gets {drain} s, Worker__DrainSeconds){}; Ctrl-C again stops at once",
                if pg.is_some() { ", then PostgreSQL" } else { "" }
            );
            // Give the first signal a moment to be the only one (a terminal's Ctrl-C can
            // arrive as SIGINT from the terminal and from a wrapper at once).
            tokio::time::sleep(Duration::from_millis(300)).await;
            second_signal().await;
            eprintln!("mira dev: stopping at once");
            for pid in worker_pids {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            if let Some((dir, bin, run_as)) = pg {
                let mut c = Cluster {
                    dir,
                    bin,
                    port: 0,
                    run_as,
                    started: true,
                    passwords: None,
                };
                c.stop_now();
            }
            forget_running();
            let _ = std::fs::remove_file(data.join("mira-dev.pid"));
            std::process::exit(130);
        });
    }
    let options = crate::server::Options::everything(Some(std::sync::Arc::new(idp)));
    let result = crate::server::run(&settings, pool.clone(), listener, &options, shutdown).await;
    forget_running();
    // Both are told at once, and each gets the drain.
    let bound = Duration::from_secs(drain + 5);
    match (&mut worker, &mut verifier) {
        (Ok(w), Ok(v)) => {
            tokio::join!(stop_worker(w, bound), stop_worker(v, bound));
        }
        (Ok(w), Err(_)) | (Err(_), Ok(w)) => stop_worker(w, bound).await,
        (Err(_), Err(_)) => {}
    }
    pool.close().await;
    if let Some(mut c) = cluster {
        tokio::task::spawn_blocking(move || c.stop()).await?;
    }
    let _ = std::fs::remove_file(data.join("mira-dev.pid"));
    result
}

/// The next SIGINT or SIGTERM.
async fn second_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Starts `mira-worker <mode>` (`run`, the jobs; `verify`, the uploads; found beside this
/// `mira`) as a child on the same database, keyring and blob store. Each feeds itself from
/// the log with a relay of its own.
fn spawn_worker(settings: &crate::config::Settings, data: &Path, mode: &str) -> Result<tokio::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("mira-worker");
    if !bin.exists() {
        return Err(format!("{} was not built", bin.display()));
    }
    let mut cmd = tokio::process::Command::new(&bin);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", crate::telemetry::DEV_FILTER);
    }
    cmd.arg(mode)
        .env(
            "DATABASE_URL",
            settings
                .login_url(crate::config::DbProcess::Worker)
                .map_err(|e| e.to_string())?
                .0,
        )
        .env_remove("Database__MigrationUrl")
        .env("Messaging__Provider", "InMemory")
        .env("Storage__Provider", "Local")
        .env("Storage__LocalDir", data.join("blobs"))
        .env("Keyring__LocalDir", data.join("keyring"))
        .env("Worker__DrainSeconds", settings.worker.drain_seconds.to_string())
        .env("MIRA_EXIT_WITH_PARENT", std::process::id().to_string())
        // A group of its own: a terminal's Ctrl-C reaches `mira dev` alone, which then stops
        // the worker (SIGTERM, and SIGKILL on a second Ctrl-C or past the drain).
        .process_group(0)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))
}

/// SIGTERM, then up to `bound` (the worker's drain and a margin), then SIGKILL.
async fn stop_worker(child: &mut tokio::process::Child, bound: Duration) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    }
    if tokio::time::timeout(bound, child.wait()).await.is_err() {
        tracing::warn!(bound_s = bound.as_secs(), "the worker did not stop in time; killing it");
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

/// `mira dev url`: a connection URL, with its password, to the private cluster of the running
/// `mira dev` of `data_dir` (the owner's, or with `service` the processes' role's).
pub fn database_url(data_dir: &Path, service: bool) -> anyhow::Result<String> {
    let passwords = Passwords::load(data_dir)?.with_context(|| {
        format!(
            "{} has no {PASSWORDS}: its mira dev runs on another database (--database-url), or has not started yet",
            data_dir.display()
        )
    })?;
    let cluster = match std::fs::read_to_string(data_dir.join("postgres.location")) {
        Ok(p) => PathBuf::from(p.trim()),
        Err(_) => data_dir.join("postgres"),
    };
    // postmaster.pid: pid, data directory, start time, port, …
    let pid_file = cluster.join("postmaster.pid");
    let text = std::fs::read_to_string(&pid_file).with_context(|| {
        format!(
            "the private cluster in {} is not running (no postmaster.pid): start `mira dev` first",
            cluster.display()
        )
    })?;
    let mut fields = text.lines();
    let pid = fields.next().unwrap_or_default().trim().to_owned();
    let port: u16 = fields
        .nth(2)
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("{} names no port", pid_file.display()))?;
    if !process_alive(&pid, &["postgres", "postmaster"]) {
        bail!(
            "the private cluster in {} is not running: start `mira dev` first",
            cluster.display()
        );
    }
    let (role, pw) = if service {
        let api = crate::config::DbProcess::Api.default_login();
        let pw = passwords.logins.get(&api).cloned().with_context(|| {
            format!("{PASSWORDS} has no password for {api}: start this mira dev once more to give it one")
        })?;
        (api, pw)
    } else {
        ("postgres".to_owned(), passwords.owner)
    };
    Ok(format!("postgres://{role}:{pw}@127.0.0.1:{port}/mira"))
}
