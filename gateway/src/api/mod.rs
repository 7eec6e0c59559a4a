//! The HTTP API (DESIGN §7): routes and the request pipeline (request id, trace span, body
//! limit, metrics). Each resource's endpoints live in its submodule, the state they share in
//! [`state`]; every error is an [`problem::ApiError`].

pub mod audit;
pub mod auth;
pub mod blobs;
pub mod extract;
pub mod hub;
pub mod idempotency;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod ops;
pub mod problem;
pub mod public;
pub mod slides;
pub mod state;
pub mod web;
pub mod ws;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tracing::Instrument;

use problem::ApiError;
pub use state::{
    AppState, CognitoSignIn, DevIdentity, Limits, MetricsAccess, Services, Version, WebConfig, READERS, WRITERS,
};

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

/// Where the gateway serves `mira dev`'s local JWKS (404 outside `mira dev`).
pub const DEV_JWKS_PATH: &str = "/dev/jwks.json";

async fn dev_jwks(State(state): State<AppState>, req: Request) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let Some(idp) = state.dev_identity.as_ref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no local identity provider: this is not mira dev",
        ));
    };
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let served_on = req.extensions().get::<limits::ServedOn>().map(|s| s.0);
    if let Some(why) = web::dev_refusal(
        req.headers(),
        peer,
        served_on,
        state.web.allow_remote_dev_sign_in,
        false,
    ) {
        return Err(ApiError::forbidden(why));
    }
    Ok(axum::Json(idp.jwks().clone()))
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

/// The methods each route of [`router`] takes, for the `Allow` of a 405 (axum adds none to
/// routes wrapped in layers). `gateway/tests/api/ops.rs` checks every entry against the router.
pub const ALLOWED_METHODS: &[(&str, &str)] = &[
    ("/api/slides", "GET, HEAD, POST"),
    ("/api/slides/{id}", "GET, HEAD"),
    ("/api/slides/{id}/uploaded", "POST"),
    ("/api/slides/{id}/upload/parts", "GET, HEAD"),
    ("/api/jobs", "GET, HEAD, POST"),
    ("/api/jobs/{id}", "GET, HEAD"),
    ("/api/jobs/{id}/cancel", "POST"),
    ("/api/jobs/{id}/retry", "POST"),
    ("/api/jobs/{id}/events", "GET, HEAD"),
    ("/api/jobs/{id}/verify", "GET, HEAD"),
    ("/api/jobs/{id}/results/{*path}", "GET, HEAD"),
    ("/api/audit/events", "GET, HEAD"),
    ("/api/openapi.json", "GET, HEAD"),
    ("/api/app-config", "GET, HEAD"),
    ("/api/version", "GET, HEAD"),
    ("/blobs/{*key}", "GET, HEAD, PUT"),
    ("/ws", "GET, HEAD"),
    (DEV_JWKS_PATH, "GET, HEAD"),
    ("/dev/sign-in", "POST"),
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
        .route("/api/slides/{id}/upload/parts", get(slides::part_page))
        .route("/api/jobs", post(jobs::create).get(jobs::list))
        .route("/api/jobs/{id}", get(jobs::get_one))
        .route("/api/jobs/{id}/cancel", post(jobs::cancel))
        .route("/api/jobs/{id}/retry", post(jobs::retry))
        .route("/api/jobs/{id}/events", get(jobs::events))
        .route("/api/jobs/{id}/verify", get(jobs::verify))
        .route("/api/jobs/{id}/results/{*path}", get(jobs::results))
        .route("/api/audit/events", get(audit::events))
        .route("/api/openapi.json", get(openapi::document))
        .route("/api/app-config", get(web::app_config))
        .route("/api/version", get(ops::version))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes));
    let blobs = Router::new()
        .route("/blobs/{*key}", get(blobs::download).put(blobs::upload))
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .merge(api)
        .merge(blobs)
        .route("/ws", get(ws::handler))
        .route(DEV_JWKS_PATH, get(dev_jwks))
        .route("/dev/sign-in", post(web::dev_sign_in))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.rate_limiter.clone(),
            limits::rate_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), pipeline))
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
