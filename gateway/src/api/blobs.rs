//! The local blob store's HTTP side (`mira dev`): PUT and GET on `/blobs/<key>` with the
//! signed query the gateway issued. Bodies stream to disk; nothing is buffered whole.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::extract::ApiQuery;
use super::problem::{ApiError, Limited, Problem};
use super::state::AppState;
use crate::blob::SignedQuery;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

fn local(state: &AppState) -> Result<&crate::blob::LocalBlobs, ApiError> {
    state
        .local_blobs
        .as_deref()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not-found", "this gateway stores blobs in S3"))
}
/// The local blob store's operations (`mira dev`).
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(download, upload))
}

#[utoipa::path(put, operation_id = "put_blob", path = "/blobs/{*key}", summary = "Upload to a signed URL of the local blob store (mira dev)",
    security(), params(("key" = String, Path)),
    responses((status = 200, description = "stored; ETag header"), (status = 400, response = inline(Problem)),
              (status = 403, response = inline(Problem)), (status = 413, response = inline(Problem)),
              (status = 415, response = inline(Problem)), Limited))]
pub async fn upload(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiQuery(q): ApiQuery<SignedQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let store = local(&state)?;
    store
        .check("PUT", &key, &q)
        .map_err(|why| ApiError::forbidden(format!("upload refused: {why}")))?;
    // A slide's single PUT carries the type it was registered with, as S3 requires of a URL
    // presigned with one.
    if let Some(declared) = &q.content_type {
        let sent = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
        if sent.as_deref() != Some(declared.to_ascii_lowercase().as_str()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!(
                    "upload refused: send content-type: {declared}, the type the slide was registered with (got {})",
                    sent.as_deref().unwrap_or("none")
                ),
            ));
        }
    }
    let target = store
        .put_target(&key, &q)
        .map_err(|why| ApiError::bad_request(format!("upload refused: {why}")))?;
    let too_large = |max: u64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!("upload refused: this URL takes at most {max} bytes (the declared size)"),
        )
    };
    // A declared length over the limit is refused before a byte is read.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (q.max_bytes, declared) {
        if len > max {
            return Err(too_large(max));
        }
    }
    let etag = store
        .write_stream(&target, body.into_data_stream(), q.max_bytes)
        .await
        .map_err(|e| match e {
            crate::blob::WriteError::TooLarge(max) => too_large(max),
            crate::blob::WriteError::Other(e) => ApiError::bad_request(format!("upload failed: {e}")),
        })?;
    let mut res = StatusCode::OK.into_response();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        res.headers_mut().insert(header::ETAG, v);
    }
    Ok(res)
}

#[utoipa::path(get, operation_id = "get_blob", path = "/blobs/{*key}", summary = "Download from a signed URL of the local blob store (mira dev)",
    security(), params(("key" = String, Path)),
    responses((status = 200, description = "the object"), (status = 400, response = inline(Problem)),
              (status = 403, response = inline(Problem)), (status = 404, response = inline(Problem)), Limited))]
pub async fn download(
    State(state): State<AppState>,
    Path(key): Path<String>,
    ApiQuery(q): ApiQuery<SignedQuery>,
) -> Result<Response, ApiError> {
    let store = local(&state)?;
    store
        .check("GET", &key, &q)
        .map_err(|why| ApiError::forbidden(format!("download refused: {why}")))?;
    let file = tokio::fs::File::open(store.path_of(&key))
        .await
        .map_err(|_| ApiError::not_found("object"))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::blob::content_type_of(&key)),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
