//! `mira-config`: the settings every Mira process reads (DESIGN §2): typed defaults, then an
//! optional TOML file, then the environment, with `__` separating nesting levels (`Audit__SigningKeyFile`). Only Mira's own sections
//! are read from the environment, plus `DATABASE_URL` and `MIRA_COMMIT`. A bad value fails at
//! start with the setting's name; secrets never print.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// What ID-token validation needs (DESIGN §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub jwks_url: String,
    pub issuer: String,
    /// The app client id: the ID token's `aud`.
    pub audience: String,
    pub leeway: std::time::Duration,
    pub min_refresh: std::time::Duration,
}

/// A value that must never appear in logs or error messages.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    #[serde(rename = "DATABASE_URL")]
    pub database_url: Option<Secret>,
    /// The commit this release was built from, as `GET /api/version` reports it: the images
    /// set it from their `MIRA_COMMIT` build argument; unset or empty, the endpoint says
    /// `unknown`. Deployments wait until the API answers the commit they rolled out.
    #[serde(rename = "MIRA_COMMIT")]
    pub commit: Option<String>,
    #[serde(rename = "Database")]
    pub database: DatabaseSettings,
    #[serde(rename = "Audit")]
    pub audit: AuditSettings,
    #[serde(rename = "Keyring")]
    pub keyring: KeyringSettings,
    #[serde(rename = "AWS")]
    pub aws: AwsSettings,
    #[serde(rename = "Messaging")]
    pub messaging: MessagingSettings,
    #[serde(rename = "Storage")]
    pub storage: StorageSettings,
    #[serde(rename = "Tracing")]
    pub tracing: TracingSettings,
    #[serde(rename = "Realtime")]
    pub realtime: RealtimeSettings,
    #[serde(rename = "Api")]
    pub api: ApiSettings,
    #[serde(rename = "Worker")]
    pub worker: WorkerSettings,
    #[serde(rename = "Jobs")]
    pub jobs: JobsSettings,
    #[serde(rename = "Roles")]
    pub roles: RolesSettings,
    #[serde(rename = "Web")]
    pub web: WebSettings,
}

/// The browser app (DESIGN §10), served by the gateway at `/`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct WebSettings {
    /// The built app (`web/dist`): read at run time, so building the gateway never needs npm.
    /// Unset, `/` answers that no app is served.
    pub dir: Option<PathBuf>,
    /// The Cognito Hosted UI's domain (`https://<prefix>.auth.<region>.amazoncognito.com`),
    /// for the app's sign-in; with `AWS__Cognito__ClientId`.
    pub cognito_domain: Option<String>,
    /// Where the Hosted UI sends the browser back (the app's `/signed-in`).
    pub redirect_url: Option<String>,
    /// `mira dev`'s sign-in page answers loopback clients only unless this is true.
    pub allow_remote_dev_sign_in: bool,
    /// A browser session with no keyboard, pointer, wheel or touch input for this long is
    /// signed out (ADR 0032); 5 to 43200.
    pub idle_sign_out_seconds: u64,
}

impl Default for WebSettings {
    fn default() -> Self {
        Self {
            dir: None,
            cognito_domain: None,
            redirect_url: None,
            allow_remote_dev_sign_in: false,
            idle_sign_out_seconds: 900,
        }
    }
}

impl WebSettings {
    /// `Web__IdleSignOutSeconds`.
    pub fn idle_sign_out(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.idle_sign_out_seconds)
    }
}

/// A background role a `mira` process can run beside the API (`mira serve --with`, or
/// `Roles__Enabled` in a container), or alone (`mira relay`, `mira projector`, `mira handlers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Relay,
    Projector,
    Handlers,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Relay, Role::Projector, Role::Handlers];

    pub fn name(self) -> &'static str {
        match self {
            Role::Relay => "relay",
            Role::Projector => "projector",
            Role::Handlers => "handlers",
        }
    }

    /// The database login this role works as.
    pub fn process(self) -> DbProcess {
        match self {
            Role::Relay => DbProcess::Relay,
            Role::Projector => DbProcess::Projector,
            Role::Handlers => DbProcess::Handlers,
        }
    }

    /// A comma-separated list (`relay,projector`); empty is none.
    pub fn parse_list(s: &str) -> Result<Vec<Role>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let r: Role = part.parse()?;
            if !out.contains(&r) {
                out.push(r);
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("{s:?} is not a role (relay, projector, handlers)"))
    }
}

/// Which roles `mira serve` runs beside the API when `--with` is not given.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct RolesSettings {
    /// Comma-separated: `relay,projector,handlers`.
    pub enabled: String,
}

/// `mira-worker run` (DESIGN §8).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct WorkerSettings {
    /// How long an attempt's lease lasts; heartbeats renew it every third of it (at most every
    /// second). A worker that stops heartbeating loses the job to a retry after this long.
    pub lease_seconds: u64,
    /// A pause after every band of slide rows, in milliseconds: 0 in production. It makes a
    /// small slide take as long as a large one, for tests and demonstrations of a long job.
    pub band_pause_millis: u64,
    /// How slides are read: `Auto` (tiled JPEG TIFF levels straight from the file where a
    /// sample proves them equal to OpenSlide) or `OpenSlide` (everything through OpenSlide).
    pub slide_reader: SlideReader,
    /// On SIGTERM or Ctrl-C, the job in hand gets this long to finish; past it the attempt is
    /// abandoned (its lease expires and the job is retried) and the process exits. Set it
    /// below the pod's or task's stop grace period; `mira dev` uses 5.
    pub drain_seconds: u64,
    /// A running job's progress is recorded at most this often (and only when it moved): the
    /// log is read by people, and a row per second per job buried the timeline.
    pub progress_seconds: u64,
    /// An attempt that reports no progress for this long is killed (it runs in a child process
    /// of its own) and fails as retryable; a second stall of the same job is final.
    pub stall_seconds: u64,
    /// An attempt still running after this long is killed as a stall is.
    pub max_attempt_seconds: u64,
    /// A test hook: when set, the pipeline stops for ever before band N (1 is the first), so
    /// the stall guard can be seen at work. 0 (the default) in production.
    pub test_hang_at_band: u64,
    /// The most pixels a slide's full-resolution level may declare: about 200,000 × 200,000,
    /// more than the largest scanners write. A slide declaring more is rejected at
    /// verification, before any pixel is decoded.
    pub max_slide_pixels: u64,
    /// What one attempt may use: a job whose estimated need (from the slide's geometry) is
    /// larger fails before it starts, and the attempt's process cannot allocate past it (its
    /// data limit), so a decoder that tries fails the attempt and never the worker.
    pub memory_budget_bytes: u64,
    /// An attempt's time budget: 600 s plus this many seconds per gigapixel of the slide, at
    /// most `Worker__MaxAttemptSeconds`; past it the job fails for good.
    pub seconds_per_gigapixel: u64,
    /// A test hook: the attempt's process allocates and fills this many bytes before it starts,
    /// so the memory limit can be seen at work. 0 (the default) in production.
    pub test_allocate_bytes: u64,
    /// A result layer is uploaded as it is written, in parts of this many bytes; the first part
    /// (with the layer's header) is held in memory and sent last (ADR 0036). S3 wants 5 MiB at
    /// least for every part but the last.
    pub layer_part_bytes: u64,
    /// Parts of a layer uploading at once.
    pub layer_upload_parallel: usize,
}

/// The job lifecycle the handlers drive (DESIGN §5.3).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "PascalCase")]
pub struct JobsSettings {
    /// A job waits this long for its slide to be uploaded and verified, then fails with "the
    /// slide was never uploaded" (or was not verified in time). Fractions are allowed.
    #[serde(deserialize_with = "fractional")]
    pub slide_wait_hours: f64,
    /// Who may submit a STAT job (`{"priority": "stat"}`): groups of `cognito:groups`,
    /// comma-separated, of `pathologist` and `admin`; empty for no one. Default `pathologist`.
    pub stat_groups: String,
    /// Routine jobs queued (admitted to the GPU queue) and not started yet, at most: the
    /// handlers admit the rest as workers take these, tenants in turn. Default 2.
    pub admission_window: u32,
    /// Jobs of one tenant admitted and not finished (queued or running), at most; 0 for no
    /// limit (the default). STAT jobs are admitted whatever this says.
    pub max_running_per_tenant: u32,
}

impl JobsSettings {
    /// The groups that may submit STAT jobs ([`JobsSettings::stat_groups`]).
    pub fn stat_groups(&self) -> Result<Vec<&str>, String> {
        let mut out = Vec::new();
        for g in self.stat_groups.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            match g {
                "pathologist" | "admin" => out.push(g),
                other => {
                    return Err(format!(
                        "{other:?} is not a group that submits jobs: pathologist, admin, or empty for no one"
                    ))
                }
            }
        }
        Ok(out)
    }
}

/// A number from a file (`24`, `0.5`) or from the environment, where `0.5` arrives as text.
fn fractional<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Number(f64),
        Text(String),
    }
    match N::deserialize(d)? {
        N::Number(n) => Ok(n),
        N::Text(t) => t
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .ok_or_else(|| serde::de::Error::custom(format!("{t:?} is not a number of hours"))),
    }
}

impl Default for JobsSettings {
    fn default() -> Self {
        Self {
            slide_wait_hours: 24.0,
            stat_groups: "pathologist".into(),
            admission_window: 2,
            max_running_per_tenant: 0,
        }
    }
}

impl JobsSettings {
    pub fn slide_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.slide_wait_hours * 3600.0)
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum SlideReader {
    #[default]
    Auto,
    OpenSlide,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            lease_seconds: 60,
            band_pause_millis: 0,
            slide_reader: SlideReader::Auto,
            drain_seconds: 25,
            progress_seconds: 10,
            stall_seconds: 300,
            max_attempt_seconds: 6 * 3600,
            test_hang_at_band: 0,
            max_slide_pixels: 40_000_000_000,
            memory_budget_bytes: 8 << 30,
            seconds_per_gigapixel: 600,
            test_allocate_bytes: 0,
            layer_part_bytes: 8 << 20,
            layer_upload_parallel: 4,
        }
    }
}

/// AWS settings, with the names the platform's operators already use (DESIGN §2). The SDK's
/// own `AWS_ENDPOINT_URL` and credentials variables are read by the SDK itself.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AwsSettings {
    #[serde(rename = "Region")]
    pub region: Option<String>,
    #[serde(rename = "SNS")]
    pub sns: SnsSettings,
    #[serde(rename = "SQS")]
    pub sqs: SqsSettings,
    #[serde(rename = "S3")]
    pub s3: S3Settings,
    #[serde(rename = "Cognito")]
    pub cognito: CognitoSettings,
    #[serde(rename = "KMS")]
    pub kms: KmsSettings,
}

/// KMS, for the per-subject data keys of patient data in production.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct KmsSettings {
    /// The KMS key that wraps the data keys. Set: the keyring is KMS (wrapped keys in the
    /// database's `data_keys`); unset: the local keyring directory (`Keyring__LocalDir`).
    pub key_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct SnsSettings {
    pub topic_name: String,
}

impl Default for SnsSettings {
    fn default() -> Self {
        Self {
            topic_name: "mira-events.fifo".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct SqsSettings {
    /// Queues are `<prefix>projections`, `<prefix>gpu-jobs`, `<prefix>handlers` and
    /// `<prefix>verify` (`.fifo`).
    pub queue_prefix: String,
}

impl Default for SqsSettings {
    fn default() -> Self {
        Self {
            queue_prefix: "mira-".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct S3Settings {
    /// Uploads and the slides' immutable copies.
    pub bucket_name: Option<String>,
    /// Where the worker writes results and the API presigns them; unset, `bucket_name`.
    pub results_bucket_name: Option<String>,
    pub region: Option<String>,
    pub presigned_url_expiration_minutes: u32,
}

impl Default for S3Settings {
    fn default() -> Self {
        Self {
            bucket_name: None,
            results_bucket_name: None,
            region: None,
            presigned_url_expiration_minutes: 15,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct CognitoSettings {
    pub user_pool_id: Option<String>,
    pub region: Option<String>,
    pub client_id: Option<String>,
    /// Derived from the pool unless set (for an emulator).
    pub jwks_url: Option<String>,
    /// Derived from the pool unless set (for an emulator).
    pub issuer: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum MessagingProvider {
    /// The in-process bus of `mira dev`.
    #[default]
    InMemory,
    /// SNS and SQS.
    Aws,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct MessagingSettings {
    pub provider: MessagingProvider,
    /// Slow work that fails (a slide's verification, a fetch) is tried again after this many
    /// seconds, then after twice as long each time up to `SlowRetryMaxSeconds`, at most
    /// `SlowRetryAttempts` times in all; then its aggregate is parked for that consumer
    /// (`mira dlq list`, `mira dlq redrive`). The delays live in the due-time table, and the
    /// message is deleted: nothing is dead-lettered for it.
    pub slow_retry_first_seconds: u64,
    pub slow_retry_max_seconds: u64,
    pub slow_retry_attempts: u32,
}

impl Default for MessagingSettings {
    fn default() -> Self {
        Self {
            provider: MessagingProvider::default(),
            slow_retry_first_seconds: 5,
            slow_retry_max_seconds: 1800,
            slow_retry_attempts: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum StorageProvider {
    #[default]
    Local,
    S3,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct StorageSettings {
    pub provider: StorageProvider,
    /// The local store's directory (`Storage__Provider=Local`).
    pub local_dir: PathBuf,
    /// The URL clients reach this gateway at, for the local store's signed URLs.
    /// Default: `http://<listen address>`.
    pub public_url: Option<String>,
    /// Uploads larger than this are multipart.
    pub multipart_threshold_bytes: u64,
    /// Part size of multipart uploads (at least 5 MiB, S3's minimum).
    pub part_size_bytes: u64,
    /// Uploaded slides up to this size are copied to their immutable key with one CopyObject;
    /// larger ones part by part (S3's single-copy limit is 5 GiB, the default).
    pub copy_single_max_bytes: u64,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            provider: StorageProvider::Local,
            local_dir: PathBuf::from(".mira/blobs"),
            public_url: None,
            multipart_threshold_bytes: 64 * 1024 * 1024,
            part_size_bytes: 16 * 1024 * 1024,
            copy_single_max_bytes: 5 << 30,
        }
    }
}

/// The HTTP API's own limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct ApiSettings {
    /// Largest JSON request body; larger gets 413.
    pub max_body_bytes: u64,
    /// Attempts each submitted job may use before failing for good.
    pub job_max_attempts: u32,
    /// Clock skew allowed on a token's `exp` and `nbf`.
    pub token_leeway_seconds: u64,
    /// The JWKS is fetched again for an unknown `kid` at most this often.
    pub jwks_min_refresh_seconds: u64,
    /// An `Idempotency-Key` names its resource for this long; then the key may be used again
    /// and the stored fingerprint is deleted.
    pub idempotency_retention_hours: u64,
    /// A connection must send a request's whole header block within this long of opening, or
    /// of its previous answer on a kept-alive connection, else it is closed (slowloris; so it
    /// also bounds the wait between requests). Behind a load balancer, keep it above the
    /// balancer's idle timeout (Pulumi: 3660 behind the ALB's 3600).
    pub header_read_timeout_seconds: u64,
    /// A connection with no bytes in or out for this long is closed once no request is in
    /// flight. Behind a load balancer, keep it above the balancer's own idle timeout (Pulumi:
    /// 3660 behind the ALB's 3600).
    pub idle_timeout_seconds: u64,
    /// The most connections served at once; more wait in the listen backlog until one closes.
    /// WebSockets leave this count once upgraded (they have their own buffer and send timeout).
    pub max_connections: u32,
    /// Requests per second allowed to one client (by address, see `ForwardedForHops`), with
    /// bursts of twice that; more get 429 with `Retry-After`. 0 turns the limit off.
    pub requests_per_second: u32,
    /// How many proxies in front of the gateway append to `X-Forwarded-For` (1 behind a load
    /// balancer): the client is the address that many entries from the right. 0: the peer.
    pub forwarded_for_hops: u32,
    /// On shutdown, connections with a request in flight get this long to finish.
    pub shutdown_grace_seconds: u64,
    /// Where `/metrics` is served: an address of its own (`127.0.0.1:9464`), which operators'
    /// scrapers reach and clients do not. Unset: `/metrics` is on the API's listener only with
    /// `MetricsToken`, and 404 without.
    pub metrics_listen: Option<String>,
    /// A bearer token `/metrics` on the API's listener asks for.
    pub metrics_token: Option<Secret>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            job_max_attempts: 3,
            token_leeway_seconds: 60,
            jwks_min_refresh_seconds: 30,
            idempotency_retention_hours: 24,
            header_read_timeout_seconds: 10,
            idle_timeout_seconds: 75,
            max_connections: 1024,
            requests_per_second: 100,
            forwarded_for_hops: 0,
            shutdown_grace_seconds: 10,
            metrics_listen: None,
            metrics_token: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingSettings {
    #[serde(rename = "XRay")]
    pub xray: XRaySettings,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct XRaySettings {
    pub enabled: bool,
    pub service_name: String,
}

impl Default for XRaySettings {
    fn default() -> Self {
        Self {
            enabled: false,
            service_name: "mira".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct RealtimeSettings {
    /// The WebSocket URL the SPA should use, when it is not this gateway's own `/ws`.
    pub web_socket_url: Option<String>,
    /// Changes buffered for each socket; a socket that falls further behind is closed.
    pub client_buffer: u32,
    /// A socket that does not take a message within this time is closed.
    pub send_timeout_seconds: u64,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        Self {
            web_socket_url: None,
            client_buffer: 1024,
            send_timeout_seconds: 10,
        }
    }
}

/// Where per-subject data keys live: a local directory (`mira dev`, single-machine installs),
/// created by `mira keys init`; production uses KMS (`AWS__KMS__KeyId`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct KeyringSettings {
    pub local_dir: PathBuf,
}

impl Default for KeyringSettings {
    fn default() -> Self {
        Self {
            local_dir: PathBuf::from(".mira/keyring"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct DatabaseSettings {
    pub max_connections: u32,
    pub connect_timeout_seconds: u64,
    /// The schema owner, for `mira migrate` only (default: `DATABASE_URL`). Every other process
    /// connects with `DATABASE_URL` as a role that owns nothing.
    pub migration_url: Option<Secret>,
    /// Each process's own login (ADR 0012): `Database__Logins__Api`, `…__Relay`,
    /// `…__Projector`, `…__Handlers`, `…__Worker`.
    pub logins: DatabaseLogins,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            max_connections: 20,
            connect_timeout_seconds: 5,
            migration_url: None,
            logins: DatabaseLogins::default(),
        }
    }
}

/// The URL each process connects with, as its own login role (ADR 0012). A process that runs
/// several of them (`mira dev`, `mira serve` with roles) opens one pool per login; one left
/// unset connects with `DATABASE_URL`. `mira migrate` creates each login from its URL (the
/// user, and the password when the URL has one), or `mira_svc_<process>` when unset.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct DatabaseLogins {
    pub api: Option<Secret>,
    pub relay: Option<Secret>,
    pub projector: Option<Secret>,
    pub handlers: Option<Secret>,
    pub worker: Option<Secret>,
}

/// A process that connects to the database as its own login, holding one group role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DbProcess {
    Api,
    Relay,
    Projector,
    Handlers,
    Worker,
}

impl DbProcess {
    pub const ALL: [DbProcess; 5] = [Self::Api, Self::Relay, Self::Projector, Self::Handlers, Self::Worker];

    pub fn name(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Relay => "relay",
            Self::Projector => "projector",
            Self::Handlers => "handlers",
            Self::Worker => "worker",
        }
    }

    /// The group role holding this process's grants (migration 0014).
    pub fn group_role(self) -> &'static str {
        match self {
            Self::Api => "mira_api",
            Self::Relay => "mira_relay",
            Self::Projector => "mira_projector",
            Self::Handlers => "mira_handlers",
            Self::Worker => "mira_worker",
        }
    }

    /// The login `mira migrate` creates when the process's URL does not name one.
    pub fn default_login(self) -> String {
        format!("mira_svc_{}", self.name())
    }

    /// The setting that holds the process's URL.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Api => "Database__Logins__Api",
            Self::Relay => "Database__Logins__Relay",
            Self::Projector => "Database__Logins__Projector",
            Self::Handlers => "Database__Logins__Handlers",
            Self::Worker => "Database__Logins__Worker",
        }
    }
}

impl DatabaseLogins {
    pub fn get(&self, p: DbProcess) -> Option<&Secret> {
        match p {
            DbProcess::Api => self.api.as_ref(),
            DbProcess::Relay => self.relay.as_ref(),
            DbProcess::Projector => self.projector.as_ref(),
            DbProcess::Handlers => self.handlers.as_ref(),
            DbProcess::Worker => self.worker.as_ref(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, rename_all = "PascalCase", deny_unknown_fields)]
pub struct AuditSettings {
    /// The Ed25519 checkpoint signing key (hex), created by `mira keys init`; its public half
    /// is written beside it as `<file>.pub`. It must not live in the database.
    pub signing_key_file: PathBuf,
    /// The signing key in AWS Secrets Manager (64 hex digits), instead of the file.
    pub signing_key_secret_id: Option<String>,
    /// A directory every checkpoint is copied to (`mira dev`, tests, write-once mounts).
    pub witness_dir: Option<PathBuf>,
    /// An S3 bucket every checkpoint is copied to (Object Lock in production).
    pub witness_bucket: Option<String>,
    /// The key prefix in `WitnessBucket`.
    pub witness_prefix: String,
    /// Each call to the witness bucket gives up after this many seconds (connecting included),
    /// so a witness that hangs delays only the checkpoint, never the relay's publishing.
    pub witness_timeout_seconds: u64,
    /// The trusted public key for `mira audit verify`. Default: `<SigningKeyFile>.pub`.
    pub public_key_file: Option<PathBuf>,
    /// The trusted public key itself (64 hex digits, as `mira keys init` prints it): for a
    /// verifier that must not read the signing key's secret (the scheduled verification, the
    /// API's per-job check on AWS).
    pub public_key: Option<String>,
    /// The relay writes a checkpoint after this many events…
    pub checkpoint_every_events: u64,
    /// …or after this many seconds, whichever comes first.
    pub checkpoint_every_seconds: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            signing_key_file: PathBuf::from(".mira/audit-signing.key"),
            signing_key_secret_id: None,
            witness_dir: None,
            witness_bucket: None,
            witness_prefix: "checkpoints/".into(),
            witness_timeout_seconds: 10,
            public_key_file: None,
            public_key: None,
            checkpoint_every_events: 1000,
            checkpoint_every_seconds: 60,
        }
    }
}

/// Sections read from the environment (`Section__Key`).
const SECTIONS: &[&str] = &[
    "Database",
    "Audit",
    "Keyring",
    "AWS",
    "Messaging",
    "Storage",
    "Tracing",
    "Realtime",
    "Api",
    "Worker",
    "Jobs",
    "Roles",
    "Web",
];

/// How a process writes its log lines (`Logging__Format`): read on its own, before the other
/// settings, because logging starts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One human-readable line per record (the default).
    Text,
    /// One JSON object per line, for CloudWatch Logs Insights and other collectors.
    Json,
}

impl LogFormat {
    /// `Logging__Format` from `env`: `text` (the default when unset or empty) or `json`.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        match env("Logging__Format").as_deref().map(str::trim) {
            None | Some("") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("text") => Ok(Self::Text),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(Self::Json),
            Some(v) => Err(ConfigError::Invalid {
                setting: "Logging__Format".into(),
                reason: format!("must be text or json, not {v:?}"),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid setting {setting}: {reason}")]
    Invalid { setting: String, reason: String },
}

fn env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(b) = raw.parse::<bool>() {
        toml::Value::Boolean(b)
    } else {
        toml::Value::String(raw.to_owned())
    }
}

impl Settings {
    /// Loads defaults, then `file` (if any), then `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string(),
                })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
                })?
            }
            None => toml::Table::new(),
        };
        let env: BTreeMap<String, String> = env.into_iter().collect();
        for (key, raw) in &env {
            // An image built without a commit sets `MIRA_COMMIT=`: that says none.
            if key == "MIRA_COMMIT" && raw.is_empty() {
                continue;
            }
            // Taken as they are: a commit of digits alone is still a string.
            if key == "DATABASE_URL" || key == "MIRA_COMMIT" {
                table.insert(key.clone(), toml::Value::String(raw.clone()));
                continue;
            }
            let parts: Vec<&str> = key.split("__").collect();
            if parts.len() < 2 || !SECTIONS.contains(&parts[0]) {
                continue;
            }
            let mut node = &mut table;
            for p in &parts[..parts.len() - 1] {
                let entry = node
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                node = match entry {
                    toml::Value::Table(t) => t,
                    _ => {
                        return Err(ConfigError::Invalid {
                            setting: key.clone(),
                            reason: format!("{p} is a value, not a section"),
                        })
                    }
                };
            }
            node.insert(parts[parts.len() - 1].to_owned(), env_value(raw));
        }
        let settings: Settings =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
                setting: e.path().to_string().replace('.', "__"),
                reason: e.inner().to_string(),
            })?;
        let mut settings = settings;
        settings.validate()?;
        let cwd = std::env::current_dir().map_err(|e| ConfigError::Invalid {
            setting: "(working directory)".into(),
            reason: e.to_string(),
        })?;
        settings.absolutize(&cwd);
        Ok(settings)
    }

    /// Makes every path absolute against `base`, so that a process that changes directory, a
    /// child process and a log line all mean the same file.
    pub fn absolutize(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        abs(&mut self.storage.local_dir);
        abs(&mut self.keyring.local_dir);
        abs(&mut self.audit.signing_key_file);
        if let Some(p) = &mut self.audit.public_key_file {
            abs(p);
        }
        if let Some(p) = &mut self.audit.witness_dir {
            abs(p);
        }
        if let Some(p) = &mut self.web.dir {
            abs(p);
        }
    }

    /// The URL `process` connects with: its `Database__Logins__…`, else `DATABASE_URL`; and
    /// the setting it came from.
    pub fn login_url(&self, process: DbProcess) -> Result<(&str, &'static str), ConfigError> {
        match self.database.logins.get(process) {
            Some(u) => Ok((u.expose(), process.setting())),
            None => Ok((self.database_url()?, "DATABASE_URL")),
        }
    }

    /// The owner's URL for `mira migrate`: `Database__MigrationUrl`, else `DATABASE_URL`.
    pub fn migration_url(&self) -> Result<&str, ConfigError> {
        match &self.database.migration_url {
            Some(u) => Ok(u.expose()),
            None => self.database_url(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting: &str, reason: &str| {
            Err(ConfigError::Invalid {
                setting: setting.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.database.max_connections == 0 {
            return invalid("Database__MaxConnections", "must be at least 1");
        }
        if self.database.connect_timeout_seconds == 0 {
            return invalid("Database__ConnectTimeoutSeconds", "must be at least 1");
        }
        if self.audit.checkpoint_every_events == 0 {
            return invalid("Audit__CheckpointEveryEvents", "must be at least 1");
        }
        if self.audit.checkpoint_every_seconds == 0 {
            return invalid("Audit__CheckpointEverySeconds", "must be at least 1");
        }
        if !self.aws.sns.topic_name.ends_with(".fifo") {
            return invalid("AWS__SNS__TopicName", "must name a FIFO topic (ending in .fifo)");
        }
        if self.aws.sqs.queue_prefix.is_empty() {
            return invalid("AWS__SQS__QueuePrefix", "must not be empty");
        }
        if self.aws.s3.presigned_url_expiration_minutes == 0 || self.aws.s3.presigned_url_expiration_minutes > 10_080 {
            return invalid(
                "AWS__S3__PresignedUrlExpirationMinutes",
                "must be 1 to 10080 (seven days)",
            );
        }
        if self.storage.part_size_bytes < 5 * 1024 * 1024 {
            return invalid(
                "Storage__PartSizeBytes",
                "must be at least 5 MiB (5242880), S3's minimum part size",
            );
        }
        if self.storage.copy_single_max_bytes == 0 || self.storage.copy_single_max_bytes > 5 << 30 {
            return invalid(
                "Storage__CopySingleMaxBytes",
                "must be 1 to 5368709120 (5 GiB, S3's limit)",
            );
        }
        if self.storage.multipart_threshold_bytes == 0 {
            return invalid("Storage__MultipartThresholdBytes", "must be at least 1");
        }
        if self.realtime.client_buffer == 0 {
            return invalid("Realtime__ClientBuffer", "must be at least 1");
        }
        if self.realtime.send_timeout_seconds == 0 {
            return invalid("Realtime__SendTimeoutSeconds", "must be at least 1");
        }
        if !(5..=86_400).contains(&self.worker.lease_seconds) {
            return invalid("Worker__LeaseSeconds", "must be 5 to 86400");
        }
        if let Err(why) = Role::parse_list(&self.roles.enabled) {
            return invalid("Roles__Enabled", &why);
        }
        if let Err(why) = self.jobs.stat_groups() {
            return invalid("Jobs__StatGroups", &why);
        }
        if !(1..=10_000).contains(&self.jobs.admission_window) {
            return invalid("Jobs__AdmissionWindow", "must be 1 to 10000");
        }
        if !(1..=24 * 366).contains(&self.api.idempotency_retention_hours) {
            return invalid("Api__IdempotencyRetentionHours", "must be 1 to 8784 (a year)");
        }
        if self.api.max_body_bytes < 1024 {
            return invalid("Api__MaxBodyBytes", "must be at least 1024");
        }
        if self.api.job_max_attempts == 0 {
            return invalid("Api__JobMaxAttempts", "must be at least 1");
        }
        if !(1..=86_400).contains(&self.api.header_read_timeout_seconds) {
            return invalid("Api__HeaderReadTimeoutSeconds", "must be 1 to 86400");
        }
        if !(5..=43_200).contains(&self.web.idle_sign_out_seconds) {
            return invalid("Web__IdleSignOutSeconds", "must be 5 to 43200 (seconds)");
        }
        if !(1..=86_400).contains(&self.api.idle_timeout_seconds) {
            return invalid("Api__IdleTimeoutSeconds", "must be 1 to 86400");
        }
        if self.api.max_connections == 0 {
            return invalid("Api__MaxConnections", "must be at least 1");
        }
        if self.api.forwarded_for_hops > 8 {
            return invalid("Api__ForwardedForHops", "must be 0 to 8");
        }
        if let Some(t) = &self.api.metrics_token {
            if t.expose().len() < 16 {
                return invalid("Api__MetricsToken", "must be at least 16 characters");
            }
        }
        if !(1..=3600).contains(&self.worker.progress_seconds) {
            return invalid("Worker__ProgressSeconds", "must be 1 to 3600");
        }
        if !(1..=86_400).contains(&self.worker.stall_seconds) {
            return invalid("Worker__StallSeconds", "must be 1 to 86400");
        }
        if !(1_000_000..=1_000_000_000_000).contains(&self.worker.max_slide_pixels) {
            return invalid("Worker__MaxSlidePixels", "must be 1000000 to 1000000000000");
        }
        if self.worker.memory_budget_bytes < 256 << 20 {
            return invalid("Worker__MemoryBudgetBytes", "must be at least 268435456 (256 MiB)");
        }
        if !(1..=86_400).contains(&self.worker.seconds_per_gigapixel) {
            return invalid("Worker__SecondsPerGigapixel", "must be 1 to 86400");
        }
        if !((64 << 10)..=(5 << 30)).contains(&self.worker.layer_part_bytes) {
            return invalid(
                "Worker__LayerPartBytes",
                "must be 65536 to 5368709120 (S3 wants 5242880 at least)",
            );
        }
        if !(1..=64).contains(&self.worker.layer_upload_parallel) {
            return invalid("Worker__LayerUploadParallel", "must be 1 to 64");
        }
        if !(60..=7 * 86_400).contains(&self.worker.max_attempt_seconds) {
            return invalid("Worker__MaxAttemptSeconds", "must be 60 to 604800 (a week)");
        }
        if !(self.jobs.slide_wait_hours > 0.0 && self.jobs.slide_wait_hours <= 24.0 * 366.0) {
            return invalid("Jobs__SlideWaitHours", "must be more than 0 and at most 8784 (a year)");
        }
        if self.messaging.slow_retry_first_seconds == 0 || self.messaging.slow_retry_first_seconds > 3600 {
            return invalid("Messaging__SlowRetryFirstSeconds", "must be 1 to 3600");
        }
        if self.messaging.slow_retry_max_seconds < self.messaging.slow_retry_first_seconds
            || self.messaging.slow_retry_max_seconds > 86_400
        {
            return invalid(
                "Messaging__SlowRetryMaxSeconds",
                "must be at least Messaging__SlowRetryFirstSeconds and at most 86400 (a day)",
            );
        }
        if !(1..=100).contains(&self.messaging.slow_retry_attempts) {
            return invalid("Messaging__SlowRetryAttempts", "must be 1 to 100");
        }
        if self.worker.drain_seconds > 3600 {
            return invalid("Worker__DrainSeconds", "must be 0 to 3600");
        }
        let l = &self.database.logins;
        for (setting, url) in [
            ("DATABASE_URL", &self.database_url),
            ("Database__MigrationUrl", &self.database.migration_url),
            ("Database__Logins__Api", &l.api),
            ("Database__Logins__Relay", &l.relay),
            ("Database__Logins__Projector", &l.projector),
            ("Database__Logins__Handlers", &l.handlers),
            ("Database__Logins__Worker", &l.worker),
        ] {
            if let Some(url) = url {
                if !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://")) {
                    return invalid(setting, "must be a postgres:// URL");
                }
            }
        }
        if self.audit.witness_dir.is_some() && self.audit.witness_bucket.is_some() {
            return invalid(
                "Audit__WitnessBucket",
                "set either Audit__WitnessBucket or Audit__WitnessDir, not both",
            );
        }
        if let Some(commit) = &self.commit {
            if commit.len() > 64 || !commit.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
                return invalid(
                    "MIRA_COMMIT",
                    "must be at most 64 of A-Z, a-z, 0-9, '.', '_' and '-' (a commit id)",
                );
            }
        }
        if self.audit.witness_bucket.as_deref() == Some("") {
            return invalid("Audit__WitnessBucket", "must not be empty");
        }
        if let Some(k) = &self.audit.public_key {
            if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
                return invalid(
                    "Audit__PublicKey",
                    "must be 64 hex digits (the public key `mira keys init` prints)",
                );
            }
        }
        if !(1..=300).contains(&self.audit.witness_timeout_seconds) {
            return invalid("Audit__WitnessTimeoutSeconds", "must be 1 to 300");
        }
        Ok(())
    }

    pub fn database_url(&self) -> Result<&str, ConfigError> {
        self.database_url
            .as_ref()
            .map(Secret::expose)
            .ok_or_else(|| ConfigError::Invalid {
                setting: "DATABASE_URL".into(),
                reason: "is not set".into(),
            })
    }

    /// Token validation settings (DESIGN §7). The issuer and JWKS URL derive from the pool
    /// unless set; the app client id is required.
    pub fn auth_config(&self) -> Result<AuthConfig, ConfigError> {
        let c = &self.aws.cognito;
        let missing = |setting: &str, reason: &str| ConfigError::Invalid {
            setting: setting.to_owned(),
            reason: reason.to_owned(),
        };
        let audience = c.client_id.clone().ok_or_else(|| {
            missing(
                "AWS__Cognito__ClientId",
                "is not set (the app client id, the ID token's aud)",
            )
        })?;
        let issuer = match &c.issuer {
            Some(i) => i.clone(),
            None => {
                let pool = c.user_pool_id.as_deref().ok_or_else(|| {
                    missing(
                        "AWS__Cognito__UserPoolId",
                        "is not set (or set AWS__Cognito__Issuer and AWS__Cognito__JwksUrl)",
                    )
                })?;
                let region = c
                    .region
                    .clone()
                    .or_else(|| pool.split_once('_').map(|(r, _)| r.to_owned()))
                    .or_else(|| self.aws.region.clone())
                    .ok_or_else(|| missing("AWS__Cognito__Region", "is not set"))?;
                format!("https://cognito-idp.{region}.amazonaws.com/{pool}")
            }
        };
        let jwks_url = c
            .jwks_url
            .clone()
            .unwrap_or_else(|| format!("{}/.well-known/jwks.json", issuer.trim_end_matches('/')));
        Ok(AuthConfig {
            jwks_url,
            issuer,
            audience,
            leeway: std::time::Duration::from_secs(self.api.token_leeway_seconds),
            min_refresh: std::time::Duration::from_secs(self.api.jwks_min_refresh_seconds),
        })
    }

    /// The roles `Roles__Enabled` names (validated when the settings were read).
    pub fn enabled_roles(&self) -> Vec<Role> {
        Role::parse_list(&self.roles.enabled).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_log_format_is_text_unless_json_and_anything_else_names_the_setting() {
        use super::LogFormat;
        let with = |v: Option<&str>| {
            let v = v.map(str::to_owned);
            LogFormat::from_env(move |k| if k == "Logging__Format" { v.clone() } else { None })
        };
        assert_eq!(with(None).unwrap(), LogFormat::Text);
        assert_eq!(with(Some("")).unwrap(), LogFormat::Text);
        assert_eq!(with(Some("JSON")).unwrap(), LogFormat::Json);
        assert_eq!(with(Some("text")).unwrap(), LogFormat::Text);
        let err = with(Some("yaml")).unwrap_err().to_string();
        assert!(err.contains("Logging__Format") && err.contains("yaml"), "{err}");
    }

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let dir = std::env::temp_dir().join(format!("mira-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("mira.toml");
        std::fs::write(
            &file,
            "[Audit]\nCheckpointEveryEvents = 50\nCheckpointEverySeconds = 9\n",
        )
        .unwrap();
        let s = Settings::load(
            Some(&file),
            env(&[
                ("Audit__CheckpointEverySeconds", "7"),
                ("HOME", "/root"),
                ("AWS__Region", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.audit.checkpoint_every_events, 50);
        assert_eq!(s.audit.checkpoint_every_seconds, 7);
        assert_eq!(s.database.max_connections, 20);
        assert!(s.database_url.is_none());
        // Paths are absolute once read: a relative default means the working directory.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(s.audit.signing_key_file, cwd.join(".mira/audit-signing.key"));
        assert_eq!(s.keyring.local_dir, cwd.join(".mira/keyring"));
        assert!(s.storage.local_dir.is_absolute());
        let s = Settings::load(
            None,
            env(&[("Audit__WitnessDir", "w"), ("Audit__PublicKeyFile", "/k.pub")]),
        )
        .unwrap();
        assert_eq!(s.audit.witness_dir, Some(cwd.join("w")));
        assert_eq!(s.audit.public_key_file.as_deref(), Some(Path::new("/k.pub")));
    }

    #[test]
    fn roles_come_from_a_setting_too() {
        let s = Settings::load(None, env(&[("Roles__Enabled", "relay, Projector,handlers,relay")])).unwrap();
        assert_eq!(s.enabled_roles(), [Role::Relay, Role::Projector, Role::Handlers]);
        assert!(Settings::load(None, env(&[])).unwrap().enabled_roles().is_empty());
        let err = Settings::load(None, env(&[("Roles__Enabled", "relay,worker")])).unwrap_err();
        assert!(
            err.to_string().contains("Roles__Enabled") && err.to_string().contains("worker"),
            "{err}"
        );
    }

    #[test]
    fn the_migration_url_falls_back_to_database_url() {
        let s = Settings::load(None, env(&[("DATABASE_URL", "postgres://app@h/db")])).unwrap();
        assert_eq!(s.migration_url().unwrap(), "postgres://app@h/db");
        let s = Settings::load(
            None,
            env(&[
                ("DATABASE_URL", "postgres://app@h/db"),
                ("Database__MigrationUrl", "postgres://owner:pw@h/db"),
            ]),
        )
        .unwrap();
        assert_eq!(s.migration_url().unwrap(), "postgres://owner:pw@h/db");
        assert!(!format!("{s:?}").contains("pw@"));
        let err = Settings::load(None, env(&[("Database__MigrationUrl", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("Database__MigrationUrl"), "{err}");
        let err = Settings::load(None, env(&[("Audit__WitnessDir", "/w"), ("Audit__WitnessBucket", "b")])).unwrap_err();
        assert!(err.to_string().contains("Audit__WitnessBucket"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let err = Settings::load(None, env(&[("Audit__CheckpointEveryEvents", "lots")])).unwrap_err();
        assert!(err.to_string().contains("Audit__CheckpointEveryEvents"), "{err}");
        let err = Settings::load(None, env(&[("Audit__CheckpointEveryEvents", "0")])).unwrap_err();
        assert!(err.to_string().contains("Audit__CheckpointEveryEvents"), "{err}");
        let err = Settings::load(None, env(&[("Audit__NoSuchThing", "1")])).unwrap_err();
        assert!(err.to_string().contains("NoSuchThing"), "{err}");
        let err = Settings::load(None, env(&[("AWS__SNS__TopicName", "events")])).unwrap_err();
        assert!(err.to_string().contains("AWS__SNS__TopicName"), "{err}");
        let err = Settings::load(None, env(&[("Messaging__Provider", "Kafka")])).unwrap_err();
        assert!(err.to_string().contains("Messaging__Provider"), "{err}");
        let s = Settings::load(
            None,
            env(&[
                ("AWS__SQS__QueuePrefix", "lab-"),
                ("Messaging__Provider", "Aws"),
                ("AWS__Region", "eu-west-1"),
            ]),
        )
        .unwrap();
        assert_eq!(s.aws.sqs.queue_prefix, "lab-");
        assert_eq!(s.messaging.provider, MessagingProvider::Aws);
        assert_eq!(s.aws.region.as_deref(), Some("eu-west-1"));
        let err = Settings::load(None, env(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
        for bad in ["4", "43201", "0", "soon"] {
            let err = Settings::load(None, env(&[("Web__IdleSignOutSeconds", bad)])).unwrap_err();
            assert!(err.to_string().contains("Web__IdleSignOutSeconds"), "{bad}: {err}");
        }
        let s = Settings::load(None, env(&[("Web__IdleSignOutSeconds", "5")])).unwrap();
        assert_eq!(s.web.idle_sign_out(), std::time::Duration::from_secs(5));
    }

    #[test]
    fn the_slide_wait_takes_fractions_of_an_hour_and_the_stall_guard_is_checked() {
        let s = Settings::load(None, env(&[])).unwrap();
        assert_eq!(s.jobs.slide_wait(), std::time::Duration::from_secs(24 * 3600));
        assert_eq!((s.worker.stall_seconds, s.worker.test_hang_at_band), (300, 0));
        let s = Settings::load(None, env(&[("Jobs__SlideWaitHours", "0.001")])).unwrap();
        assert_eq!(s.jobs.slide_wait(), std::time::Duration::from_millis(3600));
        let s = Settings::load(None, env(&[("Jobs__SlideWaitHours", "2")])).unwrap();
        assert_eq!(s.jobs.slide_wait(), std::time::Duration::from_secs(7200));
        for bad in ["0", "-1", "soon", "NaN", "inf", "9000"] {
            let err = Settings::load(None, env(&[("Jobs__SlideWaitHours", bad)])).unwrap_err();
            assert!(err.to_string().contains("Jobs__SlideWaitHours"), "{bad}: {err}");
        }
        for (k, v) in [("Worker__StallSeconds", "0"), ("Worker__MaxAttemptSeconds", "10")] {
            let err = Settings::load(None, env(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
    }

    #[test]
    fn the_commit_is_read_as_text_and_checked() {
        assert_eq!(Settings::load(None, env(&[])).unwrap().commit, None);
        assert_eq!(Settings::load(None, env(&[("MIRA_COMMIT", "")])).unwrap().commit, None);
        let s = Settings::load(None, env(&[("MIRA_COMMIT", "0123456")])).unwrap();
        assert_eq!(s.commit.as_deref(), Some("0123456"));
        let sha = "3b168db2f0c4e1a9d8e7f6a5b4c3d2e1f0a9b8c7";
        assert_eq!(
            Settings::load(None, env(&[("MIRA_COMMIT", sha)]))
                .unwrap()
                .commit
                .as_deref(),
            Some(sha)
        );
        for bad in [" ", "a b", "x\"y", "é", &"f".repeat(65)] {
            let err = Settings::load(None, env(&[("MIRA_COMMIT", bad)])).unwrap_err();
            assert!(err.to_string().contains("MIRA_COMMIT"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings::load(None, env(&[("DATABASE_URL", "postgres://u:hunter2@h/db")])).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.database_url().unwrap(), "postgres://u:hunter2@h/db");
    }
}
