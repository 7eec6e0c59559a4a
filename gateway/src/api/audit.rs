//! `GET /api/audit/events` (role `auditor`): the tenant's events straight from the log, with
//! their hashes, filtered by cursor, time range, aggregate and actor.

use axum::extract::State;
use axum::Json;
use serde_json::json;

use super::auth::{Identity, Role};
use super::extract::ApiQuery;
use super::problem::{ApiError, ApiResult};
use super::slides::page_limit;
use super::state::AppState;

pub async fn events(
    State(state): State<AppState>,
    who: Identity,
    ApiQuery(filter): ApiQuery<mira_eventlog::EventFilter>,
) -> ApiResult<Json<serde_json::Value>> {
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
        items.push(json!({
            "global_position": e.global_position,
            "event_id": e.event_id,
            "aggregate_type": e.aggregate_type,
            "aggregate_id": e.aggregate_id,
            "sequence": e.sequence,
            "event_type": e.event_type,
            "event_version": e.event_version,
            "recorded_at": e.recorded_at,
            "payload": parse(&e.payload)?,
            "metadata": parse(&e.metadata)?,
            "prev_hash": hex::encode(e.prev_hash),
            "hash": hex::encode(e.hash),
        }));
    }
    let next = (items.len() as i64 == limit)
        .then(|| items.last().and_then(|i| i["global_position"].as_i64()))
        .flatten();
    Ok(Json(json!({"items": items, "next": next})))
}
