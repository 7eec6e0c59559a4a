//! Extractors that turn bad input into problem+json instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::problem::ApiError;

/// A JSON body: 413 over the size limit, 415 without a JSON content type, 400 when it is not
/// JSON, 422 (naming the field) when it does not fit the schema, unknown fields included.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json_type = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                let mime = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            });
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload-too-large",
                    "the request body is larger than this endpoint accepts",
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {r}"))
            }
        })?;
        if json_type == Some(false) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as application/json",
            ));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body, which is an object: every body the API takes is one (serde would read a
/// struct from an array too, `[]` as all defaults). An empty body reads as `{}` only if `T`
/// accepts that; `null` only if `T` is an `Option` (a body that may be left out, which the
/// document describes as nullable).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        // `null` is no body where the body may be left out (`ApiJson<Option<T>>`), and does
        // not fit anywhere else.
        Some(b'n') if std::str::from_utf8(bytes).is_ok_and(|t| t.trim() == "null") => {
            return serde_json::from_slice::<T>(b"null")
                .map_err(|_| ApiError::invalid("the body must be a JSON object"));
        }
        // Not JSON at all is malformed (400); JSON of another type does not fit (422).
        _ => match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => return Err(ApiError::invalid("the body must be a JSON object")),
            Err(e) => return Err(ApiError::bad_request(format!("malformed JSON: {e}"))),
        },
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                Err(ApiError::bad_request(format!("malformed JSON: {inner}")))
            } else {
                let path = e.path().to_string();
                if path == "." {
                    Err(ApiError::invalid(inner.to_string()))
                } else {
                    Err(ApiError::invalid(format!("{path}: {inner}")))
                }
            }
        }
    }
}

/// Parses a path id into its newtype; 400 when it is not a UUID.
pub fn parse_id<T>(
    raw: &str,
    what: &str,
    parse: impl Fn(&str) -> Result<T, mira_events::IdError>,
) -> Result<T, ApiError> {
    parse(raw).map_err(|_| ApiError::bad_request(format!("{what} id {raw:?} is not a UUID")))
}

/// The `Idempotency-Key` header, when sent: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(v) = parts.headers.get("idempotency-key") else {
            return Ok(Self(None));
        };
        let s = v
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic()))
            .ok_or_else(|| ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters"))?;
        Ok(Self(Some(s.to_owned())))
    }
}

/// The header as the document describes it: `params(IdempotencyKey)`.
impl utoipa::IntoParams for IdempotencyKey {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::{path::ParameterBuilder, path::ParameterIn, ObjectBuilder, Required, Type};
        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[!-~]{1,255}$"))
            .description(Some("1 to 255 visible ASCII characters."));
        vec![ParameterBuilder::new()
            .name("Idempotency-Key")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .schema(Some(schema))
            .description(Some(
                "The same key with the same body returns the same resource; with another body, 422.",
            ))
            .build()]
    }
}

/// Query strings, with problem+json rejections: 400 when a value does not parse or holds a
/// NUL character.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let v = axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::bad_request(format!("query string: {}", e.body_text())))?;
        // No value of Mira's holds a NUL character, and PostgreSQL's text refuses one. A URI
        // cannot carry a raw NUL, so `%00` is the only way one arrives.
        if parts.uri.query().is_some_and(|q| q.contains("%00")) {
            return Err(ApiError::bad_request("query string: a value holds a NUL character"));
        }
        Ok(v)
    }
}

/// For an optional field the document describes as its type alone (not nullable): absent is
/// `None`, and an explicit `null` is refused as the wrong type (422, naming the field), as the
/// document says. Use with `#[serde(default, deserialize_with = "not_null")]`.
pub fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}
