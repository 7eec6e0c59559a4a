//! The HTTP API (DESIGN §7): routes, shared state and the request pipeline (request id, trace
//! span, body limit, metrics). Handlers live in the submodules; every error is an
//! [`problem::ApiError`].

pub mod audit;
pub mod auth;
pub mod blobs;
pub mod extract;
pub mod idempotency;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod problem;
pub mod slides;
pub mod ws;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use mira_events::Keyring;
use mira_projections::ReadModels;
use sqlx::PgPool;
use tracing::Instrument;

use crate::blob::{BlobStore, LocalBlobs};
use crate::commands::Commands;
use auth::{Identity, JwksVerifier, Role};
use problem::ApiError;

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
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
    pub hub: Option<ws::Hub>,
    /// `mira dev`'s local identity provider's JWKS.
    pub dev_jwks: Option<serde_json::Value>,
    /// The key of the idempotency fingerprints, from the keyring on first use.
    pub idempotency_key: tokio::sync::OnceCell<[u8; 32]>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest JSON body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Attempts a submitted job may use.
    pub job_max_attempts: u32,
    /// A WebSocket client that takes longer than this for one message is closed.
    pub ws_send_timeout: std::time::Duration,
    /// How long an `Idempotency-Key` names its resource.
    pub idempotency_retention: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            job_max_attempts: 3,
            ws_send_timeout: std::time::Duration::from_secs(10),
            idempotency_retention: std::time::Duration::from_secs(24 * 3600),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
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
        let c = mira_events::CommandContext::new(self.tenant.clone(), mira_events::Actor::user(self.subject.clone()));
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

/// The request id: the caller's `x-request-id` if it is sane, else a new UUIDv7. Every
/// request runs in a span carrying it, and the response returns it.
async fn pipeline(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = %route,
        request_id = %id,
        tenant_id = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    req.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid")),
    );
    let started = std::time::Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    if res.status() == StatusCode::METHOD_NOT_ALLOWED && !res.headers().contains_key(header::CONTENT_TYPE) {
        // The router's own 405 has an empty body and, once routes are layered, no `Allow`:
        // answer problem+json like every other refusal, with the methods the route takes.
        let allow = ALLOWED_METHODS.iter().find(|(p, _)| *p == route).map(|(_, m)| *m);
        let detail = match allow {
            Some(a) => format!("{route} takes {a}"),
            None => "this endpoint does not take that method".to_owned(),
        };
        res = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", detail).into_response();
        if let Some(a) = allow {
            res.headers_mut().insert(header::ALLOW, HeaderValue::from_static(a));
        }
    }
    span.record("status", res.status().as_u16());
    state.metrics.observe(&route, res.status(), started.elapsed());
    // One concise line per request (the path without its query: tokens and signed URLs
    // travel there).
    tracing::info!(
        request_id = %id,
        "{method} {path} {status} {ms:.1} ms",
        status = res.status().as_u16(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
    );
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

async fn dev_jwks(State(state): State<AppState>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    state.dev_jwks.clone().map(axum::Json).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no local identity provider: this is not mira dev",
        )
    })
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint")
}

/// The methods each route of [`router`] takes, for the `Allow` of a 405 (axum adds none to
/// routes wrapped in layers). `gateway/tests/api.rs` checks every entry against the router.
pub const ALLOWED_METHODS: &[(&str, &str)] = &[
    ("/api/slides", "GET, HEAD, POST"),
    ("/api/slides/{id}", "GET, HEAD"),
    ("/api/slides/{id}/uploaded", "POST"),
    ("/api/jobs", "GET, HEAD, POST"),
    ("/api/jobs/{id}", "GET, HEAD"),
    ("/api/jobs/{id}/cancel", "POST"),
    ("/api/jobs/{id}/retry", "POST"),
    ("/api/jobs/{id}/events", "GET, HEAD"),
    ("/api/jobs/{id}/results/{*path}", "GET, HEAD"),
    ("/api/audit/events", "GET, HEAD"),
    ("/api/openapi.json", "GET, HEAD"),
    ("/blobs/{*key}", "GET, HEAD, PUT"),
    ("/ws", "GET, HEAD"),
    (crate::dev::JWKS_PATH, "GET, HEAD"),
    ("/healthz", "GET, HEAD"),
    ("/readyz", "GET, HEAD"),
    ("/metrics", "GET, HEAD"),
];

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/slides", post(slides::create).get(slides::list))
        .route("/api/slides/{id}", get(slides::get_one))
        .route("/api/slides/{id}/uploaded", post(slides::uploaded))
        .route("/api/jobs", post(jobs::create).get(jobs::list))
        .route("/api/jobs/{id}", get(jobs::get_one))
        .route("/api/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/jobs/{id}/retry", post(jobs::retry))
        .route("/api/jobs/{id}/events", get(jobs::events))
        .route("/api/jobs/{id}/results/{*path}", get(jobs::results))
        .route("/api/audit/events", get(audit::events))
        .route("/api/openapi.json", get(openapi::document))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes));
    let blobs = Router::new()
        .route("/blobs/{*key}", get(blobs::download).put(blobs::upload))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(api)
        .merge(blobs)
        .route("/ws", get(ws::handler))
        .route(crate::dev::JWKS_PATH, get(dev_jwks))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), pipeline))
        .with_state(state)
}

/// Serves `router` on an already-bound listener until `shutdown` fires, then lets requests
/// in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
