//! Operations endpoints: liveness, readiness (database, blob store, bus) and metrics.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::problem::ApiError;
use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// 200 when the database, the blob store and (when this process has one) the bus answer;
/// otherwise 503 naming what failed.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ok = true;
    let db = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool).await;
    ok &= db.is_ok();
    checks.insert(
        "database".into(),
        json!(db.map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string())),
    );
    let blobs = state.blobs.ready().await;
    ok &= blobs.is_ok();
    checks.insert(
        "blob_store".into(),
        json!(blobs.map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string())),
    );
    if let Some(bus) = &state.bus {
        let r = bus.queue(mira_bus::Group::Projections).dead_letter_count().await;
        ok &= r.is_ok();
        checks.insert(
            "bus".into(),
            json!(r.map(|_| "ok".to_owned()).unwrap_or_else(|e| e.to_string())),
        );
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ok, "checks": checks}))).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let gauges = super::metrics::database_gauges(&state.pool)
        .await
        .map_err(|e| ApiError::unavailable(format!("cannot read the database: {e}")))?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(&gauges),
    )
        .into_response())
}
