//! `GET /api/audit/events` (role `auditor`): the tenant's events straight from the log, with
//! their hashes, filtered by cursor, time range, aggregate and actor.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{Identity, Role};
use super::extract::ApiQuery;
use super::problem::{ApiError, ApiResult, Reads};
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
/// The auditor's operations.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::default().routes(routes!(events))
}

#[utoipa::path(get, operation_id = "audit_events", path = "/api/audit/events", summary = "The tenant's events from the log (auditor)",
    params(
        ("after" = Option<i64>, Query, nullable = false, minimum = 0, maximum = 9_223_372_036_854_775_807i64,
         description = "Only events after this global position (a page's next)."),
        ("from" = Option<DateTime<Utc>>, Query, nullable = false, description = "Recorded at or after."),
        ("to" = Option<DateTime<Utc>>, Query, nullable = false, description = "Recorded before."),
        ("aggregate_id" = Option<String>, Query, nullable = false, pattern = "^[^\\u0000]*$"),
        ("actor" = Option<String>, Query, nullable = false, pattern = "^[^\\u0000]*$",
         description = "The actor's id (a user's sub, a worker id)."),
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
