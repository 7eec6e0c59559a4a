//! `mira projections rebuild`: rebuilds the read models from the log while the live ones keep
//! serving, then swaps them in one transaction.
//!
//! 1. Drop what an interrupted rebuild left (`rm_rebuild`), so a rerun starts clean.
//! 2. Replay the log into `rm_rebuild` in batches, reporting events/s and an ETA.
//! 3. Catch up with the live log until a round brings little.
//! 4. With `--verify`, compare: hold the projector lock just long enough to bring the rebuilt
//!    model to the watermark and take one repeatable-read snapshot of both models, then compare
//!    in that snapshot while live delivery goes on; differences keep the live model.
//! 5. Swap: take the projector lock exclusively (in-flight projector transactions finish, new
//!    ones wait), apply the last events below the watermark, and rename `rm` away and
//!    `rm_rebuild` to `rm`. Readers see the old model until the commit and the new one after;
//!    never an empty or half-built one.
//!
//! Events the live projector applies later and the rebuild already has are skipped by the
//! projector's per-row sequence guard.

use std::time::Instant;

use mira_bus::consumer::ApplyError;
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
    /// The first differences found, one line each (at most [`MAX_DIFFERENCE_LINES`]).
    pub differences: Vec<String>,
    /// All differences found.
    pub difference_count: u64,
    pub swapped: bool,
}

async fn apply_batch(
    conn: &mut PgConnection,
    p: &Projector,
    events: &[mira_eventlog::StoredEvent],
) -> Result<(), ApplyError> {
    p.apply_batch(conn, events).await
}

/// Each read-model table, its key as text that sorts (bytewise) the way the key does, and the
/// key's order.
const TABLES: &[(&str, &str, &str)] = &[
    ("jobs", "job_id::text", "job_id"),
    ("slides", "slide_id::text", "slide_id"),
    (
        "job_timeline",
        "job_id::text || '#' || lpad(sequence::text, 20, '0')",
        "job_id, sequence",
    ),
    ("usage", "tenant_id", "tenant_id COLLATE \"C\""),
];

/// Rows fetched from each side at a time: the comparison holds two chunks, whatever the size
/// of the models.
const CHUNK: i64 = 1_000;

/// At most this many differences are kept as lines; all are counted.
pub const MAX_DIFFERENCE_LINES: usize = 100;

/// Differences between two read-model schemas: up to [`MAX_DIFFERENCE_LINES`] lines, and the
/// count of all. Both schemas are read in key order, a chunk at a time, with cursors in the
/// caller's transaction.
pub async fn compare(conn: &mut PgConnection, live: &str, rebuilt: &str) -> Result<(Vec<String>, u64), sqlx::Error> {
    let mut lines = Vec::new();
    let mut count = 0u64;
    let mut note = |line: String| {
        count += 1;
        if lines.len() < MAX_DIFFERENCE_LINES {
            lines.push(line);
        }
    };
    for (t, key, order) in TABLES {
        for (cursor, schema) in [("mira_cmp_live", live), ("mira_cmp_rebuilt", rebuilt)] {
            sqlx::query(&format!(
                "DECLARE {cursor} NO SCROLL CURSOR FOR SELECT {key} AS k, to_jsonb(r) AS v FROM {schema}.{t} r ORDER BY {order}"
            ))
            .execute(&mut *conn)
            .await?;
        }
        let fetch = |cursor: &'static str| format!("FETCH {CHUNK} FROM {cursor}");
        let mut a: std::collections::VecDeque<(String, serde_json::Value)> = Default::default();
        let mut b: std::collections::VecDeque<(String, serde_json::Value)> = Default::default();
        let (mut a_done, mut b_done) = (false, false);
        loop {
            if a.is_empty() && !a_done {
                a.extend(
                    sqlx::query_as::<_, (String, serde_json::Value)>(&fetch("mira_cmp_live"))
                        .fetch_all(&mut *conn)
                        .await?,
                );
                a_done = a.is_empty();
            }
            if b.is_empty() && !b_done {
                b.extend(
                    sqlx::query_as::<_, (String, serde_json::Value)>(&fetch("mira_cmp_rebuilt"))
                        .fetch_all(&mut *conn)
                        .await?,
                );
                b_done = b.is_empty();
            }
            match (a.front(), b.front()) {
                (None, None) => break,
                (Some((ka, _)), Some((kb, _))) if ka == kb => {
                    let ((k, va), (_, vb)) = (a.pop_front().expect("front"), b.pop_front().expect("front"));
                    if va != vb {
                        note(format!("{t} {k}: live {va} != rebuilt {vb}"));
                    }
                }
                (Some((ka, _)), Some((kb, _))) if ka.as_bytes() < kb.as_bytes() => {
                    let (k, _) = a.pop_front().expect("front");
                    note(format!("{t} {k}: only in the live model"));
                }
                (Some(_), None) => {
                    let (k, _) = a.pop_front().expect("front");
                    note(format!("{t} {k}: only in the live model"));
                }
                (_, Some(_)) => {
                    let (k, _) = b.pop_front().expect("front");
                    note(format!("{t} {k}: only in the rebuilt model"));
                }
            }
        }
        for cursor in ["mira_cmp_live", "mira_cmp_rebuilt"] {
            sqlx::query(&format!("CLOSE {cursor}")).execute(&mut *conn).await?;
        }
    }
    Ok((lines, count))
}

/// Rebuilds the read models. With `verify`, compares before swapping and does not swap when
/// they differ. `progress` is called after each batch.
pub async fn rebuild(
    pool: &PgPool,
    verify: bool,
    progress: impl FnMut(&Progress),
) -> Result<RebuildReport, ApplyError> {
    rebuild_with(pool, verify, progress, async {}).await
}

/// [`rebuild`], awaiting `while_comparing` once the comparison's snapshot is taken and before
/// it is read: a test holds the comparison open with it to show that live delivery goes on.
pub async fn rebuild_with(
    pool: &PgPool,
    verify: bool,
    mut progress: impl FnMut(&Progress),
    while_comparing: impl std::future::Future<Output = ()>,
) -> Result<RebuildReport, ApplyError> {
    let started = Instant::now();
    // Schema work runs as the owner, through functions that do one fixed thing each (the
    // processes' role owns nothing; migration 0007).
    sqlx::query("SELECT mira_rebuild_prepare()").execute(pool).await?;
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
    // The comparison, with --verify: both models read at one point of the log, without holding
    // anything the relay or the live projector waits on while it reads.
    let (differences, difference_count) = if verify {
        let (mut snapshot, at) = comparison_snapshot(pool, &projector, cursor).await?;
        done += at.1;
        cursor = at.0;
        while_comparing.await;
        let found = compare(&mut snapshot, LIVE, BUILD).await?;
        snapshot.rollback().await?;
        found
    } else {
        (Vec::new(), 0)
    };
    if difference_count > 0 {
        sqlx::query("SELECT mira_rebuild_drop($1)")
            .bind(BUILD)
            .execute(pool)
            .await?;
        let seconds = started.elapsed().as_secs_f64();
        return Ok(RebuildReport {
            events: done,
            seconds,
            events_per_second: done as f64 / seconds.max(1e-9),
            differences,
            difference_count,
            swapped: false,
        });
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
    // The projector's role may run the swap.
    sqlx::query("SET LOCAL ROLE mira_projector").execute(&mut *tx).await?;
    let retired: String = sqlx::query_scalar("SELECT mira_rebuild_swap()")
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    sqlx::query("SELECT mira_rebuild_drop($1)")
        .bind(&retired)
        .execute(pool)
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(RebuildReport {
        events: done,
        seconds,
        events_per_second: done as f64 / seconds.max(1e-9),
        differences,
        difference_count,
        swapped: true,
    })
}

/// A read-only, repeatable-read transaction in which the live model and the rebuilt one stand
/// at the same point of the log, and (cursor, events applied) after bringing the rebuilt one
/// there. The swap lock is held only for that catch-up and for taking the snapshot: on a
/// connection of its own, at session level, so that the catch-up can commit under it; while it
/// is held no projector transaction is open, so the live model is still. The connection is
/// closed, not pooled, when it goes, so an error cannot leave the lock behind. The comparison
/// then reads at leisure while the projector and the relay go on.
async fn comparison_snapshot(
    pool: &PgPool,
    projector: &Projector,
    mut cursor: Cursor,
) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, (Cursor, u64)), ApplyError> {
    let mut hold = pool.acquire().await?;
    hold.close_on_drop();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SWAP_LOCK)
        .execute(&mut *hold)
        .await?;
    let mut applied = 0u64;
    let mut tx = sqlx::Connection::begin(&mut *hold).await?;
    loop {
        let batch = mira_eventlog::store::read_after_in(&mut tx, cursor, BATCH).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        apply_batch(&mut tx, projector, &batch).await?;
        applied += batch.len() as u64;
    }
    tx.commit().await?;
    let mut snapshot = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *snapshot)
        .await?;
    // The projector's role reads both models whole (no tenant policy).
    sqlx::query("SET LOCAL ROLE mira_projector")
        .execute(&mut *snapshot)
        .await?;
    // The snapshot is taken by the transaction's first query, while the lock is held.
    sqlx::query("SELECT 1").execute(&mut *snapshot).await?;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SWAP_LOCK)
        .execute(&mut *hold)
        .await?;
    drop(hold);
    Ok((snapshot, (cursor, applied)))
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
