//! Slides: register (with upload URLs), complete the upload, list, read.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use chrono::{DateTime, Utc};
use mira_aggregates::{SlideCommand, SlideStatus};
use mira_events::SlideId;
use mira_projections::views::{SlideName, SlideView};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Identity;
use super::extract::{parse_id, ApiJson, ApiQuery, IdempotencyKey};
use super::idempotency::{self, Claim};
use super::problem::{ApiError, ApiResult, Problem, Reads, ReadsOne, Writes, WritesOne};
use super::state::{AppState, READERS, WRITERS};
use crate::blob::{BlobError, CompletedPart, MultipartPlan, UploadPlan};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The media types a slide may be registered with: what OpenSlide opens (the TIFF family and
/// the vendor formats, which browsers and upload tools mostly send as octet-stream or TIFF),
/// never a type a browser would render, such as `text/html` (ADR 0011).
pub const SLIDE_CONTENT_TYPES: &[&str] = &[
    "image/tiff",
    "image/x-tiff",
    "application/octet-stream",
    "image/x-aperio-svs",
    "image/x-hamamatsu-ndpi",
    "image/x-leica-scn",
    "image/x-mirax",
    "image/x-ventana-bif",
    "image/x-philips-tiff",
];

/// Largest slide accepted: S3's object limit.
const MAX_SLIDE_BYTES: u64 = 5 * 1024 * 1024 * 1024 * 1024;

fn slide_types() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(SLIDE_CONTENT_TYPES.iter().copied()))
        .build()
}

/// The body of `POST /api/slides`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSlide {
    #[schema(min_length = 1, max_length = 255)]
    pub name: String,
    #[schema(minimum = 1, maximum = 5_497_558_138_880u64)]
    pub size_bytes: u64,
    #[schema(schema_with = slide_types)]
    pub content_type: String,
    #[serde(default, deserialize_with = "super::extract::not_null")]
    #[schema(nullable = false, pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: Option<String>,
    #[serde(default, deserialize_with = "super::extract::not_null")]
    #[schema(nullable = false, min_length = 1, max_length = 255)]
    pub file_name: Option<String>,
}

/// `POST /api/slides`'s answer: the slide, and where to upload it (none when a replay finds it
/// uploaded already).
#[derive(Debug, Serialize, ToSchema)]
pub struct SlideCreated {
    #[schema(value_type = uuid::Uuid)]
    pub slide_id: SlideId,
    pub status: &'static str,
    pub upload: Option<UploadPlan>,
}

/// Where a slide's upload stands.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SlideStatus)]
pub struct UploadState {
    #[schema(value_type = uuid::Uuid)]
    pub slide_id: SlideId,
    pub status: &'static str,
    pub size_bytes: u64,
}

/// A page of slides, newest first; `next` is the cursor of the next page, null on the last.
#[derive(Debug, Serialize, ToSchema)]
pub struct SlidePage {
    #[schema(value_type = Vec<SlideView>)]
    pub items: Vec<serde_json::Value>,
    pub next: Option<String>,
}

impl NewSlide {
    fn validate(&self) -> ApiResult<()> {
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 255 {
            return Err(ApiError::invalid("name: must be 1 to 255 characters"));
        }
        if self.size_bytes == 0 || self.size_bytes > MAX_SLIDE_BYTES {
            return Err(ApiError::invalid("size_bytes: must be between 1 byte and 5 TiB"));
        }
        let ct = self.content_type.trim().to_ascii_lowercase();
        if !SLIDE_CONTENT_TYPES.contains(&ct.as_str()) {
            return Err(ApiError::invalid(format!(
                "content_type: Mira opens whole-slide images only; use one of {}",
                SLIDE_CONTENT_TYPES.join(", ")
            )));
        }
        if let Some(h) = &self.sha256 {
            if h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(ApiError::invalid("sha256: must be 64 hexadecimal digits"));
            }
        }
        if let Some(f) = &self.file_name {
            if f.is_empty() || f.chars().count() > 255 {
                return Err(ApiError::invalid("file_name: must be 1 to 255 characters"));
            }
        }
        Ok(())
    }
}

fn object_key(who: &Identity, id: SlideId) -> String {
    format!("slides/{}/{}", who.tenant.as_str(), id)
}

fn blob_error(e: BlobError) -> ApiError {
    match e {
        BlobError::Rejected(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "upload-incomplete", m),
        BlobError::Storage(m) => ApiError::internal(m),
    }
}
/// Slides' operations.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(create, list))
        .routes(routes!(get_one))
        .routes(routes!(uploaded))
        .routes(routes!(part_page))
}

/// `POST /api/slides`: registers the slide in the log and returns where to upload it.
#[utoipa::path(post, operation_id = "create_slide", path = "/api/slides", summary = "Register a slide and get its upload URLs",
    params(IdempotencyKey), request_body = NewSlide,
    responses((status = 201, body = SlideCreated), Writes))]
pub async fn create(
    State(state): State<AppState>,
    who: Identity,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<NewSlide>,
) -> ApiResult<Response> {
    who.require(WRITERS)?;
    body.validate()?;
    let fresh = SlideId::new();
    let claim = match &key {
        Some(k) => idempotency::claim_request(&state, &who, "slides", k, &body, fresh.as_uuid()).await?,
        None => Claim::New(fresh.as_uuid()),
    };
    let id = SlideId(claim.id());
    let object_key = object_key(&who, id);
    let registered = state
        .commands
        .slide(
            &who.context(key.as_deref()),
            id,
            SlideCommand::Register {
                slide_id: id,
                name: body.name.trim().to_owned(),
                file_name: body.file_name.clone(),
                size_bytes: body.size_bytes,
                content_type: body.content_type.clone(),
                sha256: body.sha256.as_ref().map(|h| h.to_ascii_lowercase()),
                object_key: object_key.clone(),
            },
        )
        .await;
    let status = match registered {
        Ok(()) => SlideStatus::Registered,
        // A replay of a request whose command already ran: with a key, the id belongs to that
        // key alone (see jobs::create). Answer with where the slide is now.
        Err(
            cqrs_es::AggregateError::UserError(mira_aggregates::SlideError::AlreadyExists)
            | cqrs_es::AggregateError::AggregateConflict,
        ) if key.is_some() => {
            state
                .commands
                .load_slide(&who.tenant, id)
                .await?
                .ok_or_else(|| ApiError::internal("an existing slide did not load"))?
                .status
        }
        Err(e) => return Err(e.into()),
    };
    let upload = if status == SlideStatus::Registered {
        Some(
            state
                .blobs
                .plan_upload(&object_key, body.size_bytes, &body.content_type)
                .await
                .map_err(blob_error)?,
        )
    } else {
        None
    };
    tracing::info!(slide_id = %id, replay = matches!(claim, Claim::Replay(_)), "slide registered");
    let created = SlideCreated {
        slide_id: id,
        status: status.as_str(),
        upload,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// The body of `POST /api/slides/{id}/uploaded`: the parts of a multipart upload, or nothing
/// after a single `PUT`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Uploaded {
    #[serde(default, deserialize_with = "super::extract::not_null")]
    #[schema(nullable = false)]
    pub parts: Option<Vec<CompletedPart>>,
    /// Which multipart upload to complete; default the newest for this slide.
    #[serde(default, deserialize_with = "super::extract::not_null")]
    #[schema(nullable = false)]
    pub upload_id: Option<String>,
}

/// The caller's slide `raw` from the log, for a writer: 404 when it is not the caller's tenant's.
async fn writable_slide(state: &AppState, who: &Identity, raw: &str) -> ApiResult<(SlideId, mira_aggregates::Slide)> {
    who.require(WRITERS)?;
    let id = parse_id(raw, "slide", SlideId::parse)?;
    let slide = state
        .commands
        .load_slide(&who.tenant, id)
        .await?
        .ok_or(ApiError::not_found("slide"))?;
    Ok((id, slide))
}

/// Holds the slide's copy claim for as long as the returned claim lives: a session-level
/// advisory lock on a connection that is closed, never returned to the pool, when dropped, so a
/// crash or an early return releases it. No transaction is held while the copy runs. `None`
/// when another request holds it.
async fn claim_copy(state: &AppState, id: SlideId) -> ApiResult<Option<ClaimedCopy>> {
    // Each claim holds a pooled connection for the copy's length (minutes for a large
    // multipart copy): at most COPIES_AT_ONCE at a time, so completions cannot take the pool
    // every other request needs.
    let permit = COPY_CLAIMS.try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{COPIES_AT_ONCE} upload completions are in progress on this server: retry shortly"),
        )
    })?;
    let mut conn = state.pool.acquire().await?;
    conn.close_on_drop();
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
        .bind(format!("mira.slide-copy:{id}"))
        .fetch_one(&mut *conn)
        .await?;
    Ok(got.then_some(ClaimedCopy { conn, _permit: permit }))
}

/// Upload completions copying at once, per server.
const COPIES_AT_ONCE: usize = 4;
static COPY_CLAIMS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(COPIES_AT_ONCE);

/// A held copy claim: released by [`ClaimedCopy::release`], or, when dropped without it (a
/// panic, a cancelled request), when its connection closes.
struct ClaimedCopy {
    conn: sqlx::pool::PoolConnection<sqlx::Postgres>,
    _permit: tokio::sync::SemaphorePermit<'static>,
}

impl ClaimedCopy {
    /// Unlocks the claim now. Closing the connection (on drop) also unlocks it, but later: the
    /// close runs after the response, so a client's immediate retry could be refused.
    async fn release(mut self, id: SlideId) {
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(format!("mira.slide-copy:{id}"))
            .execute(&mut *self.conn)
            .await
        {
            tracing::warn!(slide_id = %id, error = %e, "could not unlock the copy claim; it goes with its connection");
        }
    }
}

/// `POST /api/slides/{id}/uploaded`: completes a multipart upload if parts are given, copies
/// the upload to the slide's immutable key, checks the copy's size against the declared one,
/// then records `SlideUploaded` with the copy's version. One request per slide at a time:
/// another while a copy is in progress is refused (409), and the claim's holder reads the
/// slide's state again after taking it, so a copy is never made once `SlideUploaded` is
/// recorded: what the worker verifies is what every job processes.
#[utoipa::path(post, operation_id = "complete_upload", path = "/api/slides/{id}/uploaded",
    summary = "Complete the upload: copies it to the slide's immutable key, checks its size, then records it",
    params(("id" = uuid::Uuid, Path)), request_body(content = Option<Uploaded>),
    responses((status = 200, body = UploadState), (status = 409, response = inline(Problem)), WritesOne))]
pub async fn uploaded(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
    ApiJson(body): ApiJson<Option<Uploaded>>,
) -> ApiResult<Json<UploadState>> {
    let body = body.unwrap_or_default();
    let (id, _) = writable_slide(&state, &who, &raw).await?;
    let Some(claim) = claim_copy(&state, id).await? else {
        return Err(ApiError::conflict(
            "another upload completion of this slide is in progress: retry when it has finished",
        ));
    };
    let done = complete_upload(&state, &who, &raw, id, body).await;
    // Released before the answer goes out, whatever it is: a client that retries at once
    // (after a refused part list, say) must not find its own finished attempt still holding it.
    claim.release(id).await;
    done
}

/// The part of `uploaded` done under the slide's copy claim.
async fn complete_upload(
    state: &AppState,
    who: &Identity,
    raw: &str,
    id: SlideId,
    body: Uploaded,
) -> ApiResult<Json<UploadState>> {
    let (_, slide) = writable_slide(state, who, raw).await?;
    match slide.status {
        SlideStatus::Registered => {}
        // Already recorded: a repeat of a completed request.
        SlideStatus::Uploaded | SlideStatus::Verified => {
            return Ok(Json(UploadState {
                slide_id: id,
                status: slide.status.as_str(),
                size_bytes: slide.size_bytes,
            }));
        }
        other => {
            return Err(ApiError::conflict(format!("the slide is {}", other.as_str())));
        }
    }
    if let Some(parts) = &body.parts {
        if parts.is_empty() {
            return Err(ApiError::invalid("parts: list the uploaded parts"));
        }
        let upload_id = match &body.upload_id {
            Some(u) => u.clone(),
            None => state
                .blobs
                .uploads_in_progress(&slide.object_key)
                .await
                .map_err(blob_error)?
                .pop()
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "upload-missing",
                        "no multipart upload is in progress for this slide",
                    )
                })?,
        };
        state
            .blobs
            .complete_multipart(&slide.object_key, &upload_id, parts)
            .await
            .map_err(blob_error)?;
    }
    let missing = || {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "upload-missing",
            "the slide was never uploaded: PUT it to the upload URL first",
        )
    };
    let uploaded = state
        .blobs
        .size_of(&slide.object_key)
        .await
        .map_err(blob_error)?
        .ok_or_else(missing)?;
    // The immutable copy the worker verifies and processes: the upload URL stays valid until it
    // expires, and what it could still replace is never read again. An upload of the wrong
    // size is refused below without a copy.
    let (size, version_id) = if uploaded == slide.size_bytes {
        let copied = state
            .blobs
            .copy(&slide.object_key, &mira_aggregates::copy_key(&slide.object_key))
            .await
            .map_err(blob_error)?
            .ok_or_else(missing)?;
        (copied.size, copied.version_id)
    } else {
        (uploaded, None)
    };
    state
        .commands
        .slide(
            &who.context(None),
            id,
            SlideCommand::MarkUploaded {
                size_bytes: size,
                version_id,
            },
        )
        .await?;
    tracing::info!(slide_id = %id, size, "slide uploaded");
    Ok(Json(UploadState {
        slide_id: id,
        status: SlideStatus::Uploaded.as_str(),
        size_bytes: size,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PartPageQuery {
    #[param(pattern = "^[^\\u0000]*$")]
    pub upload_id: String,
    /// The first part of the page.
    #[param(minimum = 1, maximum = 10000)]
    pub from: u32,
}

/// `GET /api/slides/{id}/upload/parts?upload_id=&from=`: the next page of part URLs of the
/// slide's multipart upload, asked for as the client needs them.
#[utoipa::path(get, operation_id = "upload_parts", path = "/api/slides/{id}/upload/parts",
    summary = "The next page of part URLs of the slide's multipart upload (at most 100 each)",
    params(("id" = uuid::Uuid, Path), PartPageQuery),
    responses((status = 200, body = MultipartPlan), (status = 409, response = inline(Problem)),
              (status = 422, response = inline(Problem)), ReadsOne))]
pub async fn part_page(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
    ApiQuery(q): ApiQuery<PartPageQuery>,
) -> ApiResult<Json<crate::blob::MultipartPlan>> {
    let (_, slide) = writable_slide(&state, &who, &raw).await?;
    if slide.status != SlideStatus::Registered {
        return Err(ApiError::conflict(format!(
            "the slide is {}: its upload is over",
            slide.status.as_str()
        )));
    }
    let uploads = state
        .blobs
        .uploads_in_progress(&slide.object_key)
        .await
        .map_err(blob_error)?;
    if !uploads.contains(&q.upload_id) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "upload-missing",
            "upload_id: no multipart upload of this slide has that id",
        ));
    }
    let page = state
        .blobs
        .part_page(&slide.object_key, &q.upload_id, slide.size_bytes, q.from)
        .await
        .map_err(|e| match e {
            BlobError::Rejected(m) => ApiError::bad_request(m),
            other => blob_error(other),
        })?;
    Ok(Json(page))
}

/// The slide as the API shows it: its name opened (`null` once its subject is erased).
pub async fn view(state: &AppState, mut slide: SlideView) -> SlideView {
    slide.name = SlideName::Open(open_name(state, &slide.name).await);
    slide
}

/// A slide's name opened: `None` once its subject is erased.
pub async fn open_name(state: &AppState, name: &SlideName) -> Option<String> {
    match name {
        SlideName::Sealed(sealed) => mira_events::seal::open(state.keyring.as_ref(), sealed, "name")
            .await
            .ok(),
        SlideName::Open(name) => name.clone(),
    }
}

#[utoipa::path(get, operation_id = "get_slide", path = "/api/slides/{id}", summary = "One slide",
    params(("id" = uuid::Uuid, Path)), responses((status = 200, body = SlideView), ReadsOne))]
pub async fn get_one(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require(READERS)?;
    let id = parse_id(&raw, "slide", SlideId::parse)?;
    let row = state
        .read
        .slide(&who.tenant, id.as_uuid())
        .await?
        .ok_or(ApiError::not_found("slide"))?;
    Ok(Json(super::public::public_view(&view(&state, row).await)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Slides per page (50 when absent).
    #[param(nullable = false, minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next` of the page before.
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub cursor: Option<String>,
}

pub fn encode_cursor<T: Serialize>(c: &T) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(c).unwrap_or_default())
}

pub fn decode_cursor<T: serde::de::DeserializeOwned>(s: &str) -> ApiResult<T> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::bad_request("cursor: not a cursor this API returned"))
}

pub fn page_limit(limit: Option<i64>) -> ApiResult<i64> {
    match limit {
        None => Ok(50),
        Some(n) if (1..=500).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::bad_request("limit: must be 1 to 500")),
    }
}

#[utoipa::path(get, operation_id = "list_slides", path = "/api/slides", summary = "List slides, newest first",
    params(ListQuery), responses((status = 200, body = SlidePage), Reads))]
pub async fn list(
    State(state): State<AppState>,
    who: Identity,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<SlidePage>> {
    who.require(READERS)?;
    let limit = page_limit(q.limit)?;
    let before: Option<(DateTime<Utc>, uuid::Uuid)> = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let rows = state.read.slides(&who.tenant, before, limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| encode_cursor(&(r.registered_at, r.slide_id))))
        .flatten();
    let mut items = Vec::with_capacity(rows.len());
    for r in rows {
        items.push(super::public::public_view(&view(&state, r).await));
    }
    Ok(Json(SlidePage { items, next }))
}
