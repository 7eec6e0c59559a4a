//! Browser sessions (ADR 0032): a reload keeps the user signed in, and an idle one is signed
//! out.
//!
//! The session lives in a cookie the gateway seals (ChaCha20-Poly1305 under the keyring subject
//! [`SESSION_KEY_SUBJECT`], the cookie's name as associated data): who signed in, when, and the
//! idle deadline. Only `/api/session/*` reads it; every other route takes the Bearer token alone,
//! so the API gains no CSRF surface. The app keeps a short-lived ID token in memory and asks
//! `POST /api/session/refresh` for a new one on load and before it ends.
//!
//! * `POST /api/session/refresh`: a new ID token ([`SESSION_TOKEN_TTL`]) while the deadline is
//!   ahead; past it, 401 and the cookie cleared. A refresh does not move the deadline.
//! * `POST /api/session/activity`: the user did something; the deadline moves to now +
//!   `Web__IdleSignOutSeconds`.
//! * `POST /api/session/end`: the cookie cleared.
//!
//! Each takes JSON only (a cross-site page cannot send it without a preflight, which the gateway
//! never grants) and requires an `Origin` that is the app's own.
//!
//! What issues the cookie: `mira dev`'s sign-in (`POST /dev/sign-in`). Under `mira dev` on plain
//! HTTP the cookie cannot be `Secure`, so it is `mira-dev-session` rather than `__Host-`
//! prefixed; `mira dev` answers loopback clients only. The Cognito side of ADR 0032 (the gateway
//! as a confidential client holding the refresh token) is not built yet: with Cognito the
//! endpoints answer 404 and the app keeps its tokens in memory as before.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::problem::{ApiError, Limited, Problem};
use super::state::AppState;

/// The keyring subject whose data key seals session cookies.
pub const SESSION_KEY_SUBJECT: &str = "mira:browser-session";

/// `mira dev`'s session cookie (plain HTTP: no `Secure`, so no `__Host-` prefix).
pub const DEV_COOKIE: &str = "mira-dev-session";

/// How long an ID token from a refresh lasts: Mira checks ID tokens itself, so a revoked session
/// keeps working at most this long.
pub const SESSION_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// The longest a session lasts, active or not: Cognito's refresh token's 12 hours, which a
/// Cognito session will have anyway.
pub const MAX_SESSION_SECONDS: i64 = 12 * 3600;

/// What the cookie holds, sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sealed {
    pub user: String,
    pub tenant: String,
    pub roles: Vec<String>,
    /// Unix seconds.
    pub signed_in_at: i64,
    /// Unix seconds: past it, the session is over.
    pub idle_deadline: i64,
}

/// Seals and opens session cookies: the session as JSON, sealed (`super::sealed`) with the
/// cookie's name as associated data (a value moved to another cookie does not open).
pub struct Sealer {
    sealing: super::sealed::Sealing,
}

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            sealing: super::sealed::Sealing::new(key),
        }
    }

    pub fn seal(&self, name: &str, s: &Sealed) -> Result<String, ApiError> {
        let plain = serde_json::to_vec(s).map_err(ApiError::internal)?;
        self.sealing
            .seal(name.as_bytes(), &plain)
            .ok_or_else(|| ApiError::internal("sealing a session failed: no random nonce"))
    }

    /// The session a cookie named `name` holds; `None` for anything this gateway did not seal
    /// under that name.
    pub fn open(&self, name: &str, value: &str) -> Option<Sealed> {
        serde_json::from_slice(&self.sealing.open(name.as_bytes(), value)?).ok()
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` of a session: HttpOnly, SameSite=Strict, only sent to `/api/session/`.
/// `max_age` 0 clears it.
pub fn set_cookie(name: &str, value: &str, max_age: i64) -> HeaderValue {
    let secure = if name.starts_with("__Host-") { "; Secure" } else { "" };
    let path = if name.starts_with("__Host-") {
        "/"
    } else {
        "/api/session"
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("mira-invalid=; Max-Age=0"))
}

/// The sealer, from the keyring on first use.
async fn sealer(state: &AppState) -> Result<Sealer, ApiError> {
    let key = state
        .session_key
        .get_or_try_init(|| async { state.keyring.key_for(SESSION_KEY_SUBJECT).await })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "the session key is unavailable");
            ApiError::unavailable("the keyring")
        })?;
    Ok(Sealer::new(key))
}

/// The cookie for a new session of `user` signed in now; what `POST /dev/sign-in` sets.
pub async fn start(state: &AppState, user: &str, tenant: &str, roles: &[String]) -> Result<HeaderValue, ApiError> {
    let now = chrono::Utc::now().timestamp();
    let s = Sealed {
        user: user.to_owned(),
        tenant: tenant.to_owned(),
        roles: roles.to_vec(),
        signed_in_at: now,
        idle_deadline: now + state.web.idle_sign_out.as_secs() as i64,
    };
    let value = sealer(state).await?.seal(DEV_COOKIE, &s)?;
    Ok(set_cookie(DEV_COOKIE, &value, cookie_max_age(state)))
}

/// How long the browser keeps the cookie: the idle time and a margin (the deadline inside is
/// what counts; this only keeps dead cookies from piling up).
fn cookie_max_age(state: &AppState) -> i64 {
    state.web.idle_sign_out.as_secs() as i64 + 60
}

/// Sessions exist where the gateway issues them (`mira dev`'s sign-in).
fn supported(state: &AppState) -> Result<(), ApiError> {
    if state.dev_identity.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "this gateway keeps no browser sessions: with Cognito the app holds its tokens itself (ADR 0032)",
        ));
    }
    Ok(())
}

/// Why a session request is refused: not from the app's own origin (an `Origin` header is
/// required), not JSON, or not the loopback client `mira dev` answers.
fn refusal(state: &AppState, req: &Request) -> Option<String> {
    let headers = req.headers();
    if !headers.contains_key(header::ORIGIN) {
        return Some("a session request names its Origin".into());
    }
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let served_on = req.extensions().get::<super::limits::ServedOn>().map(|s| s.0);
    super::devcheck::dev_refusal(headers, peer, served_on, state.web.allow_remote_dev_sign_in, true)
}

/// The open session of a request, or 401 (and the cookie cleared) when there is none or its
/// deadline has passed.
async fn current(state: &AppState, headers: &HeaderMap) -> Result<Sealed, Response> {
    let sealer = sealer(state).await.map_err(IntoResponse::into_response)?;
    let ended = |why: &str| {
        let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", why).into_response();
        r.headers_mut()
            .insert(header::SET_COOKIE, set_cookie(DEV_COOKIE, "", 0));
        r
    };
    let Some(value) = cookie(headers, DEV_COOKIE) else {
        return Err(ended("no session: sign in"));
    };
    let Some(s) = sealer.open(DEV_COOKIE, value) else {
        return Err(ended("the session cookie is not one this gateway sealed: sign in"));
    };
    if let Some(why) = why_ended(&s, chrono::Utc::now().timestamp()) {
        return Err(ended(why));
    }
    Ok(s)
}

/// Why a session is over at `now` (Unix seconds), if it is: idle past its deadline, or signed in
/// longer than [`MAX_SESSION_SECONDS`] whatever its activity (a copied cookie kept alive by
/// activity reports still ends).
pub fn why_ended(s: &Sealed, now: i64) -> Option<&'static str> {
    if now >= s.idle_deadline {
        Some("the session ended after a time without activity: sign in")
    } else if now - s.signed_in_at >= MAX_SESSION_SECONDS {
        Some("the session reached its 12 hours: sign in")
    } else {
        None
    }
}

/// `POST /api/session/refresh`'s and `/activity`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionToken {
    /// A new ID token, for the `Authorization` header and the WebSocket.
    pub id_token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// When the session ends unless the user does something before.
    pub idle_deadline: chrono::DateTime<chrono::Utc>,
    /// `Web__IdleSignOutSeconds`.
    pub idle_sign_out_seconds: u64,
}

/// The browser sessions' operations.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(refresh))
        .routes(routes!(activity))
        .routes(routes!(end))
}

fn no_store(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn answer(state: &AppState, s: &Sealed, cookie: Option<HeaderValue>) -> Result<Response, ApiError> {
    let idp = state
        .dev_identity
        .clone()
        .ok_or_else(|| ApiError::not_found("session"))?;
    let token = idp
        .token(&s.user, &s.tenant, &s.roles, SESSION_TOKEN_TTL)
        .map_err(ApiError::internal)?;
    let at = |secs: i64| chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    let mut r = Json(SessionToken {
        id_token: token,
        expires_at: chrono::Utc::now() + chrono::Duration::from_std(SESSION_TOKEN_TTL).unwrap_or_default(),
        idle_deadline: at(s.idle_deadline),
        idle_sign_out_seconds: state.web.idle_sign_out.as_secs(),
    })
    .into_response();
    if let Some(c) = cookie {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    Ok(no_store(r))
}

#[utoipa::path(post, operation_id = "session_refresh", path = "/api/session/refresh",
    summary = "A new ID token for the browser app's session (its cookie), while the session is not idle past Web__IdleSignOutSeconds",
    security(), responses((status = 200, body = SessionToken), (status = 401, response = inline(Problem)),
        (status = 403, response = inline(Problem)), (status = 404, response = inline(Problem)), Limited))]
pub async fn refresh(State(state): State<AppState>, req: Request) -> Response {
    session_call(&state, req, false).await
}

#[utoipa::path(post, operation_id = "session_activity", path = "/api/session/activity",
    summary = "The user of the browser app's session did something: its idle deadline moves, and a new ID token comes back",
    security(), responses((status = 200, body = SessionToken), (status = 401, response = inline(Problem)),
        (status = 403, response = inline(Problem)), (status = 404, response = inline(Problem)), Limited))]
pub async fn activity(State(state): State<AppState>, req: Request) -> Response {
    session_call(&state, req, true).await
}

async fn session_call(state: &AppState, req: Request, moved: bool) -> Response {
    // Read before any await: a request's body is not `Sync`, so no reference to it may be held
    // across one.
    let refused = supported(state)
        .err()
        .or_else(|| refusal(state, &req).map(ApiError::forbidden));
    let headers = req.headers().clone();
    drop(req);
    if let Some(e) = refused {
        return no_store(e.into_response());
    }
    let mut s = match current(state, &headers).await {
        Ok(s) => s,
        Err(r) => return no_store(r),
    };
    let cookie = if moved {
        s.idle_deadline = chrono::Utc::now().timestamp() + state.web.idle_sign_out.as_secs() as i64;
        match sealer(state).await.and_then(|k| k.seal(DEV_COOKIE, &s)) {
            Ok(v) => Some(set_cookie(DEV_COOKIE, &v, cookie_max_age(state))),
            Err(e) => return no_store(e.into_response()),
        }
    } else {
        None
    };
    match answer(state, &s, cookie).await {
        Ok(r) => r,
        Err(e) => no_store(e.into_response()),
    }
}

#[utoipa::path(post, operation_id = "session_end", path = "/api/session/end",
    summary = "Sign the browser app's session out: its cookie is cleared",
    security(), responses((status = 204, description = "Signed out."), (status = 403, response = inline(Problem)),
        (status = 404, response = inline(Problem)), Limited))]
pub async fn end(State(state): State<AppState>, req: Request) -> Response {
    if let Err(e) = supported(&state) {
        return no_store(e.into_response());
    }
    if let Some(why) = refusal(&state, &req) {
        return no_store(ApiError::forbidden(why).into_response());
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(DEV_COOKIE, "", 0));
    no_store(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sealed {
        Sealed {
            user: "ada".into(),
            tenant: "lab-a".into(),
            roles: vec!["pathologist".into()],
            signed_in_at: 1,
            idle_deadline: 2,
        }
    }

    #[test]
    fn a_sealed_session_opens_only_under_its_key_and_name_and_unaltered() {
        let k = Sealer::new(&[7; 32]);
        let v = k.seal(DEV_COOKIE, &sample()).unwrap();
        assert_eq!(k.open(DEV_COOKIE, &v), Some(sample()));
        assert_eq!(k.open("__Host-mira-session", &v), None, "renamed");
        assert_eq!(Sealer::new(&[8; 32]).open(DEV_COOKIE, &v), None, "another key");
        let mut bytes = v.into_bytes();
        let last = bytes.len() - 3;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(k.open(DEV_COOKIE, &String::from_utf8(bytes).unwrap()), None, "tampered");
        assert_eq!(k.open(DEV_COOKIE, "not base64!"), None);
    }

    #[test]
    fn a_session_ends_when_idle_or_after_twelve_hours_whatever_its_activity() {
        let s = Sealed {
            signed_in_at: 1_000,
            idle_deadline: 1_900,
            ..sample()
        };
        assert_eq!(why_ended(&s, 1_899), None);
        assert!(why_ended(&s, 1_900).unwrap().contains("without activity"));
        // Kept active (the deadline moved on and on) for 12 hours: over all the same.
        let busy = Sealed {
            idle_deadline: 1_000 + MAX_SESSION_SECONDS + 600,
            ..s
        };
        assert_eq!(why_ended(&busy, 1_000 + MAX_SESSION_SECONDS - 1), None);
        assert!(why_ended(&busy, 1_000 + MAX_SESSION_SECONDS)
            .unwrap()
            .contains("12 hours"));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_scoped() {
        let dev = set_cookie(DEV_COOKIE, "v", 960);
        assert_eq!(
            dev.to_str().unwrap(),
            "mira-dev-session=v; Path=/api/session; HttpOnly; SameSite=Strict; Max-Age=960"
        );
        let host = set_cookie("__Host-mira-session", "v", 0);
        assert_eq!(
            host.to_str().unwrap(),
            "__Host-mira-session=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=0; Secure"
        );
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; mira-dev-session=xyz; b=2".parse().unwrap());
        assert_eq!(cookie(&h, DEV_COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, "mira-dev"), None);
    }
}
