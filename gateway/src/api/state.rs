//! What every endpoint shares ([`AppState`]), who may call what ([`READERS`],
//! [`WRITERS`]), and how the caller is known ([`Identity`] from the bearer token).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use mira_events::Keyring;
use mira_projections::ReadModels;
use sqlx::PgPool;

use super::auth::{Identity, JwksVerifier, Role};
use super::problem::ApiError;
use super::{hub, metrics};
use crate::blob::{BlobStore, LocalBlobs};
use crate::commands::Commands;

/// Everything an endpoint needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

pub struct Services {
    pub pool: PgPool,
    pub commands: Commands,
    pub read: ReadModels,
    pub auth: Arc<JwksVerifier>,
    pub blobs: Arc<dyn BlobStore>,
    /// Set when blobs are the local store: the gateway then serves its signed URLs.
    pub local_blobs: Option<Arc<LocalBlobs>>,
    pub keyring: Arc<dyn Keyring>,
    /// Checked by `/readyz` when the process runs with a bus.
    pub bus: Option<Arc<dyn mira_bus::Bus>>,
    pub metrics: metrics::Metrics,
    pub limits: Limits,
    /// Live read-model changes for `/ws`; `None` when this process does not serve them.
    pub hub: Option<hub::Hub>,
    /// `mira dev`'s local identity provider: its JWKS and its sign-in.
    pub dev_identity: Option<Arc<dyn DevIdentity>>,
    /// The browser app and how it signs in.
    pub web: WebConfig,
    /// The audit key and witness for `GET /api/jobs/{id}/verify`, or why there are none.
    pub audit: Result<Arc<mira_keys::AuditVerifier>, String>,
    /// The key of the idempotency fingerprints, from the keyring on first use.
    pub idempotency_key: tokio::sync::OnceCell<[u8; 32]>,
    /// The key that seals WebSocket resume cursors, from the keyring on first use.
    pub cursor_key: tokio::sync::OnceCell<[u8; 32]>,
    /// The key that seals browser session cookies, from the keyring on first use.
    pub session_key: tokio::sync::OnceCell<[u8; 32]>,
    /// What `GET /api/version` answers.
    pub version: Version,
    /// Requests per client (`Api__RequestsPerSecond`); `None`: no limit.
    pub rate_limiter: Option<Arc<super::limits::RateLimiter>>,
    /// Who may read `/metrics` on the API's listener.
    pub metrics_access: MetricsAccess,
    /// Succeeded jobs' result layers and their tile indexes, read once.
    pub layers: super::layercache::LayerCache,
}

/// Where `/metrics` answers (`Api__MetricsListen`, `Api__MetricsToken`): a tenant must not
/// watch the volume of every other tenant's work.
#[derive(Debug, Clone, Default)]
pub enum MetricsAccess {
    /// Not on the API's listener: on `Api__MetricsListen`, or nowhere.
    #[default]
    Elsewhere,
    /// On the API's listener, for `Authorization: Bearer <token>`.
    Token(mira_config::Secret),
}

/// The release this process runs: its version and the commit it was built from, which a
/// deployment polls for until every task answers the one it rolled out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Version {
    #[schema(value_type = String)]
    pub version: &'static str,
    /// `MIRA_COMMIT`, or `unknown` when the build did not say.
    pub commit: String,
}

impl Version {
    pub fn new(commit: Option<&str>) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            commit: commit.filter(|c| !c.is_empty()).unwrap_or("unknown").to_owned(),
        }
    }
}

/// What the API needs of `mira dev`'s local identity provider.
pub trait DevIdentity: Send + Sync {
    fn jwks(&self) -> &serde_json::Value;
    /// An ID token shaped like Cognito's, valid for `ttl`.
    fn token(&self, sub: &str, tenant: &str, groups: &[String], ttl: std::time::Duration) -> anyhow::Result<String>;
}

/// How the app signs in and where it finds the live updates.
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    /// The built app; `None` serves no app.
    pub dir: Option<PathBuf>,
    /// The Hosted UI's domain, the app client and the redirect URL, when signing in with
    /// Cognito.
    pub cognito: Option<CognitoSignIn>,
    /// `Realtime__WebSocketUrl`, when the socket is not this gateway's `/ws`.
    pub ws_url: Option<String>,
    /// Origins the app may connect to besides its own (the blob store's, the Hosted UI's).
    pub connect_origins: Vec<String>,
    /// `mira dev`'s sign-in answers only loopback clients unless this is set.
    pub allow_remote_dev_sign_in: bool,
    /// `Web__IdleSignOutSeconds`.
    pub idle_sign_out: std::time::Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CognitoSignIn {
    pub domain: String,
    pub client_id: String,
    pub redirect_url: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest JSON body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Attempts a submitted job may use.
    pub job_max_attempts: u32,
    /// Who may submit a STAT job (`Jobs__StatGroups`).
    pub stat_roles: super::auth::RoleSet,
    /// A WebSocket client that takes longer than this for one message is closed.
    pub ws_send_timeout: std::time::Duration,
    /// How long an `Idempotency-Key` names its resource.
    pub idempotency_retention: std::time::Duration,
    /// The listener's connection limits.
    pub conn: super::limits::ConnLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            job_max_attempts: 3,
            stat_roles: super::auth::RoleSet::of(["pathologist"]),
            ws_send_timeout: std::time::Duration::from_secs(10),
            idempotency_retention: std::time::Duration::from_secs(24 * 3600),
            conn: Default::default(),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.0
    }
}

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppState")
    }
}

/// The caller, from `Authorization: Bearer <ID token>`. Any failure is a 401 that says which
/// check failed (RFC 6750).
impl FromRequestParts<AppState> for Identity {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .ok_or(ApiError::unauthenticated())?;
        match state.auth.verify(token).await {
            Ok(id) => {
                tracing::Span::current().record("tenant_id", id.tenant.as_str());
                Ok(id)
            }
            Err(e) => {
                tracing::debug!(reason = %e, "token refused");
                Err(ApiError::invalid_token(e.reason()))
            }
        }
    }
}

impl Identity {
    /// The context of a command this caller sends.
    pub fn context(&self, idempotency_key: Option<&str>) -> mira_events::CommandContext {
        let mut c =
            mira_events::CommandContext::new(self.tenant.clone(), mira_events::Actor::user(self.subject.clone()));
        // The request's trace: every event of the command carries it to whoever acts on it.
        c.traceparent = mira_telemetry::traceparent();
        match idempotency_key {
            Some(k) => c.with_idempotency_key(k),
            None => c,
        }
    }

    /// 403 unless the caller holds one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.has_any(roles) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this needs one of the roles {}",
                roles
                    .iter()
                    .map(|r| serde_json::to_value(r)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

pub const WRITERS: &[Role] = &[Role::Pathologist, Role::Admin];
pub const READERS: &[Role] = &[Role::Pathologist, Role::Auditor, Role::Admin];
