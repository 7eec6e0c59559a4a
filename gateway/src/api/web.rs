//! The browser app (DESIGN §10), served at `/` from the directory `Web__Dir` names (the Vite
//! build, `web/dist`), read at run time so that building the gateway never needs npm.
//!
//! * A file of the build is served with its content type. Vite's hashed `assets/` are cached
//!   for a year (`immutable`); everything else is revalidated (`no-cache`).
//! * A path that names no file and has no extension is a client route: `index.html` answers.
//! * Every answer carries a strict Content-Security-Policy: scripts, styles and frames from
//!   this origin only, connections to this origin (and the blob store's and the Hosted UI's
//!   origins when those are elsewhere), no plugins, no framing, no `<base>`.
//! * A path is served only when every segment is plain (`[A-Za-z0-9._-]`, not starting with a
//!   dot) and the file resolves inside the directory: no `..`, no encoded separators, no
//!   symbolic link out.
//!
//! `GET /api/app-config` tells the app how to sign in: with `mira dev`'s local sign-in
//! (`POST /dev/sign-in`, loopback clients only unless `Web__AllowRemoteDevSignIn`) or with the
//! Cognito Hosted UI (authorization code with PKCE).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, Limited, Problem};
use super::state::AppState;

/// The Content-Security-Policy of every answer from the app's directory.
pub fn content_security_policy(connect_origins: &[String]) -> String {
    let mut connect = vec!["'self'".to_owned()];
    connect.extend(connect_origins.iter().cloned());
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
         font-src 'self'; connect-src {}; worker-src 'self' blob:; manifest-src 'self'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
        connect.join(" ")
    )
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

/// The relative file a request path names, or `None` when any segment is not plain.
pub fn plain_path(raw: &str) -> Option<PathBuf> {
    let rest = raw.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(PathBuf::from("index.html"));
    }
    let mut out = PathBuf::new();
    for seg in rest.split('/') {
        let plain = !seg.is_empty()
            && !seg.starts_with('.')
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !plain {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such page").into_response()
}

/// `GET /…` outside the API: a file of the app, or `index.html` for a client route.
pub async fn serve(State(state): State<AppState>, method: Method, uri: axum::http::Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return not_found();
    }
    let Some(dir) = state.web.dir.as_deref() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "no-app",
            "this gateway serves no browser app: Web__Dir names none (scripts/dev builds web/ into web/dist)",
        )
        .into_response();
    };
    let Some(rel) = plain_path(uri.path()) else {
        return not_found();
    };
    let client_route = rel.extension().is_none();
    let (file, rel) = match resolve(dir, &rel).await {
        Some(f) => (f, rel),
        None if client_route => match resolve(dir, Path::new("index.html")).await {
            Some(f) => (f, PathBuf::from("index.html")),
            None => return not_found(),
        },
        None => return not_found(),
    };
    let body = match tokio::fs::read(&file).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read a file of the app");
            return not_found();
        }
    };
    let cache = if rel.starts_with("assets") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&rel)));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    if let Ok(v) = HeaderValue::from_str(&content_security_policy(&state.web.connect_origins)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if method == Method::HEAD {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        return (StatusCode::OK, headers).into_response();
    }
    (StatusCode::OK, headers, body).into_response()
}

/// `rel` inside `dir`, when it is a file there and does not resolve outside it.
async fn resolve(dir: &Path, rel: &Path) -> Option<PathBuf> {
    let root = tokio::fs::canonicalize(dir).await.ok()?;
    let file = tokio::fs::canonicalize(dir.join(rel)).await.ok()?;
    let meta = tokio::fs::metadata(&file).await.ok()?;
    (file.starts_with(&root) && meta.is_file()).then_some(file)
}

/// The browser app's operations: its configuration and `mira dev`'s sign-in.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(app_config))
        .routes(routes!(dev_jwks))
        .routes(routes!(dev_sign_in))
}

/// Where the gateway serves `mira dev`'s local JWKS (404 outside `mira dev`).
pub const DEV_JWKS_PATH: &str = "/dev/jwks.json";

#[utoipa::path(get, path = DEV_JWKS_PATH, summary = "mira dev only: the keys its sign-in signs with (404 elsewhere)",
    security(), responses((status = 200, description = "a JSON Web Key Set", content_type = "application/json"),
                          (status = 403, response = inline(Problem)),
                          (status = 404, response = inline(Problem)), Limited))]
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
    let served_on = req.extensions().get::<super::limits::ServedOn>().map(|s| s.0);
    if let Some(why) = super::devcheck::dev_refusal(
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

/// How the browser app signs in.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum AppAuth {
    /// `mira dev`'s own sign-in (`POST /dev/sign-in`), and what its form starts from: the
    /// identity `mira dev token` gives by default.
    Dev { user: String, tenant: String, role: String },
    /// Cognito's hosted UI.
    Cognito {
        domain: String,
        client_id: String,
        redirect_url: String,
    },
    /// None configured: the app cannot sign in.
    None,
}

/// `GET /api/app-config`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppConfig {
    pub auth: AppAuth,
    /// The WebSocket's URL, when it is not this origin's `/ws`.
    pub ws_url: Option<String>,
    /// `Web__IdleSignOutSeconds`: the app signs out after this long without input.
    pub idle_sign_out_seconds: u64,
}

/// `GET /api/app-config`: how the app signs in, and the WebSocket URL.
#[utoipa::path(get, path = "/api/app-config", summary = "How the browser app signs in, and its WebSocket URL",
    security(), responses((status = 200, body = AppConfig), Limited))]
pub async fn app_config(State(state): State<AppState>) -> Json<AppConfig> {
    let auth = match (&state.dev_identity, &state.web.cognito) {
        (Some(_), _) => AppAuth::Dev {
            user: "dev-user".into(),
            tenant: "dev".into(),
            role: "pathologist".into(),
        },
        (None, Some(c)) => AppAuth::Cognito {
            domain: c.domain.clone(),
            client_id: c.client_id.clone(),
            redirect_url: c.redirect_url.clone(),
        },
        (None, None) => AppAuth::None,
    };
    Json(AppConfig {
        auth,
        ws_url: state.web.ws_url.clone(),
        idle_sign_out_seconds: state.web.idle_sign_out.as_secs(),
    })
}

/// What `mira dev`'s sign-in asks for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevSignIn {
    /// Surrounding white space is dropped.
    #[schema(min_length = 1, max_length = 128, pattern = "\\S")]
    pub user: String,
    #[schema(pattern = "^[a-z0-9-]{1,64}$")]
    pub tenant: String,
    #[schema(schema_with = dev_roles)]
    pub roles: Vec<String>,
}

fn dev_roles() -> utoipa::openapi::schema::Array {
    let role = utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(DEV_ROLES.iter().copied()));
    utoipa::openapi::schema::ArrayBuilder::new().items(role).build()
}

/// The roles `mira dev`'s sign-in gives.
const DEV_ROLES: &[&str] = &["pathologist", "auditor", "admin"];

/// `POST /dev/sign-in`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct DevToken {
    pub id_token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// How long a token from `mira dev`'s sign-in lasts; the app signs in again before it ends.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// `POST /dev/sign-in` (only in `mira dev`): an ID token for any user, tenant and roles, so a
/// person can try each role. Loopback clients only, unless `Web__AllowRemoteDevSignIn`.
#[utoipa::path(post, path = "/dev/sign-in",
    summary = "mira dev only: an ID token for any user, tenant and roles (loopback clients only unless Web__AllowRemoteDevSignIn)",
    security(), request_body = DevSignIn,
    responses((status = 200, body = DevToken), (status = 400, response = inline(Problem)),
              (status = 403, response = inline(Problem)), (status = 404, response = inline(Problem)),
              (status = 413, response = inline(Problem)), (status = 422, response = inline(Problem)), Limited))]
pub async fn dev_sign_in(State(state): State<AppState>, req: Request) -> Result<Response, ApiError> {
    let Some(idp) = state.dev_identity.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "no local identity provider: this is not mira dev",
        ));
    };
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let served_on = req.extensions().get::<super::limits::ServedOn>().map(|s| s.0);
    if let Some(why) =
        super::devcheck::dev_refusal(req.headers(), peer, served_on, state.web.allow_remote_dev_sign_in, true)
    {
        return Err(ApiError::forbidden(why));
    }
    let body = axum::body::to_bytes(req.into_body(), 16 * 1024)
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-large", "the body is too large"))?;
    // A JSON object, as every body the API takes (400 when it is not JSON, 422 when it does not fit).
    let who: DevSignIn = super::extract::parse_json(&body)?;
    let user = who.user.trim();
    // As the document says: 1 to 128 characters (not bytes) as sent, not all of them white space.
    if user.is_empty() || who.user.chars().count() > 128 {
        return Err(ApiError::invalid("user: 1 to 128 characters"));
    }
    for r in &who.roles {
        if !DEV_ROLES.contains(&r.as_str()) {
            return Err(ApiError::invalid(format!(
                "roles: {r:?} is not one of pathologist, auditor, admin"
            )));
        }
    }
    let token = idp
        .token(user, &who.tenant, &who.roles, DEV_TOKEN_TTL)
        .map_err(|e| ApiError::invalid(format!("tenant: {e:#}")))?;
    let expires_at = chrono::Utc::now() + chrono::Duration::from_std(DEV_TOKEN_TTL).unwrap_or_default();
    // The browser's session: a reload asks /api/session/refresh for a token (ADR 0032).
    let cookie = super::session::start(&state, user, &who.tenant, &who.roles).await?;
    let mut r = Json(DevToken {
        id_token: token,
        expires_at,
    })
    .into_response();
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_are_served() {
        assert_eq!(plain_path("/"), Some(PathBuf::from("index.html")));
        assert_eq!(
            plain_path("/assets/app-1a2b.js"),
            Some(PathBuf::from("assets/app-1a2b.js"))
        );
        assert_eq!(plain_path("/jobs/0190-ab"), Some(PathBuf::from("jobs/0190-ab")));
        for bad in [
            "/../etc/passwd",
            "/assets/../../x",
            "/.env",
            "/a//b",
            "/a%2f..",
            "/a\\b",
            "x",
        ] {
            assert_eq!(plain_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_policy_allows_this_origin_and_the_named_ones_only() {
        let p = content_security_policy(&["https://bucket.s3.eu-west-1.amazonaws.com".into()]);
        assert!(p.contains("script-src 'self';"), "{p}");
        assert!(
            p.contains("connect-src 'self' https://bucket.s3.eu-west-1.amazonaws.com;"),
            "{p}"
        );
        assert!(
            p.contains("frame-ancestors 'none'") && p.contains("object-src 'none'"),
            "{p}"
        );
        assert!(!p.contains("unsafe"), "{p}");
    }
}
