//! The HTTP API (DESIGN §7): routes and the request pipeline (request id, trace span, body
//! limit, metrics). Each resource's endpoints live in its submodule, the state they share in
//! [`state`]; every error is an [`problem::ApiError`].

pub mod audit;
pub mod auth;
pub mod blobs;
pub mod devcheck;
pub mod extract;
pub mod hub;
pub mod idempotency;
pub mod jobs;
pub mod layercache;
pub mod layers;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod problem;
pub mod public;
pub mod sealed;
pub mod session;
pub mod slides;
pub mod state;
pub mod web;
pub mod ws;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tracing::Instrument;

pub use openapi::{allowed_methods, operations};
use problem::ApiError;
pub use state::{
    AppState, CognitoSignIn, DevIdentity, Limits, MetricsAccess, Services, Version, WebConfig, READERS, WRITERS,
};
pub use web::DEV_JWKS_PATH;

/// What the request pipeline needs: the state, and the methods each route takes.
#[derive(Clone)]
struct Pipeline {
    state: AppState,
    allow: std::sync::Arc<std::collections::BTreeMap<String, String>>,
}

/// The request id: the caller's `x-request-id` if it is sane, else a new UUIDv7. Every
/// request runs in a span carrying it, and the response returns it.
async fn pipeline(State(Pipeline { state, allow }): State<Pipeline>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let authenticated = req.headers().contains_key(header::AUTHORIZATION)
        || req.uri().query().is_some_and(|q| q.contains("access_token="));
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
    // A caller's W3C trace: this request continues it (its commands' events carry it on).
    // With Tracing__XRay__Enabled, the load balancer's X-Amzn-Trace-Id when no traceparent came.
    {
        let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
        if let Some(tp) = header("traceparent") {
            mira_telemetry::follow(&span, tp);
        } else if let Some(tp) = header("x-amzn-trace-id")
            .filter(|_| mira_telemetry::xray_enabled())
            .and_then(mira_telemetry::xray_traceparent)
        {
            mira_telemetry::follow(&span, &tp);
        }
    }
    req.headers_mut().insert(
        "x-request-id",
        HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid")),
    );
    let started = std::time::Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    if res.status() == StatusCode::METHOD_NOT_ALLOWED && !res.headers().contains_key(header::CONTENT_TYPE) {
        // The router's own 405 has an empty body and, once routes are layered, no `Allow`:
        // answer problem+json like every other refusal, with the methods the route takes.
        let allow = allow.get(&route);
        let detail = match allow {
            Some(a) => format!("{route} takes {a}"),
            None => "this endpoint does not take that method".to_owned(),
        };
        res = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed", detail).into_response();
        if let Some(a) = allow.and_then(|a| HeaderValue::from_str(a).ok()) {
            res.headers_mut().insert(header::ALLOW, a);
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
    secure_headers(&path, authenticated, &mut res);
    res
}

/// Headers every answer carries: `nosniff` always (an uploaded file or an error must never be
/// read as HTML or script); `no-store` on every answer to a request that carried credentials
/// and did not set its own cache policy, so a shared or browser cache never keeps one tenant's
/// data (the results' tiles are redirects, short-lived by their signed URL: ADR 0020).
fn secure_headers(path: &str, authenticated: bool, res: &mut Response) {
    let h = res.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    let api = path == "/api" || path.starts_with("/api/") || path.starts_with("/dev/");
    if (authenticated || api) && !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such endpoint")
}

/// Paths the API, the blob store, the socket, `mira dev` and operations own: an unknown one is
/// the API's 404, never the app.
const NOT_THE_APP: &[&str] = &["/api", "/blobs", "/ws", "/dev", "/healthz", "/readyz", "/metrics"];

/// Anything no route takes: the API's 404 under its own paths, else the browser app.
async fn fallback(state: State<AppState>, method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let p = uri.path();
    if NOT_THE_APP
        .iter()
        .any(|prefix| p == *prefix || p.strip_prefix(prefix).is_some_and(|r| r.starts_with('/')))
    {
        return not_found().await.into_response();
    }
    web::serve(state, method, uri).await
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let (routes, doc) = openapi::operations(state.limits.max_body_bytes).split_for_parts();
    let pipeline_state = Pipeline {
        state: state.clone(),
        allow: std::sync::Arc::new(openapi::methods_of(&doc)),
    };
    routes
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.rate_limiter.clone(),
            limits::rate_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(pipeline_state, pipeline))
        .with_state(state)
}

/// The metrics listener's whole surface (`Api__MetricsListen`): `GET /metrics`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics_listener))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router` on an already-bound listener, within the connection limits, until
/// `shutdown` fires; then requests in flight get `Api__ShutdownGraceSeconds` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let conn = state.limits.conn;
    limits::serve(listener, router(state), conn, shutdown).await
}
