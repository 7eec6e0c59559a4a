//! The auditor's endpoints (role `auditor`): `GET /api/audit/events`, the tenant's events
//! straight from the log with their hashes, filtered by cursor, time range, aggregate (or
//! short id), slide, actor and event type; `GET /api/audit/event-types`, the types to filter
//! by; `GET /api/audit/export`, the tenant's verifiable export (ADR 0033).

use axum::extract::State;
use axum::response::IntoResponse;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{Identity, Role};
use super::extract::ApiQuery;
use super::problem::{ApiError, ApiResult, Problem, Reads};
use super::slides::page_limit;
use super::state::AppState;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// One event of the log, as stored: the payload and metadata as JSON, the hashes in hex.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEvent {
    pub global_position: i64,
    pub event_id: uuid::Uuid,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub recorded_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// The hash of the event before it in the log, hex.
    pub prev_hash: String,
    pub hash: String,
}

/// A page of the log; `next` is the `after` of the next page, null on the last.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEvent>,
    pub next: Option<i64>,
}
/// The event types a log holds, for the auditor's filter.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventTypes {
    pub event_types: Vec<&'static str>,
}

/// The auditor's operations.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(events))
        .routes(routes!(event_types))
        .routes(routes!(export))
}

#[utoipa::path(get, operation_id = "audit_event_types", path = "/api/audit/event-types",
    summary = "The event types of the log, for the audit filter (auditor)",
    responses((status = 200, body = EventTypes), Reads))]
pub async fn event_types(who: Identity) -> ApiResult<Json<EventTypes>> {
    who.require(&[Role::Auditor])?;
    let mut event_types: Vec<&'static str> = mira_events::SlideEvent::NAMES.to_vec();
    event_types.extend_from_slice(mira_events::JobEvent::NAMES);
    Ok(Json(EventTypes { event_types }))
}

/// The time range of an export.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// Only events recorded at or after.
    #[param(nullable = false)]
    pub from: Option<DateTime<Utc>>,
    /// Only events recorded at or before.
    #[param(nullable = false)]
    pub to: Option<DateTime<Utc>>,
}

#[utoipa::path(get, operation_id = "audit_export", path = "/api/audit/export",
    summary = "The tenant's events and every signed checkpoint as JSON Lines that tools/verify_export.py re-verifies (auditor)",
    description = "Format mira.audit.export.v1 (docs/audit/canonical-bytes.md): a header naming the tenant and the public audit key, \
        the tenant's events, then every checkpoint with all its leaves (position, event id and hash of every event it covers, \
        other tenants' included: ADR 0033).",
    params(ExportQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = String),
        (status = 503, response = inline(Problem)), Reads))]
pub async fn export(
    State(state): State<AppState>,
    who: Identity,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<axum::response::Response> {
    who.require(&[Role::Auditor])?;
    // A range that ends before it starts holds no event: the file is its header and the
    // checkpoints, as the events endpoint answers an empty page.
    let audit = state.audit.as_ref().map_err(|why| {
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("this gateway cannot export the log: {why}"),
        )
    })?;
    let key = audit.key;
    let scope = mira_eventlog::export::Scope {
        from: q.from,
        to: q.to,
        tenant: Some(who.tenant.clone()),
    };
    let (mut tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
    let pool = state.pool.clone();
    let tenant = who.tenant.clone();
    tokio::spawn(async move {
        match mira_eventlog::export::export_to(&pool, &key, &scope, &mut tx).await {
            Ok(s) => tracing::info!(tenant = %tenant, events = s.events, checkpoints = s.checkpoints, "audit export"),
            Err(e) => {
                // The status line is sent: a reader sees the body end early, with no final
                // newline or a torn line, and the verifier refuses it.
                tracing::error!(tenant = %tenant, error = %e, "audit export stopped");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream_of(rx));
    let name = format!("attachment; filename=\"mira-audit-{}.jsonl\"", who.tenant.as_str());
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (axum::http::header::CONTENT_DISPOSITION, name),
            (axum::http::header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        body,
    )
        .into_response())
}

/// The chunks of a channel as a stream.
fn tokio_stream_of(
    mut rx: tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
) -> impl futures_core::Stream<Item = std::io::Result<Vec<u8>>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[utoipa::path(get, operation_id = "audit_events", path = "/api/audit/events", summary = "The tenant's events from the log (auditor)",
    params(
        ("after" = Option<i64>, Query, nullable = false, minimum = 0, maximum = 9_223_372_036_854_775_807i64,
         description = "Only events after this global position (a page's next)."),
        ("from" = Option<DateTime<Utc>>, Query, nullable = false, description = "Recorded at or after."),
        ("to" = Option<DateTime<Utc>>, Query, nullable = false, description = "Recorded before."),
        ("aggregate_id" = Option<String>, Query, nullable = false, pattern = "^[^\\u0000]*$",
         description = "An aggregate's id, or its short id: the last 8 hex digits."),
        ("actor" = Option<String>, Query, nullable = false, pattern = "^[^\\u0000]*$",
         description = "The actor's id (a user's sub, a worker id), in any case."),
        ("event_type" = Option<String>, Query, nullable = false, pattern = "^[^\\u0000]*$",
         description = "An event type (GET /api/audit/event-types), in any case."),
        ("slide" = Option<String>, Query, nullable = false, pattern = "^[^\\u0000]*$",
         description = "A slide's id or short id (its last 8 hex digits): the events of the slide and of every job submitted on it."),
        ("limit" = Option<i64>, Query, nullable = false, minimum = 1, maximum = 500),
    ),
    responses((status = 200, body = AuditPage), Reads))]
pub async fn events(
    State(state): State<AppState>,
    who: Identity,
    ApiQuery(filter): ApiQuery<mira_eventlog::EventFilter>,
) -> ApiResult<Json<AuditPage>> {
    who.require(&[Role::Auditor])?;
    if filter.after.is_some_and(|a| a < 0) {
        return Err(ApiError::bad_request("after: a position is 0 or more"));
    }
    let limit = page_limit(filter.limit)?;
    let events = mira_eventlog::EventLog::new(state.pool.clone())
        .tenant_events(&who.tenant, &filter, limit)
        .await?;
    let mut items = Vec::with_capacity(events.len());
    for e in &events {
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).map_err(ApiError::internal);
        items.push(AuditEvent {
            global_position: e.global_position,
            event_id: e.event_id,
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence,
            event_type: e.event_type.clone(),
            event_version: e.event_version.clone(),
            recorded_at: e.recorded_at,
            payload: parse(&e.payload)?,
            metadata: parse(&e.metadata)?,
            prev_hash: hex::encode(e.prev_hash),
            hash: hex::encode(e.hash),
        });
    }
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|i| i.global_position))
        .flatten();
    Ok(Json(AuditPage { items, next }))
}
