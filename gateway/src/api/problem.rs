//! The gateway's one error type. Every failure leaves as RFC 9457 `application/problem+json`:
//! validation → 400/422, authentication → 401 (which check failed, in RFC 6750's terms, in
//! `WWW-Authenticate` and `detail`; never the token), a missing role → 403, not found or
//! another tenant's → 404, conflicts → 409, and anything unexpected → an opaque 500 whose
//! cause is logged inside the request's span.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use cqrs_es::AggregateError;
use mira_aggregates::{JobError, SlideError};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// A short, stable slug: the problem's `type` is `https://mira.dev/problems/<kind>`.
    pub kind: &'static str,
    pub detail: Option<String>,
    /// For a 401 with a token: RFC 6750's `error_description` (`invalid_token`).
    pub token_error: Option<&'static str>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            detail: Some(detail.into()),
            token_error: None,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", detail)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", format!("no such {what}"))
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }

    /// No bearer token at all (RFC 6750 §3.1: no error code).
    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a bearer token (a Cognito ID token) is required",
        )
    }

    /// A token was refused: `reason` is one of the fixed descriptions of
    /// [`super::auth::AuthError::reason`], never anything taken from the token.
    pub fn invalid_token(reason: &'static str) -> Self {
        Self {
            token_error: Some(reason),
            ..Self::new(StatusCode::UNAUTHORIZED, "unauthorized", reason)
        }
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }

    /// Unexpected: logged here, inside the request's span; the client sees no detail.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "internal",
            detail: None,
            token_error: None,
        }
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
}

/// RFC 9457's problem document: the body of every refusal.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `https://mira.dev/problems/<kind>`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    /// What was wrong, for a person; absent on a 500.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub detail: Option<String>,
}

/// A problem response, for an operation's description: `(status = 409, response =
/// inline(Problem))`.
impl<'r> utoipa::ToResponse<'r> for Problem {
    fn response() -> (&'r str, RefOr<utoipa::openapi::response::Response>) {
        let content = ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("Problem"))))
            .build();
        let response = ResponseBuilder::new()
            .description("Problem")
            .content("application/problem+json", content)
            .build();
        ("Problem", RefOr::T(response))
    }
}

/// Sets of problems an operation answers, for its `responses(...)`. Every operation can get 429
/// (past `Api__RequestsPerSecond`); an authenticated one 400 (a malformed query or header), 401,
/// 403 and 503 (a dependency down); one with a JSON body 413, 415 and 422; one naming a
/// resource 404. The fuzzer in CI fails on any status an operation does not declare.
macro_rules! problem_sets {
    ($($(#[$doc:meta])* $name:ident: [$($code:literal),*];)*) => {$(
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl utoipa::IntoResponses for $name {
            fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
                [$($code),*].iter().map(|c: &&str| ((*c).to_owned(), <Problem as utoipa::ToResponse>::response().1)).collect()
            }
        }
    )*};
}

problem_sets! {
    /// Anyone's operation: 429 only.
    Limited: ["429"];
    /// An authenticated operation on a collection.
    Reads: ["400", "401", "403", "429", "503"];
    /// An authenticated operation on one resource named in the path.
    ReadsOne: ["400", "401", "403", "404", "429", "503"];
    /// An authenticated operation with a JSON body.
    Writes: ["400", "401", "403", "413", "415", "422", "429", "503"];
    /// An authenticated operation with a JSON body on one resource named in the path.
    WritesOne: ["400", "401", "403", "404", "413", "415", "422", "429", "503"];
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            kind: format!("https://mira.dev/problems/{}", self.kind),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
        };
        let body = serde_json::to_string(&body).unwrap_or_default();
        let mut res = (self.status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = match self.token_error {
                Some(reason) => HeaderValue::from_str(&format!(
                    "Bearer error=\"invalid_token\", error_description=\"{reason}\""
                ))
                .unwrap_or(HeaderValue::from_static("Bearer error=\"invalid_token\"")),
                None => HeaderValue::from_static("Bearer"),
            };
            res.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        }
        res
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match mira_eventlog::db::sqlstate(&e).as_deref() {
            Some("40001") | Some("40P01") => Self::conflict("the request raced another; retry it"),
            // Text PostgreSQL cannot store or read as the type asked (a NUL character, a value
            // out of range): the request's fault, whichever path it came by.
            Some("22021") | Some("22P02") | Some("22003") | Some("22008") | Some("22007") => {
                Self::bad_request("a value in the request cannot be used (a NUL character, or out of range)")
            }
            _ => Self::internal(e),
        }
    }
}

impl From<AggregateError<JobError>> for ApiError {
    fn from(e: AggregateError<JobError>) -> Self {
        match e {
            AggregateError::UserError(e) => match e {
                JobError::NotFound => Self::not_found("job"),
                JobError::AlreadyExists => Self::conflict("the job already exists"),
                JobError::Invalid(m) => Self::invalid(m),
                other => Self::conflict(other.to_string()),
            },
            AggregateError::AggregateConflict => Self::conflict("the job changed while this request ran; retry it"),
            other => Self::internal(other),
        }
    }
}

impl From<AggregateError<SlideError>> for ApiError {
    fn from(e: AggregateError<SlideError>) -> Self {
        match e {
            AggregateError::UserError(e) => match e {
                SlideError::NotFound => Self::not_found("slide"),
                SlideError::AlreadyExists => Self::conflict("the slide already exists"),
                SlideError::Invalid(m) => Self::invalid(m),
                SlideError::SizeMismatch { .. } => {
                    Self::new(StatusCode::UNPROCESSABLE_ENTITY, "size-mismatch", e.to_string())
                }
                SlideError::Sealing(m) => Self::internal(m),
                other => Self::conflict(other.to_string()),
            },
            AggregateError::AggregateConflict => Self::conflict("the slide changed while this request ran; retry it"),
            other => Self::internal(other),
        }
    }
}
