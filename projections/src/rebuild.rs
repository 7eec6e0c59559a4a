//! `mira projections rebuild`: rebuilds the read models from the log while the live ones keep
//! serving, then swaps them in one transaction.
//!
//! 1. Drop what an interrupted rebuild left (`rm_rebuild`), so a rerun starts clean.
//! 2. Replay the log into `rm_rebuild` in batches, reporting events/s and an ETA.
//! 3. Catch up with the live log until a round brings little.
//! 4. Swap: take the projector lock exclusively (in-flight projector transactions finish, new
//!    ones wait), apply the last events below the watermark, optionally compare with the live
//!    schema, and rename `rm` away and `rm_rebuild` to `rm`. Readers see the old model until
//!    the commit and the new one after; never an empty or half-built one.
//!
//! Events the live projector applies later and the rebuild already has are skipped by the
//! projector's per-row sequence guard.

use std::time::Instant;

use mira_bus::consumer::HandlerError;
use mira_eventlog::{Cursor, EventLog};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::projector::{Projector, SWAP_LOCK};

pub const LIVE: &str = "rm";
pub const BUILD: &str = "rm_rebuild";
const BATCH: i64 = 5_000;

/// Progress of a rebuild, for the progress line.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub events: u64,
    pub total_estimate: u64,
    pub events_per_second: f64,
    pub eta_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub differences: Vec<String>,
    pub swapped: bool,
}

async fn apply_batch(
    conn: &mut PgConnection,
    p: &Projector,
    events: &[mira_eventlog::StoredEvent],
) -> Result<(), HandlerError> {
    p.apply_batch(conn, events).await
}

/// The rows of `schema` as JSON, in key order, per table.
async fn snapshot(conn: &mut PgConnection, schema: &str) -> Result<Vec<(String, Vec<serde_json::Value>)>, sqlx::Error> {
    let mut out = Vec::new();
    for (t, key) in [
        ("jobs", "job_id"),
        ("slides", "slide_id"),
        ("job_timeline", "job_id, sequence"),
        ("usage", "tenant_id"),
    ] {
        let rows: Vec<serde_json::Value> =
            sqlx::query_scalar(&format!("SELECT to_jsonb(r) FROM {schema}.{t} r ORDER BY {key}"))
                .fetch_all(&mut *conn)
                .await?;
        out.push((t.to_owned(), rows));
    }
    Ok(out)
}

fn row_key(t: &str, v: &serde_json::Value) -> String {
    match t {
        "jobs" => v["job_id"].to_string(),
        "slides" => v["slide_id"].to_string(),
        "job_timeline" => format!("{}#{}", v["job_id"], v["sequence"]),
        _ => v["tenant_id"].to_string(),
    }
}

/// Differences between two read-model schemas, one line each.
pub async fn compare(conn: &mut PgConnection, live: &str, rebuilt: &str) -> Result<Vec<String>, sqlx::Error> {
    let (a, b) = (snapshot(conn, live).await?, snapshot(conn, rebuilt).await?);
    let mut diffs = Vec::new();
    for ((t, la), (_, lb)) in a.iter().zip(&b) {
        let ma: std::collections::BTreeMap<String, &serde_json::Value> =
            la.iter().map(|v| (row_key(t, v), v)).collect();
        let mb: std::collections::BTreeMap<String, &serde_json::Value> =
            lb.iter().map(|v| (row_key(t, v), v)).collect();
        for (k, va) in &ma {
            match mb.get(k) {
                None => diffs.push(format!("{t} {k}: only in the live model")),
                Some(vb) if vb != va => diffs.push(format!("{t} {k}: live {va} != rebuilt {vb}")),
                _ => {}
            }
        }
        for k in mb.keys().filter(|k| !ma.contains_key(*k)) {
            diffs.push(format!("{t} {k}: only in the rebuilt model"));
        }
    }
    Ok(diffs)
}

/// Rebuilds the read models. With `verify`, compares before swapping and does not swap when
/// they differ. `progress` is called after each batch.
pub async fn rebuild(
    pool: &PgPool,
    verify: bool,
    mut progress: impl FnMut(&Progress),
) -> Result<RebuildReport, HandlerError> {
    let started = Instant::now();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {BUILD} CASCADE"))
        .execute(pool)
        .await?;
    sqlx::query("SELECT mira_create_read_models($1)")
        .bind(BUILD)
        .execute(pool)
        .await?;
    let log = EventLog::new(pool.clone());
    let projector = Projector::into_schema(BUILD);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let mut cursor = Cursor::START;
    let mut done = 0u64;
    loop {
        let batch = log.read_after(cursor, BATCH).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        let mut tx = pool.begin().await?;
        apply_batch(&mut tx, &projector, &batch).await?;
        tx.commit().await?;
        done += batch.len() as u64;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let total = (total as u64).max(done);
        progress(&Progress {
            events: done,
            total_estimate: total,
            events_per_second: rate,
            eta_seconds: (total - done) as f64 / rate,
        });
        if (batch.len() as i64) < BATCH / 10 {
            break; // caught up closely enough; the swap takes the rest
        }
    }
    // The swap.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SWAP_LOCK)
        .execute(&mut *tx)
        .await?;
    loop {
        let batch = mira_eventlog::store::read_after_in(&mut tx, cursor, BATCH).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        apply_batch(&mut tx, &projector, &batch).await?;
        done += batch.len() as u64;
    }
    // Applying switched to the projector's role; schema changes need the owner's.
    sqlx::query("RESET ROLE").execute(&mut *tx).await?;
    let differences = if verify {
        compare(&mut tx, LIVE, BUILD).await?
    } else {
        Vec::new()
    };
    let swapped = differences.is_empty();
    if swapped {
        let retired = format!("rm_retired_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("ALTER SCHEMA {LIVE} RENAME TO {retired}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("ALTER SCHEMA {BUILD} RENAME TO {LIVE}"))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        sqlx::query(&format!("DROP SCHEMA {retired} CASCADE"))
            .execute(pool)
            .await?;
    } else {
        tx.rollback().await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {BUILD} CASCADE"))
            .execute(pool)
            .await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(RebuildReport {
        events: done,
        seconds,
        events_per_second: done as f64 / seconds.max(1e-9),
        differences,
        swapped,
    })
}

/// One projection's standing, for `mira projections status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub name: String,
    pub position: i64,
    pub lag_events: i64,
    pub lag_seconds: f64,
}

/// The projections Mira keeps, for `mira projections list`.
pub const PROJECTIONS: &[(&str, &str)] = &[(
    crate::projector::NAME,
    "jobs, slides, the per-job timeline and per-tenant usage (schema rm)",
)];

/// Position and lag of each projection: events in the log after its position, and the age of
/// the oldest of them.
pub async fn status(pool: &PgPool) -> Result<Vec<Status>, sqlx::Error> {
    let mut out = Vec::new();
    for (name, _) in PROJECTIONS {
        let position: i64 = sqlx::query_scalar(
            "SELECT coalesce((SELECT last_position FROM projection_positions WHERE projection = $1), 0)",
        )
        .bind(name)
        .fetch_one(pool)
        .await?;
        let (lag_events, lag_seconds): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(recorded_at))::float8 FROM events WHERE global_position > $1",
        )
        .bind(position)
        .fetch_one(pool)
        .await?;
        out.push(Status {
            name: name.to_string(),
            position,
            lag_events,
            lag_seconds: lag_seconds.unwrap_or(0.0).max(0.0),
        });
    }
    Ok(out)
}
