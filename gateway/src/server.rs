//! Wiring for `mira serve` and `mira dev`: builds the application state from the settings and
//! runs the API with the roles asked for (`--with`, or `Roles__Enabled`) in one process, all
//! stopped by one cancellation token. Each role is started by [`crate::roles`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mira_bus::Bus;
use mira_eventlog::EventLog;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::api::auth::JwksVerifier;
use crate::api::{AppState, Limits, Services};
use crate::blob::{BlobStore, LocalBlobs, S3Blobs, UploadPolicy};
use crate::commands::Commands;
use crate::config::{DbProcess, MessagingProvider, Settings, StorageProvider};

pub use crate::roles::Role;

/// What runs beside the API.
#[derive(Clone, Default)]
pub struct Options {
    pub roles: Vec<Role>,
    /// `mira dev`'s local identity provider: its JWKS is served at
    /// [`crate::api::DEV_JWKS_PATH`], its sign-in at `/dev/sign-in`.
    pub dev_identity: Option<Arc<dyn crate::api::DevIdentity>>,
    /// An in-memory bus made by the caller (to watch its queues); default: one from the
    /// settings and the roles.
    pub bus: Option<mira_bus::memory::MemoryBus>,
}

impl Options {
    /// Every role in this process, as `mira dev` runs it.
    pub fn everything(dev_identity: Option<Arc<dyn crate::api::DevIdentity>>) -> Self {
        Self {
            roles: Role::ALL.to_vec(),
            dev_identity,
            bus: None,
        }
    }
}

/// The bus this process uses: SNS/SQS, or a fresh in-memory bus (which only carries events
/// between roles of this same process) with a queue for each consuming role in `roles`.
pub async fn bus(settings: &Settings, roles: &[Role]) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(match settings.messaging.provider {
        MessagingProvider::Aws => {
            let sdk = mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await;
            Arc::new(mira_bus::aws::AwsBus::connect(&sdk, &mira_bus::Names::from_settings(settings), None).await?)
        }
        MessagingProvider::InMemory => Arc::new(in_memory_bus(roles)),
    })
}

/// The in-memory bus for `roles`: queues for the projector and the handlers when they run
/// here, none for the worker (which runs its own).
pub fn in_memory_bus(roles: &[Role]) -> mira_bus::memory::MemoryBus {
    let consumed: Vec<mira_bus::Group> = roles
        .iter()
        .filter_map(|r| match r {
            Role::Projector => Some(mira_bus::Group::Projections),
            Role::Handlers => Some(mira_bus::Group::Handlers),
            Role::Relay => None,
        })
        .collect();
    mira_bus::memory::MemoryBus::new(Duration::from_secs(30), 10, &consumed)
}

/// The blob store the settings name. `public_url` is where clients reach this gateway (for
/// the local store's signed URLs).
pub async fn blob_store(
    settings: &Settings,
    public_url: &str,
) -> anyhow::Result<(Arc<dyn BlobStore>, Option<Arc<LocalBlobs>>)> {
    let policy = UploadPolicy {
        expires: Duration::from_secs(60 * settings.aws.s3.presigned_url_expiration_minutes as u64),
        multipart_threshold: settings.storage.multipart_threshold_bytes,
        part_size: settings.storage.part_size_bytes,
        copy_single_max: settings.storage.copy_single_max_bytes,
    };
    Ok(match settings.storage.provider {
        StorageProvider::Local => {
            let dir = &settings.storage.local_dir;
            let url = settings.storage.public_url.as_deref().unwrap_or(public_url);
            let local = Arc::new(
                LocalBlobs::open(dir, url, policy).with_context(|| format!("Storage__LocalDir {}", dir.display()))?,
            );
            (local.clone(), Some(local))
        }
        StorageProvider::S3 => {
            let bucket = settings
                .aws
                .s3
                .bucket_name
                .clone()
                .context("AWS__S3__BucketName is not set (Storage__Provider is S3)")?;
            let sdk = mira_bus::aws::sdk_config(settings.aws.region.as_deref()).await;
            (
                Arc::new(
                    S3Blobs::new(&sdk, settings.aws.s3.region.as_deref(), bucket, policy)
                        .with_results_bucket(settings.aws.s3.results_bucket_name.clone()),
                ),
                None,
            )
        }
    })
}

/// `Api__JobMaxAttempts`, within what the Job aggregate allows.
fn job_max_attempts(settings: &Settings) -> anyhow::Result<u32> {
    let (n, limit) = (settings.api.job_max_attempts, mira_aggregates::job::MAX_ATTEMPTS_LIMIT);
    if !(1..=limit).contains(&n) {
        anyhow::bail!("Api__JobMaxAttempts is {n}: it must be 1 to {limit}");
    }
    Ok(n)
}

/// The API's state from the settings.
pub async fn state(
    settings: &Settings,
    pool: PgPool,
    public_url: &str,
    bus: Option<Arc<dyn Bus>>,
    hub: Option<crate::api::hub::Hub>,
    dev_identity: Option<Arc<dyn crate::api::DevIdentity>>,
) -> anyhow::Result<AppState> {
    let job_max_attempts = job_max_attempts(settings)?;
    let auth = Arc::new(JwksVerifier::new(settings.auth_config()?));
    let keyring = mira_keys::keyring(settings, &pool).await?;
    let (blobs, local_blobs) = blob_store(settings, public_url).await?;
    Ok(AppState::new(Services {
        layers: Default::default(),
        commands: Commands::new(EventLog::new(pool.clone()), keyring.clone()),
        read: mira_projections::ReadModels::new(pool.clone()),
        pool,
        auth,
        blobs,
        local_blobs,
        keyring,
        bus,
        metrics: Default::default(),
        limits: Limits {
            max_body_bytes: settings.api.max_body_bytes as usize,
            job_max_attempts,
            // Checked when the settings were loaded (Jobs__StatGroups).
            stat_roles: crate::api::auth::RoleSet::of(settings.jobs.stat_groups().unwrap_or_default()),
            ws_send_timeout: Duration::from_secs(settings.realtime.send_timeout_seconds),
            idempotency_retention: Duration::from_secs(3600 * settings.api.idempotency_retention_hours),
            conn: crate::api::limits::ConnLimits::from_settings(settings),
        },
        idempotency_key: Default::default(),
        cursor_key: Default::default(),
        session_key: Default::default(),
        version: crate::api::Version::new(settings.commit.as_deref()),
        rate_limiter: crate::api::limits::RateLimiter::new(
            settings.api.requests_per_second,
            settings.api.forwarded_for_hops,
        ),
        metrics_access: match (&settings.api.metrics_listen, &settings.api.metrics_token) {
            (_, Some(t)) => crate::api::MetricsAccess::Token(t.clone()),
            _ => crate::api::MetricsAccess::Elsewhere,
        },
        hub,
        dev_identity,
        web: web_config(settings),
        audit: mira_keys::audit_verifier(settings)
            .await
            .map(Arc::new)
            .map_err(|e| format!("{e:#}")),
    }))
}

/// The browser app's directory and sign-in, from `Web__*` and `AWS__Cognito__ClientId`.
pub fn web_config(settings: &Settings) -> crate::api::WebConfig {
    let cognito = match (
        &settings.web.cognito_domain,
        &settings.aws.cognito.client_id,
        &settings.web.redirect_url,
    ) {
        (Some(domain), Some(client_id), Some(redirect_url)) => Some(crate::api::CognitoSignIn {
            domain: domain.trim_end_matches('/').to_owned(),
            client_id: client_id.clone(),
            redirect_url: redirect_url.clone(),
        }),
        _ => None,
    };
    let mut connect_origins = Vec::new();
    if let Some(c) = &cognito {
        connect_origins.push(c.domain.clone());
    }
    if settings.storage.provider == crate::config::StorageProvider::S3 {
        // Uploads go to presigned URLs of the bucket's own origin.
        connect_origins.push("https://*.amazonaws.com".to_owned());
    }
    if let Some(ws) = &settings.realtime.web_socket_url {
        // `wss://host:port/path` → `wss://host:port`.
        connect_origins.push(ws.split('/').take(3).collect::<Vec<_>>().join("/"));
    }
    crate::api::WebConfig {
        dir: settings.web.dir.clone(),
        cognito,
        ws_url: settings.realtime.web_socket_url.clone(),
        connect_origins,
        allow_remote_dev_sign_in: settings.web.allow_remote_dev_sign_in,
        idle_sign_out: settings.web.idle_sign_out(),
    }
}

/// Runs the API on `listener` plus `roles`, until `shutdown`. Roles drain their work in hand
/// before this returns.
pub async fn run(
    settings: &Settings,
    pool: PgPool,
    listener: tokio::net::TcpListener,
    options: &Options,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let roles = &options.roles[..];
    // The API's login holds mira_api (ADR 0012). A process that runs background roles may serve
    // on another's login (the relay's, on AWS): it answers health checks and /metrics, and
    // leaves the API's own upkeep to the API's processes.
    let api_login = mira_eventlog::migrate::holds_role(&pool, DbProcess::Api.group_role()).await?;
    if !api_login {
        let role = mira_eventlog::migrate::current_role(&pool).await.unwrap_or_default();
        if roles.is_empty() {
            anyhow::bail!(
                "the API connects as {role}, which does not hold mira_api: set Database__Logins__Api (or DATABASE_URL) to the API's login (mira_svc_api unless that setting names another; mira migrate creates it)"
            );
        }
        tracing::info!(
            role,
            "this process's login is not the API's: it serves health and metrics for its roles, and no API upkeep"
        );
    }
    let addr: SocketAddr = listener.local_addr()?;
    let public_url = format!("http://{addr}");
    let bus = if roles.is_empty() && settings.messaging.provider == MessagingProvider::InMemory {
        None
    } else {
        match &options.bus {
            Some(b) => Some(Arc::new(b.clone()) as Arc<dyn Bus>),
            None => Some(bus(settings, roles).await?),
        }
    };
    let hub = crate::api::hub::Hub::start(pool.clone(), settings.realtime.client_buffer as usize, shutdown.clone());
    let state = state(
        settings,
        pool.clone(),
        &public_url,
        bus.clone(),
        Some(hub),
        options.dev_identity.clone(),
    )
    .await?;
    let mut tasks = tokio::task::JoinSet::new();
    if api_login {
        // Expired idempotency fingerprints go: every gateway sweeps, every ten minutes; the
        // deletes are idempotent, so several gateways sweeping at once is harmless.
        let (pool, stop) = (pool.clone(), shutdown.clone());
        let retention = state.limits.idempotency_retention;
        tasks.spawn(async move {
            loop {
                match crate::api::idempotency::sweep(&pool, retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "expired idempotency keys deleted"),
                    Err(e) => tracing::warn!(error = %e, "sweeping expired idempotency keys failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
        });
    }
    if let Some(bus) = &bus {
        let ctx = crate::roles::RoleContext {
            settings: settings.clone(),
            pool: pool.clone(),
            bus: bus.clone(),
            keyring: state.keyring.clone(),
            witness_health: Default::default(),
        };
        if roles.contains(&crate::roles::Role::Relay) {
            let _ = state.metrics.witness.set(ctx.witness_health.clone());
        }
        for role in roles {
            crate::roles::spawn(*role, &ctx, &mut tasks, &shutdown).await?;
        }
    }
    if let Some(at) = &settings.api.metrics_listen {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("Api__MetricsListen: cannot listen on {at}"))?;
        tracing::info!(addr = %l.local_addr()?, "serving /metrics");
        let (router, stop) = (crate::api::metrics_router(state.clone()), shutdown.clone());
        let conn = state.limits.conn;
        tasks.spawn(async move {
            crate::api::limits::serve(l, router, conn, stop)
                .await
                .context("the metrics listener")
        });
    }
    tracing::info!(%addr, ?roles, "serving");
    let api = crate::api::serve(listener, state, shutdown.clone());
    tokio::pin!(api);
    // A role that fails stops the whole process: better a restart than a silent half.
    loop {
        tokio::select! {
            r = &mut api => {
                r.context("HTTP server")?;
                break;
            }
            Some(r) = tasks.join_next() => {
                let r = r.context("a background role panicked")?;
                if let Err(e) = r {
                    shutdown.cancel();
                    return Err(e);
                }
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.context("a background role panicked")??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn job_max_attempts_is_checked_against_the_aggregate() {
        let settings = |n: &str| {
            crate::config::Settings::load(None, vec![("Api__JobMaxAttempts".to_string(), n.to_string())]).unwrap()
        };
        assert_eq!(super::job_max_attempts(&settings("20")).unwrap(), 20);
        let e = super::job_max_attempts(&settings("21")).unwrap_err().to_string();
        assert!(e.contains("Api__JobMaxAttempts") && e.contains("1 to 20"), "{e}");
    }
}
