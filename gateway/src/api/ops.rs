//! Operations endpoints: liveness, readiness (database, blob store, bus), metrics and the
//! running version.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::problem::{ApiError, Limited, Problem};
use super::state::{AppState, Version};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(value_type = String, pattern = "^ok$")]
    pub status: &'static str,
}
/// Operations' endpoints.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(version))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

#[utoipa::path(get, path = "/healthz", summary = "Liveness", security(),
    responses((status = 200, description = "alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// What a dependency answered to the readiness check.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Down,
}

/// Whether this process is ready, and each dependency's verdict (`database`, `blob_store`, and
/// `bus` where the process has one).
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub checks: std::collections::BTreeMap<String, Verdict>,
}

/// 200 when the database, the blob store and (when this process has one) the bus answer;
/// otherwise 503 naming what failed.
/// Readiness, for load balancers and anonymous probes: which dependency is down, nothing about
/// why (the reason goes to the log, where operators read it).
#[utoipa::path(get, path = "/readyz", summary = "Readiness: which of the database, blob store and bus is down",
    security(), responses((status = 200, description = "ready", body = Readiness),
                          (status = 503, description = "not ready", body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut checks = std::collections::BTreeMap::new();
    let mut ok = true;
    let mut note = |name: &str, result: Result<(), String>| {
        let verdict = match result {
            Ok(()) => Verdict::Ok,
            Err(why) => {
                tracing::warn!(dependency = name, error = %why, "not ready");
                ok = false;
                Verdict::Down
            }
        };
        checks.insert(name.to_owned(), verdict);
    };
    let db = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool).await;
    note("database", db.map(|_| ()).map_err(|e| e.to_string()));
    note("blob_store", state.blobs.ready().await.map_err(|e| e.to_string()));
    if let Some(bus) = &state.bus {
        let r = bus.queue(mira_bus::Group::Projections).dead_letter_count().await;
        note("bus", r.map(|_| ()).map_err(|e| e.to_string()));
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready: ok, checks })).into_response()
}

/// `GET /api/version`, anonymous: the version and the commit (`MIRA_COMMIT`) this process
/// runs. Under `/api` so that it is reached through the same CloudFront path as the API (a
/// deployment polls it until the new commit answers); never cached on the way.
#[utoipa::path(get, path = "/api/version",
    summary = "The running version and the commit it was built from (MIRA_COMMIT, else unknown)",
    security(), responses((status = 200, body = Version), Limited))]
pub async fn version(State(state): State<AppState>) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Json(state.version.clone())).into_response()
}

/// `GET /metrics` on the API's listener: only with `Api__MetricsToken`'s bearer token; else
/// 404, naming where the metrics are.
#[utoipa::path(get, path = "/metrics",
    summary = "Prometheus metrics: here only with Api__MetricsToken as a bearer token (404 without it); operators scrape Api__MetricsListen",
    security(), responses((status = 200, description = "Prometheus's text format", content_type = "text/plain", body = String),
                          (status = 401, response = inline(Problem)), (status = 404, response = inline(Problem)),
                          (status = 503, response = inline(Problem)), Limited))]
pub async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Result<Response, ApiError> {
    use super::state::MetricsAccess;
    match &state.metrics_access {
        MetricsAccess::Elsewhere => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "metrics are not served on the API's listener: see Api__MetricsListen (or Api__MetricsToken)",
            ))
        }
        MetricsAccess::Token(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default();
            use subtle_eq::ConstantTimeEq;
            if !given.as_bytes().ct_eq(token.expose().as_bytes()) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "/metrics here takes Api__MetricsToken as a bearer token",
                ));
            }
        }
    }
    render_metrics(&state).await
}

/// `GET /metrics` on `Api__MetricsListen`: anyone who reaches that address.
pub async fn metrics_listener(State(state): State<AppState>) -> Result<Response, ApiError> {
    render_metrics(&state).await
}

mod subtle_eq {
    /// Equality in time that does not depend on where the inputs differ.
    pub trait ConstantTimeEq {
        fn ct_eq(&self, other: &Self) -> bool;
    }
    impl ConstantTimeEq for [u8] {
        fn ct_eq(&self, other: &[u8]) -> bool {
            self.len() == other.len() && self.iter().zip(other).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        }
    }
}

async fn render_metrics(state: &AppState) -> Result<Response, ApiError> {
    let gauges = super::metrics::database_gauges(&state.pool).await.map_err(|e| {
        tracing::warn!(error = %e, "metrics: cannot read the database");
        ApiError::unavailable("the database is unavailable")
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(&gauges),
    )
        .into_response())
}
