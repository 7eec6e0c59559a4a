//! `GET /api/audit/events` (role `auditor`): the tenant's events straight from the log, with
//! their hashes, filtered by cursor, time range, aggregate and actor.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;

use super::auth::{Identity, Role};
use super::extract::ApiQuery;
use super::problem::{ApiError, ApiResult};
use super::slides::page_limit;
use super::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only events after this global position (the `next` of the previous page).
    pub after: Option<i64>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub aggregate_id: Option<String>,
    /// The actor's id (a user's `sub`, a worker id).
    pub actor: Option<String>,
    pub limit: Option<i64>,
}

pub async fn events(
    State(state): State<AppState>,
    who: Identity,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require(&[Role::Auditor])?;
    let limit = page_limit(q.limit)?;
    let rows = sqlx::query(&format!(
        "SELECT {} FROM events WHERE tenant_id = $1 AND global_position > $2 \
         AND ($3::timestamptz IS NULL OR recorded_at >= $3) AND ($4::timestamptz IS NULL OR recorded_at <= $4) \
         AND ($5::text IS NULL OR aggregate_id = $5) \
         AND ($6::text IS NULL OR (metadata::jsonb -> 'actor' ->> 'id') = $6) \
         ORDER BY global_position LIMIT $7",
        mira_eventlog::store::COLUMNS
    ))
    .bind(who.tenant.as_str())
    .bind(q.after.unwrap_or(0))
    .bind(q.from)
    .bind(q.to)
    .bind(&q.aggregate_id)
    .bind(&q.actor)
    .bind(limit)
    .fetch_all(&state.pool)
    .await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let e = mira_eventlog::store::from_row(row)?;
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
