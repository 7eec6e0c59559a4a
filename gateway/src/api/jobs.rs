//! Jobs: submit (idempotent), list, read, cancel, retry, history.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use mira_aggregates::{JobCommand, JobError, JobStatus, SlideStatus};
use mira_events::params::JobSpec;
use mira_events::{JobId, Priority, SlideId};
use mira_projections::query::{JobCursor, JobFilter};
use mira_projections::views::{JobView, TimelineEntry};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{IntoParams, ToSchema};

use super::auth::Identity;
use super::extract::{parse_id, ApiJson, ApiQuery, IdempotencyKey};
use super::idempotency::{self, Claim};
use super::layers::succeeded_results;
use super::problem::{ApiError, ApiResult, Problem, Reads, ReadsOne, Writes, WritesOne};
use super::slides::{decode_cursor, encode_cursor, page_limit};
use super::state::{AppState, READERS, WRITERS};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The body of `POST /api/jobs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    #[schema(value_type = uuid::Uuid)]
    pub slide_id: SlideId,
    #[schema(schema_with = kinds)]
    pub kind: String,
    /// The kind's parameters; absent or null means every default.
    #[serde(default)]
    #[schema(schema_with = params)]
    pub params: Option<serde_json::Value>,
    /// `stat` or `routine` (the default). Who may ask for STAT is `Jobs__StatGroups`. Read as
    /// text, so that any other value (a number too) is a 422 that names the field.
    #[serde(default, deserialize_with = "super::extract::not_null")]
    #[schema(schema_with = priorities)]
    pub priority: Option<String>,
}

/// `kind`: one of the kinds `job_kinds!` declares.
fn kinds() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(JobSpec::KINDS.iter().copied()))
            .build(),
    )
}

/// `params`: the parameters of one of the kinds (their schemas in the kinds' order), or null.
fn params() -> Schema {
    let mut one_of = OneOfBuilder::new();
    for (name, _) in JobSpec::params_schemas() {
        one_of = one_of.item(RefOr::Ref(Ref::from_schema_name(name)));
    }
    let one_of = one_of
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some("The kind's parameters; absent or null means every default."))
        .build();
    Schema::OneOf(one_of)
}

fn priorities() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["routine", "stat"]))
            .default(Some(serde_json::Value::from("routine")))
            .description(Some(
                "A STAT job is taken before every routine job waiting; a running job is not stopped for it. \
                 Who may ask for STAT is a setting (Jobs__StatGroups; pathologists by default): anyone else gets 403.",
            ))
            .build(),
    )
}

/// A job's status after a command: `POST /api/jobs`, cancel and retry.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = JobStatus)]
pub struct JobState {
    #[schema(value_type = uuid::Uuid)]
    pub job_id: JobId,
    pub status: &'static str,
}

/// The request as accepted, defaults filled in: what the idempotency fingerprint covers.
/// A routine job's fingerprint is what it was before priorities existed.
#[derive(Debug, Serialize)]
struct Accepted<'a> {
    slide_id: SlideId,
    #[serde(flatten)]
    spec: &'a JobSpec,
    #[serde(skip_serializing_if = "is_routine")]
    priority: Priority,
}

fn is_routine(p: &Priority) -> bool {
    *p == Priority::Routine
}
/// Jobs' operations.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(create, list))
        .routes(routes!(get_one))
        .routes(routes!(cancel))
        .routes(routes!(retry))
        .routes(routes!(events))
        .routes(routes!(verify))
        .routes(routes!(results))
        .routes(routes!(super::layers::layer))
}

/// `POST /api/jobs`: 202 `{job_id, status}`. A job on a slide that is not verified yet is
/// accepted and waits in `submitted`.
#[utoipa::path(post, operation_id = "submit_job", path = "/api/jobs", summary = "Submit a job",
    params(IdempotencyKey), request_body = NewJob,
    responses((status = 202, body = JobState), (status = 404, response = inline(Problem)),
              (status = 409, response = inline(Problem)), Writes))]
pub async fn create(
    State(state): State<AppState>,
    who: Identity,
    IdempotencyKey(key): IdempotencyKey,
    ApiJson(body): ApiJson<NewJob>,
) -> ApiResult<Response> {
    who.require(WRITERS)?;
    let priority: Priority = match body.priority.as_deref() {
        None => Priority::Routine,
        Some(p) => p
            .parse()
            .map_err(|e: String| ApiError::invalid(format!("priority: {e}")))?,
    };
    if priority == Priority::Stat && !state.limits.stat_roles.admits(&who) {
        let names = state.limits.stat_roles.names();
        return Err(ApiError::forbidden(if names.is_empty() {
            "priority: no one may submit STAT jobs here (Jobs__StatGroups is empty)".to_owned()
        } else {
            format!(
                "priority: STAT jobs may be submitted by {} (Jobs__StatGroups)",
                names.join(", ")
            )
        }));
    }
    let spec = JobSpec::from_request(&body.kind, body.params.as_ref()).map_err(|e| ApiError::invalid(e.to_string()))?;
    let fresh = JobId::new();
    let claim = match &key {
        Some(k) => {
            let accepted = Accepted {
                slide_id: body.slide_id,
                spec: &spec,
                priority,
            };
            idempotency::claim_request(&state, &who, "jobs", k, &accepted, fresh.as_uuid()).await?
        }
        None => Claim::New(fresh.as_uuid()),
    };
    let id = JobId(claim.id());
    let slide = state
        .commands
        .load_slide(&who.tenant, body.slide_id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not-found", "slide_id: no such slide"))?;
    if matches!(slide.status, SlideStatus::Rejected | SlideStatus::Deleted) {
        return Err(ApiError::conflict(format!(
            "slide_id: the slide is {} and cannot be processed",
            slide.status.as_str()
        )));
    }
    let submitted = state
        .commands
        .job(
            &who.context(key.as_deref()),
            id,
            JobCommand::Submit {
                slide_id: body.slide_id,
                spec: spec.clone(),
                max_attempts: state.limits.job_max_attempts,
                priority,
            },
        )
        .await;
    let status = match submitted {
        Ok(()) => "submitted",
        // With a key, the id belongs to that key alone: a job already there was made by a
        // concurrent or earlier request with the same body. Answer with where it is now.
        Err(
            cqrs_es::AggregateError::UserError(JobError::AlreadyExists) | cqrs_es::AggregateError::AggregateConflict,
        ) if key.is_some() => state
            .commands
            .load_job(&who.tenant, id)
            .await?
            .map(|j| j.status.as_str())
            .ok_or_else(|| ApiError::internal("an existing job did not load"))?,
        Err(e) => return Err(e.into()),
    };
    tracing::info!(job_id = %id, replay = matches!(claim, Claim::Replay(_)), "job submitted");
    Ok((StatusCode::ACCEPTED, Json(JobState { job_id: id, status })).into_response())
}

fn statuses() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(JobStatus::SHOWN.iter().map(|s| s.as_str())))
            .build(),
    )
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    #[param(schema_with = statuses)]
    pub status: Option<String>,
    #[param(nullable = false, value_type = Option<uuid::Uuid>)]
    pub slide_id: Option<String>,
    /// A job's id, or its short id: the last 8 hex digits (the first ones of a UUIDv7 are its
    /// time, shared by jobs made within a minute).
    #[param(
        nullable = false,
        pattern = "^([0-9a-fA-F]{8}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
    )]
    pub id: Option<String>,
    /// The submitter's user id.
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub submitted_by: Option<String>,
    /// Submitted at or after (RFC 3339).
    #[param(nullable = false)]
    pub since: Option<DateTime<Utc>>,
    /// Submitted before (RFC 3339).
    #[param(nullable = false)]
    pub until: Option<DateTime<Utc>>,
    /// Jobs per page (50 when absent).
    #[param(nullable = false, minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next` of the page before.
    #[param(nullable = false, pattern = "^[^\\u0000]*$")]
    pub cursor: Option<String>,
}

/// A job as the API shows it: the read model's view without its log position, and whether it
/// waits for the handlers' admission.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Job)]
pub struct ShownJob {
    #[serde(flatten)]
    #[schema(inline)]
    pub job: JobView,
    /// The display name of the job's slide; null once the slide's subject is erased.
    pub slide_name: Option<String>,
    /// Ready to run (its slide verified, or its retry due) and waiting for the lifecycle
    /// handlers to admit it to a GPU queue: tenants take turns, and a few routine jobs at a
    /// time are queued (Jobs__AdmissionWindow).
    pub waiting_for_admission: bool,
}

/// A page of jobs, newest first; `next` is the cursor of the next page, null on the last.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    #[schema(value_type = Vec<ShownJob>)]
    pub items: Vec<serde_json::Value>,
    pub next: Option<String>,
}

#[utoipa::path(get, operation_id = "list_jobs", path = "/api/jobs", summary = "List jobs, newest first",
    params(ListQuery), responses((status = 200, body = JobPage), Reads))]
pub async fn list(
    State(state): State<AppState>,
    who: Identity,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<JobPage>> {
    who.require(READERS)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                let all: Vec<&str> = JobStatus::SHOWN.iter().map(|s| s.as_str()).collect();
                ApiError::bad_request(format!("status: {s:?} is not one of {}", all.join(", ")))
            })
        })
        .transpose()?;
    let slide_id = q
        .slide_id
        .as_deref()
        .map(|s| parse_id(s, "slide", SlideId::parse))
        .transpose()?;
    let limit = page_limit(q.limit)?;
    let after: Option<JobCursor> = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let id =
        q.id.as_deref()
            .map(|i| {
                let short = i.len() == 8 && i.bytes().all(|b| b.is_ascii_hexdigit());
                if short {
                    Ok(i.to_ascii_lowercase())
                } else {
                    parse_id(i, "job", JobId::parse).map(|j| j.to_string())
                }
            })
            .transpose()?;
    let filter = JobFilter {
        id,
        status,
        slide_id: slide_id.map(|s| s.as_uuid()),
        submitted_by: q.submitted_by,
        submitted_after: q.since,
        submitted_before: q.until,
    };
    let page = state.read.jobs(&who.tenant, &filter, after, limit).await?;
    Ok(Json(JobPage {
        items: shown_jobs(&state, &who, &page.items).await?,
        next: page.next.map(|c| encode_cursor(&c)),
    }))
}

#[utoipa::path(get, operation_id = "get_job", path = "/api/jobs/{id}", summary = "One job, with progress and attempts",
    params(("id" = uuid::Uuid, Path)), responses((status = 200, body = ShownJob), ReadsOne))]
pub async fn get_one(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require(READERS)?;
    let id = parse_id(&raw, "job", JobId::parse)?;
    let job: JobView = state
        .read
        .job(&who.tenant, id.as_uuid())
        .await?
        .ok_or(ApiError::not_found("job"))?;
    let mut shown = shown_jobs(&state, &who, std::slice::from_ref(&job)).await?;
    Ok(Json(shown.pop().unwrap_or_default()))
}

/// Which of `jobs` are ready to run and wait for the handlers to admit them to a GPU queue
/// (ADR 0027). Only jobs not queued yet can wait; the function answers for the ids given.
async fn waiting_for_admission(
    state: &AppState,
    who: &Identity,
    jobs: &[JobView],
) -> ApiResult<std::collections::HashSet<uuid::Uuid>> {
    let ids: Vec<uuid::Uuid> = jobs
        .iter()
        .filter(|j| matches!(j.status, JobStatus::Submitted | JobStatus::RetryScheduled))
        .map(|j| j.job_id)
        .collect();
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let found: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT mira_jobs_waiting_for_admission($1, $2)")
        .bind(who.tenant.as_str())
        .bind(&ids)
        .fetch_all(&state.pool)
        .await
        .map_err(ApiError::internal)?;
    Ok(found.into_iter().collect())
}

/// Jobs as the API shows them: each view with its slide's name and whether it waits for its
/// admission, in two queries for the whole list (no request per job).
pub async fn shown_jobs(state: &AppState, who: &Identity, jobs: &[JobView]) -> ApiResult<Vec<serde_json::Value>> {
    let waiting = waiting_for_admission(state, who, jobs).await?;
    let mut slides: Vec<uuid::Uuid> = jobs.iter().map(|j| j.slide_id).collect();
    slides.sort_unstable();
    slides.dedup();
    let mut names = std::collections::HashMap::new();
    for (id, name) in state.read.slide_names(&who.tenant, &slides).await? {
        names.insert(id, super::slides::open_name(state, &name).await);
    }
    Ok(jobs
        .iter()
        .map(|job| {
            super::public::public_view(&ShownJob {
                job: job.clone(),
                slide_name: names.get(&job.slide_id).cloned().flatten(),
                waiting_for_admission: waiting.contains(&job.job_id),
            })
        })
        .collect())
}

/// The body of `POST /api/jobs/{id}/cancel`, which may be left out.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Cancel)]
pub struct CancelBody {
    /// Why, for the job's history.
    #[serde(default, deserialize_with = "super::extract::not_null")]
    #[schema(nullable = false, max_length = 1000)]
    pub reason: Option<String>,
}

async fn transition(state: &AppState, who: &Identity, raw: &str, command: JobCommand) -> ApiResult<Response> {
    who.require(WRITERS)?;
    let id = parse_id(raw, "job", JobId::parse)?;
    // Unknown ids and other tenants' jobs are both "not found": the repository only sees
    // this tenant's streams.
    state.commands.job(&who.context(None), id, command).await?;
    let status = state
        .commands
        .load_job(&who.tenant, id)
        .await?
        .map(|j| j.status.as_str())
        .ok_or(ApiError::not_found("job"))?;
    Ok((StatusCode::ACCEPTED, Json(JobState { job_id: id, status })).into_response())
}

#[utoipa::path(post, operation_id = "cancel_job", path = "/api/jobs/{id}/cancel", summary = "Cancel a job",
    params(("id" = uuid::Uuid, Path)), request_body(content = Option<CancelBody>),
    responses((status = 202, body = JobState), (status = 409, response = inline(Problem)), WritesOne))]
pub async fn cancel(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
    ApiJson(body): ApiJson<Option<CancelBody>>,
) -> ApiResult<Response> {
    let body = body.unwrap_or_default();
    if body.reason.as_ref().is_some_and(|r| r.chars().count() > 1000) {
        return Err(ApiError::invalid("reason: at most 1000 characters"));
    }
    transition(&state, &who, &raw, JobCommand::Cancel { reason: body.reason }).await
}

#[utoipa::path(post, operation_id = "retry_job", path = "/api/jobs/{id}/retry", summary = "Run a failed or cancelled job again",
    params(("id" = uuid::Uuid, Path)),
    responses((status = 202, body = JobState), (status = 409, response = inline(Problem)), ReadsOne))]
pub async fn retry(State(state): State<AppState>, who: Identity, Path(raw): Path<String>) -> ApiResult<Response> {
    transition(&state, &who, &raw, JobCommand::Retry).await
}

/// A job's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct Timeline {
    #[schema(value_type = uuid::Uuid)]
    pub job_id: JobId,
    pub events: Vec<TimelineEntry>,
}

/// `GET /api/jobs/{id}/events`: the job's history, each event with its actor, time and hash.
#[utoipa::path(get, operation_id = "job_events", path = "/api/jobs/{id}/events", summary = "The job's history with actors and hashes",
    params(("id" = uuid::Uuid, Path)), responses((status = 200, body = Timeline), ReadsOne))]
pub async fn events(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
) -> ApiResult<Json<Timeline>> {
    who.require(READERS)?;
    let id = parse_id(&raw, "job", JobId::parse)?;
    let rows = state.read.timeline(&who.tenant, id.as_uuid()).await?;
    if rows.is_empty() && state.read.job(&who.tenant, id.as_uuid()).await?.is_none() {
        return Err(ApiError::not_found("job"));
    }
    Ok(Json(Timeline {
        job_id: id,
        events: rows,
    }))
}

/// Whether the log verifies for a job's events: what was checked, or the first fault found.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StreamVerification {
    /// Every check held (`verified` is true).
    #[schema(title = "Verified")]
    Verified {
        #[schema(value_type = uuid::Uuid)]
        job_id: JobId,
        verified: bool,
        /// The job's events.
        events: u64,
        /// Of them, those under a signed checkpoint, matched to its leaves.
        checkpointed: u64,
        /// The checkpoints that cover them, each checked against the witness.
        checkpoints: u64,
        /// The log's newest checkpoint, matched in the witness.
        witnessed_checkpoint: Option<i64>,
    },
    /// A check failed (`verified` is false).
    #[schema(title = "Failed")]
    Failed {
        #[schema(value_type = uuid::Uuid)]
        job_id: JobId,
        verified: bool,
        /// What does not hold.
        reason: String,
        /// The log position of the first bad event.
        position: i64,
        event_id: Option<uuid::Uuid>,
    },
}

/// `GET /api/jobs/{id}/verify`: whether the log verifies for this job's events, with the
/// checks of `mira audit verify` that one stream can answer (`verify_stream`). A failed
/// verification is an answer (`verified: false` and why), not an error; 503 when this
/// gateway has no audit key or witness to verify against.
#[utoipa::path(get, operation_id = "verify_job", path = "/api/jobs/{id}/verify",
    summary = "Whether the log verifies for the job's events (the checks of mira audit verify one stream can answer)",
    params(("id" = uuid::Uuid, Path)), responses((status = 200, body = StreamVerification), ReadsOne))]
pub async fn verify(
    State(state): State<AppState>,
    who: Identity,
    Path(raw): Path<String>,
) -> ApiResult<Json<StreamVerification>> {
    who.require(READERS)?;
    let id = parse_id(&raw, "job", JobId::parse)?;
    if state.read.job(&who.tenant, id.as_uuid()).await?.is_none() {
        return Err(ApiError::not_found("job"));
    }
    let audit = state.audit.as_ref().map_err(|why| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("this gateway cannot verify the log: {why}"),
        )
    })?;
    let answer = match audit
        .verify_stream(&state.pool, &who.tenant, "Job", &id.to_string())
        .await
    {
        Ok(r) => StreamVerification::Verified {
            job_id: id,
            verified: true,
            events: r.events,
            checkpointed: r.checkpointed,
            checkpoints: r.checkpoints,
            witnessed_checkpoint: r.witnessed_checkpoint,
        },
        Err(mira_eventlog::verify::VerifyError::Violation(v)) => {
            tracing::error!(job_id = %id, violation = %v, "a job's events do not verify");
            StreamVerification::Failed {
                job_id: id,
                verified: false,
                reason: v.reason,
                position: v.position,
                event_id: v.event_id,
            }
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    Ok(Json(answer))
}

/// `GET /api/jobs/{id}/results/{path}`: the manifest, the `.dzi` and the tiles of a succeeded
/// job, as a redirect to a short-lived URL (presigned in S3, signed by the local store in
/// `mira dev`). Only the succeeded attempt's prefix is reachable, so objects of a failed attempt
/// are never served.
#[utoipa::path(get, operation_id = "job_result", path = "/api/jobs/{id}/results/{*path}",
    summary = "A result object of a succeeded job (manifest.json, slide.dzi, slide_files/…): a redirect to a short-lived URL",
    params(("id" = uuid::Uuid, Path), ("path" = String, Path)),
    responses((status = 307, description = "redirect to the object", headers(("Location" = String))),
              (status = 409, response = inline(Problem)), ReadsOne))]
pub async fn results(
    State(state): State<AppState>,
    who: Identity,
    Path((raw, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    who.require(READERS)?;
    let (_, _, prefix) = succeeded_results(&state, &who, &raw).await?;
    let key = format!("{prefix}{path}");
    if !crate::blob::valid_key(&key) {
        return Err(ApiError::bad_request("not a result path"));
    }
    let url = state.blobs.download_url(&key).await.map_err(ApiError::internal)?;
    Ok((StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, url)]).into_response())
}
