//! The event log: append with a per-aggregate hash chain, read a stream, follow by cursor.

use chrono::{DateTime, Utc};
use mira_events::canonical::{CanonicalEvent, Hash32, ZERO_HASH};
use mira_events::TenantId;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::db;

/// A follower's position: the log is totally ordered by `(tx_id, global_position)`.
/// `Cursor::START` is before every event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    pub tx_id: i64,
    pub position: i64,
}

impl Cursor {
    pub const START: Cursor = Cursor { tx_id: 0, position: 0 };
}

/// An event to append; the log adds the id, time, position and hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: u64,
    pub event_type: String,
    pub event_version: String,
    /// Exact bytes to store (JSON text).
    pub payload: String,
    /// Exact bytes to store (JSON text).
    pub metadata: String,
}

/// An event as stored, with its full envelope (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub global_position: i64,
    pub tx_id: i64,
    pub event_id: Uuid,
    pub tenant_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub recorded_at: DateTime<Utc>,
    pub payload: String,
    pub metadata: String,
    pub prev_hash: Hash32,
    pub hash: Hash32,
}

impl StoredEvent {
    /// The W3C `traceparent` its metadata carries: the trace of the command that recorded it,
    /// which whoever acts on the event continues (`mira_telemetry::follow`).
    pub fn traceparent(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct Trace {
            traceparent: Option<String>,
        }
        serde_json::from_str::<Trace>(&self.metadata).ok()?.traceparent
    }

    pub fn cursor(&self) -> Cursor {
        Cursor {
            tx_id: self.tx_id,
            position: self.global_position,
        }
    }

    pub fn canonical(&self) -> CanonicalEvent<'_> {
        CanonicalEvent {
            event_id: self.event_id,
            tenant_id: &self.tenant_id,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence: self.sequence as u64,
            event_type: &self.event_type,
            event_version: &self.event_version,
            recorded_at_micros: self.recorded_at.timestamp_micros(),
            payload: self.payload.as_bytes(),
            metadata: self.metadata.as_bytes(),
        }
    }

    /// The hash this event's stored fields and `prev_hash` give.
    pub fn recompute_hash(&self) -> Hash32 {
        self.canonical().hash(&self.prev_hash)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("conflict: {aggregate_type} {aggregate_id} already has an event {sequence}, or its stream moved")]
    Conflict {
        aggregate_type: String,
        aggregate_id: String,
        sequence: u64,
    },
    #[error("{aggregate_type} {aggregate_id} belongs to another tenant")]
    TenantMismatch {
        aggregate_type: String,
        aggregate_id: String,
    },
    #[error("an append must be its transaction's first write (DESIGN §4.1): {0}")]
    NotFirstWrite(sqlx::Error),
    #[error("database error while appending: {0}")]
    Db(sqlx::Error),
}

impl From<sqlx::Error> for AppendError {
    fn from(e: sqlx::Error) -> Self {
        if db::sqlstate(&e).as_deref() == Some(db::NOT_IN_PREREQUISITE_STATE) {
            Self::NotFirstWrite(e)
        } else {
            Self::Db(e)
        }
    }
}

/// The appending transaction's timestamp, which the log requires as every event's
/// `recorded_at` (migration 0013): read in the transaction before hashing. Writes nothing, so
/// the transaction's first write can still be its append.
pub async fn transaction_time(conn: &mut PgConnection) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT transaction_timestamp()")
        .fetch_one(conn)
        .await
}

pub const COLUMNS: &str = "global_position, tx_id::text::bigint AS tx_id, event_id, \
    tenant_id, aggregate_type, aggregate_id, sequence, event_type, event_version, recorded_at, \
    payload, metadata, prev_hash, hash";

fn hash32(v: Vec<u8>) -> Result<Hash32, sqlx::Error> {
    v.try_into()
        .map_err(|_| sqlx::Error::Decode("a stored hash is not 32 bytes".into()))
}

pub fn from_row(row: &PgRow) -> Result<StoredEvent, sqlx::Error> {
    Ok(StoredEvent {
        global_position: row.try_get("global_position")?,
        tx_id: row.try_get("tx_id")?,
        event_id: row.try_get("event_id")?,
        tenant_id: row.try_get("tenant_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        event_version: row.try_get("event_version")?,
        recorded_at: row.try_get("recorded_at")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        prev_hash: hash32(row.try_get("prev_hash")?)?,
        hash: hash32(row.try_get("hash")?)?,
    })
}

/// Stored events from fetched rows.
fn rows(rows: Vec<PgRow>) -> Result<Vec<StoredEvent>, sqlx::Error> {
    rows.iter().map(from_row).collect()
}

/// Now, at the log's precision (microseconds).
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// An id as a filter takes it: a short id (8 hex digits) in lower case, anything else as given.
fn short_id_or_whole(id: &Option<String>) -> Option<String> {
    id.as_deref().map(str::trim).map(|i| {
        if i.len() == 8 && i.bytes().all(|b| b.is_ascii_hexdigit()) {
            i.to_ascii_lowercase()
        } else {
            i.to_owned()
        }
    })
}

/// SQL: `column` is the id `param`, or ends with it when it is a short id (8 characters).
fn short_or_full(column: &str, param: &str) -> String {
    format!("({column} = {param} OR (length({param}) = 8 AND right({column}, 8) = {param}))")
}

/// Which of a tenant's events an auditor asks for (the query of `GET /api/audit/events`);
/// every filter is optional.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Only events after this global position.
    pub after: Option<i64>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// An aggregate's id, or its short id: the last 8 hex digits (a UUIDv7's first digits are
    /// its time, so ids made within a minute share them; the last ones are random).
    pub aggregate_id: Option<String>,
    /// The actor's id (a user's `sub`, a worker id), in any case.
    pub actor: Option<String>,
    /// An event type (`JobSubmitted`), in any case.
    pub event_type: Option<String>,
    /// A slide's id or short id: the events of that slide and of every job submitted on it.
    pub slide: Option<String>,
    /// Events per page; the caller checks it (`tenant_events` takes the limit it settled on).
    pub limit: Option<i64>,
}

/// Handle on the log. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventLog {
    pool: PgPool,
}

impl EventLog {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Appends `events` (consecutive events of aggregates, in sequence order) in one
    /// transaction.
    pub async fn append(&self, tenant: &TenantId, events: &[NewEvent]) -> Result<Vec<StoredEvent>, AppendError> {
        let mut tx = self.pool.begin().await?;
        let stored = Self::append_in_tx(&mut tx, tenant, events).await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Appends inside the caller's transaction, so that an effect can commit with its events.
    /// Two writers racing for one sequence number: the second gets `Conflict` when it inserts
    /// (the unique stream key), and its transaction writes nothing.
    ///
    /// The log registers the transaction as an appender at its first insert (DESIGN §4.1,
    /// ADR 0010), so the append must be the transaction's first write: a transaction that
    /// already holds an id and has appended nothing gets [`AppendError::NotFirstWrite`] and
    /// nothing is appended. Every event's `recorded_at` is the transaction's timestamp.
    pub async fn append_in_tx(
        conn: &mut PgConnection,
        tenant: &TenantId,
        events: &[NewEvent],
    ) -> Result<Vec<StoredEvent>, AppendError> {
        let r = Self::append_unrecorded(conn, tenant, events).await;
        if let Err(AppendError::Conflict { aggregate_type, .. }) = &r {
            metrics::counter!("mira_append_conflicts_total", "aggregate" => aggregate_type.clone()).increment(1);
        }
        r
    }

    async fn append_unrecorded(
        conn: &mut PgConnection,
        tenant: &TenantId,
        events: &[NewEvent],
    ) -> Result<Vec<StoredEvent>, AppendError> {
        let recorded_at = transaction_time(&mut *conn).await?;
        let mut stored: Vec<StoredEvent> = Vec::with_capacity(events.len());
        for e in events {
            let conflict = || AppendError::Conflict {
                aggregate_type: e.aggregate_type.clone(),
                aggregate_id: e.aggregate_id.clone(),
                sequence: e.sequence,
            };
            let prev_in_batch = stored.last().filter(|p| {
                p.aggregate_type == e.aggregate_type
                    && p.aggregate_id == e.aggregate_id
                    && p.sequence as u64 + 1 == e.sequence
            });
            let prev_hash = if e.sequence == 1 {
                ZERO_HASH
            } else if let Some(p) = prev_in_batch {
                p.hash
            } else {
                let row = sqlx::query(
                    "SELECT tenant_id, hash FROM events \
                     WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
                )
                .bind(&e.aggregate_type)
                .bind(&e.aggregate_id)
                .bind(e.sequence as i64 - 1)
                .fetch_optional(&mut *conn)
                .await?
                .ok_or_else(conflict)?;
                let owner: String = row.try_get("tenant_id")?;
                if owner != tenant.as_str() {
                    return Err(AppendError::TenantMismatch {
                        aggregate_type: e.aggregate_type.clone(),
                        aggregate_id: e.aggregate_id.clone(),
                    });
                }
                hash32(row.try_get("hash")?)?
            };
            let mut ev = StoredEvent {
                global_position: 0,
                tx_id: 0,
                event_id: Uuid::now_v7(),
                tenant_id: tenant.as_str().to_owned(),
                aggregate_type: e.aggregate_type.clone(),
                aggregate_id: e.aggregate_id.clone(),
                sequence: e.sequence as i64,
                event_type: e.event_type.clone(),
                event_version: e.event_version.clone(),
                recorded_at,
                payload: e.payload.clone(),
                metadata: e.metadata.clone(),
                prev_hash,
                hash: ZERO_HASH,
            };
            ev.hash = ev.recompute_hash();
            let row = sqlx::query(
                "INSERT INTO events (event_id, tenant_id, aggregate_type, aggregate_id, sequence, \
                 event_type, event_version, recorded_at, payload, metadata, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
                 RETURNING global_position, tx_id::text::bigint AS tx_id",
            )
            .bind(ev.event_id)
            .bind(&ev.tenant_id)
            .bind(&ev.aggregate_type)
            .bind(&ev.aggregate_id)
            .bind(ev.sequence)
            .bind(&ev.event_type)
            .bind(&ev.event_version)
            .bind(ev.recorded_at)
            .bind(&ev.payload)
            .bind(&ev.metadata)
            .bind(&ev.prev_hash[..])
            .bind(&ev.hash[..])
            .fetch_one(&mut *conn)
            .await
            .map_err(|err| {
                if db::sqlstate(&err).as_deref() == Some(db::UNIQUE_VIOLATION)
                    && db::constraint(&err).as_deref() == Some("events_stream_sequence_key")
                {
                    conflict()
                } else {
                    AppendError::from(err)
                }
            })?;
            ev.global_position = row.try_get("global_position")?;
            ev.tx_id = row.try_get("tx_id")?;
            stored.push(ev);
        }
        Ok(stored)
    }

    /// One aggregate's events after `after_sequence`, in order. With a tenant, another
    /// tenant's stream reads as empty.
    pub async fn read_stream(
        &self,
        tenant: Option<&TenantId>,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 \
             AND sequence > $3 AND ($4::text IS NULL OR tenant_id = $4) ORDER BY sequence"
        );
        sqlx::query(&sql)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(after_sequence)
            .bind(tenant.map(TenantId::as_str))
            .fetch_all(&self.pool)
            .await
            .and_then(rows)
    }

    /// One tenant's events after global position `f.after`, in log order, filtered by time,
    /// aggregate and actor: what an auditor reads (`GET /api/audit/events`).
    pub async fn tenant_events(
        &self,
        tenant: &TenantId,
        f: &EventFilter,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE tenant_id = $1 AND global_position > $2 \
             AND ($3::timestamptz IS NULL OR recorded_at >= $3) AND ($4::timestamptz IS NULL OR recorded_at <= $4) \
             AND ($5::text IS NULL OR {id_is}) \
             AND ($6::text IS NULL OR lower(metadata::jsonb -> 'actor' ->> 'id') = lower($6)) \
             AND ($8::text IS NULL OR lower(event_type) = lower($8)) \
             AND ($9::text IS NULL OR (aggregate_type = 'Slide' AND {slide_is}) OR aggregate_id IN ( \
                 SELECT j.aggregate_id FROM events j WHERE j.tenant_id = $1 AND j.aggregate_type = 'Job' \
                 AND j.sequence = 1 AND {job_slide_is})) \
             ORDER BY global_position LIMIT $7",
            id_is = short_or_full("aggregate_id", "$5"),
            slide_is = short_or_full("aggregate_id", "$9"),
            job_slide_is = short_or_full("(j.payload::jsonb ->> 'slide_id')", "$9"),
        ))
        .bind(tenant.as_str())
        .bind(f.after.unwrap_or(0))
        .bind(f.from)
        .bind(f.to)
        .bind(short_id_or_whole(&f.aggregate_id))
        .bind(&f.actor)
        .bind(limit)
        .bind(&f.event_type)
        .bind(short_id_or_whole(&f.slide))
        .fetch_all(&self.pool)
        .await
        .and_then(rows)
    }

    /// Every event of `aggregate_types` (or of the one aggregate `aggregate_id`) recorded at or
    /// before `as_of`, stream by stream in sequence order: what `mira audit replay` folds.
    pub async fn streams_as_of(
        &self,
        aggregate_types: &[&str],
        aggregate_id: Option<&str>,
        as_of: DateTime<Utc>,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM events WHERE recorded_at <= $1 AND ($2::text IS NULL OR aggregate_id = $2) \
             AND aggregate_type = ANY($3) ORDER BY aggregate_type, aggregate_id, sequence"
        ))
        .bind(as_of)
        .bind(aggregate_id)
        .bind(aggregate_types)
        .fetch_all(&self.pool)
        .await
        .and_then(rows)
    }

    /// The settled watermark: every transaction id below it has finished, so no event can
    /// still appear behind it.
    pub async fn watermark(&self) -> Result<i64, sqlx::Error> {
        watermark(&self.pool).await
    }

    /// Up to `limit` events after `cursor` in follow order, all below the settled watermark.
    /// Called repeatedly with the last event's cursor, it yields every committed event exactly
    /// once, however late each one commits.
    pub async fn read_after(&self, cursor: Cursor, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let wm = watermark(&self.pool).await?;
        read_below(&self.pool, cursor, wm, limit).await
    }
}

/// The event with this id, as the log holds it.
pub async fn read_event(conn: &mut PgConnection, event_id: Uuid) -> Result<Option<StoredEvent>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM events WHERE event_id = $1"))
        .bind(event_id)
        .fetch_optional(conn)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The followers' bound (DESIGN §4.1, ADR 0010): every event with a `tx_id` below it has
/// committed, and none can still appear below it. Only registered appenders hold it back;
/// any other transaction, however long, does not. Read the events in a later statement: the
/// bound may pass an appender that committed after this statement's snapshot was taken.
pub async fn watermark<'e, E: sqlx::PgExecutor<'e>>(e: E) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT mira_follow_bound()::text::bigint")
        .fetch_one(e)
        .await
}

/// How far the follow watermark trails the log (DESIGN §4.1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct WatermarkLag {
    /// Committed events at or above the watermark: followers cannot read them yet.
    pub events: i64,
    /// Age of the oldest registered appender still open: only appenders hold the watermark
    /// back.
    pub seconds: f64,
}

pub async fn watermark_lag(pool: &PgPool) -> Result<WatermarkLag, sqlx::Error> {
    let (seconds, events): (Option<f64>, i64) = sqlx::query_as("SELECT seconds, events FROM mira_appender_lag()")
        .fetch_one(pool)
        .await?;
    Ok(WatermarkLag {
        events,
        seconds: seconds.unwrap_or(0.0).max(0.0),
    })
}

/// Events after `cursor` and below a fixed `watermark`, in follow order.
pub async fn read_below<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    cursor: Cursor,
    watermark: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    sqlx::query(&follow_below_sql())
        .bind(cursor.tx_id.to_string())
        .bind(cursor.position)
        .bind(watermark.to_string())
        .bind(limit)
        .fetch_all(e)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// What a checkpoint records of an event: where it is and its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafRow {
    pub cursor: Cursor,
    pub event_id: Uuid,
    pub hash: Hash32,
}

/// Like [`read_below`], only the columns a checkpoint covers (no payloads).
pub async fn read_leaves_below<'e, E: sqlx::PgExecutor<'e>>(
    e: E,
    cursor: Cursor,
    watermark: i64,
    limit: i64,
) -> Result<Vec<LeafRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT tx_id::text::bigint AS tx_id, global_position, event_id, hash FROM events \
         WHERE (tx_id, global_position) > ($1::text::xid8, $2) AND tx_id < $3::text::xid8 \
         ORDER BY events.tx_id, events.global_position LIMIT $4",
    )
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .bind(watermark.to_string())
    .bind(limit)
    .fetch_all(e)
    .await?;
    rows.iter()
        .map(|r| {
            let hash: Vec<u8> = r.try_get("hash")?;
            Ok(LeafRow {
                cursor: Cursor {
                    tx_id: r.try_get("tx_id")?,
                    position: r.try_get("global_position")?,
                },
                event_id: r.try_get("event_id")?,
                hash: hash
                    .try_into()
                    .map_err(|_| sqlx::Error::Decode("an event hash is not 32 bytes".into()))?,
            })
        })
        .collect()
}

/// [`EventLog::read_after`] inside the caller's transaction.
pub async fn read_after_in(
    conn: &mut PgConnection,
    cursor: Cursor,
    limit: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let wm = watermark(&mut *conn).await?;
    read_below(&mut *conn, cursor, wm, limit).await
}

/// The follow query below a fixed watermark. `ORDER BY` names the table's columns: the output
/// column `tx_id` (cast to bigint) would otherwise shadow them and force a sort of the whole
/// remaining log on every batch instead of an index walk.
pub fn follow_below_sql() -> String {
    format!(
        "SELECT {COLUMNS} FROM events \
         WHERE (tx_id, global_position) > ($1::text::xid8, $2) AND tx_id < $3::text::xid8 \
         ORDER BY events.tx_id, events.global_position LIMIT $4"
    )
}
