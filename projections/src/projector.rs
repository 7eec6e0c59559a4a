//! The read-model projector.

use std::collections::{BTreeMap, HashMap};

use cqrs_es::Aggregate;
use mira_bus::consumer::{Apply, ApplyError};
use mira_eventlog::StoredEvent;
use mira_events::{JobEvent, Metadata, SlideEvent};
use serde::Serialize;
use sqlx::{PgConnection, Row as _};

use crate::views::{At, Entity, JobView, SlideView, Stored, StoredTimelineEntry, Table, TimelineEntry};

/// The NOTIFY channel the gateway listens on.
pub const CHANNEL: &str = "mira_read_models";
/// This projection's name in `projection_positions`.
pub const NAME: &str = "read_models";
/// Advisory lock between projector writes (shared) and a rebuild's swap (exclusive).
pub const SWAP_LOCK: i64 = 0x6d69_7261_7377_6170; // "miraswap"

/// Applies events to the read models in `schema` (`rm`, or a rebuild's schema).
///
/// Statements naming read-model tables are not kept as prepared statements: a rebuild renames
/// schemas, and a cached plan would keep pointing at the retired tables.
#[derive(Debug, Clone)]
pub struct Projector {
    schema: String,
    notify: bool,
}

impl Default for Projector {
    fn default() -> Self {
        Self {
            schema: "rm".into(),
            notify: true,
        }
    }
}

fn uuid_of(e: &StoredEvent) -> Result<uuid::Uuid, ApplyError> {
    uuid::Uuid::parse_str(&e.aggregate_id)
        .map_err(|_| ApplyError::failed(format!("aggregate id {} is not a UUID", e.aggregate_id)))
}

impl Projector {
    /// A projector writing into `schema` without notifications (rebuilds and comparisons).
    pub fn into_schema(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            notify: false,
        }
    }

    /// Locks and loads the stored rows of `ids` from `V`'s table, by id.
    async fn load<V: Entity>(
        &self,
        tx: &mut PgConnection,
        ids: &[uuid::Uuid],
    ) -> Result<HashMap<uuid::Uuid, Row<V>>, ApplyError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let (s, table, key) = (&self.schema, V::TABLE, V::KEY);
        let rows: Vec<sqlx::types::Json<Stored<V, V::State>>> = sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t) FROM {s}.{table} t WHERE {key} = ANY($1) FOR UPDATE"
        ))
        .persistent(false)
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.0.view.id(),
                    Row {
                        stored: r.0,
                        dirty: false,
                    },
                )
            })
            .collect())
    }

    /// Writes `rows` into `table`: inserted, or on a key conflict updated (`update`) or left
    /// as they are. The columns are the rows' JSON fields.
    async fn write<T: Serialize>(
        &self,
        tx: &mut PgConnection,
        table: &str,
        key: &str,
        rows: &[T],
        update: bool,
    ) -> Result<(), ApplyError> {
        let values = rows
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApplyError::failed)?;
        let Some(serde_json::Value::Object(first)) = values.first() else {
            return Ok(());
        };
        let columns: Vec<String> = first.keys().map(|k| format!("\"{k}\"")).collect();
        let cols = columns.join(", ");
        let conflict = if update {
            let excluded: Vec<String> = columns.iter().map(|c| format!("EXCLUDED.{c}")).collect();
            format!("DO UPDATE SET ({cols}) = ROW({})", excluded.join(", "))
        } else {
            "DO NOTHING".to_owned()
        };
        let s = &self.schema;
        sqlx::query(&format!(
            "INSERT INTO {s}.{table} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{s}.{table}, $1) \
             ON CONFLICT ({key}) {conflict}"
        ))
        .persistent(false)
        .bind(sqlx::types::Json(values))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// A row being folded in memory.
struct Row<V: Entity> {
    stored: Stored<V, V::State>,
    dirty: bool,
}

/// Applies one event to its row in `rows`: through the aggregate's own `apply`, so the read
/// model cannot disagree with the domain.
fn fold<V: Entity>(
    rows: &mut HashMap<uuid::Uuid, Row<V>>,
    e: &StoredEvent,
    md: &Metadata,
    event: <V::State as Aggregate>::Event,
) -> Result<(), ApplyError> {
    let id = uuid_of(e)?;
    let at = At {
        actor: &md.actor.id,
        time: e.recorded_at,
        position: e.global_position,
    };
    match rows.get_mut(&id) {
        Some(row) => {
            row.stored.state.apply(event);
            row.stored.view = V::of(&row.stored.state, id, Some(&row.stored.view), &at).map_err(ApplyError::failed)?;
            row.stored.last_sequence = e.sequence;
            row.dirty = true;
        }
        None => {
            if !V::first(&event) {
                return Err(ApplyError::failed(format!(
                    "{} {id}: {} before its first event",
                    V::TABLE,
                    e.event_type
                )));
            }
            let mut state = V::State::default();
            state.apply(event);
            let view = V::of(&state, id, None, &at).map_err(ApplyError::failed)?;
            let extra = V::hidden(&state);
            rows.insert(
                id,
                Row {
                    stored: Stored {
                        view,
                        tenant_id: e.tenant_id.clone(),
                        state,
                        last_sequence: e.sequence,
                        extra,
                    },
                    dirty: true,
                },
            );
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Apply for Projector {
    async fn apply(&self, tx: &mut PgConnection, e: &StoredEvent) -> Result<(), ApplyError> {
        // Shared with every other projector transaction; a rebuild's swap takes it exclusively,
        // so no write can land in the schema being retired.
        sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
            .bind(SWAP_LOCK)
            .execute(&mut *tx)
            .await?;
        self.apply_unlocked(tx, e).await
    }
}

impl Projector {
    /// Applies without the swap lock: for a rebuild, which holds it (or writes a schema
    /// nobody reads yet). The live path is a batch of one.
    pub async fn apply_unlocked(&self, tx: &mut PgConnection, e: &StoredEvent) -> Result<(), ApplyError> {
        self.apply_batch(tx, std::slice::from_ref(e)).await?;
        let entity = match e.aggregate_type.as_str() {
            "Job" => "job",
            "Slide" => "slide",
            _ => return Ok(()),
        };
        if self.notify {
            let row = sqlx::query(
                "INSERT INTO projection_positions (projection, last_position, last_recorded_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (projection) DO UPDATE SET \
                 last_position = greatest(projection_positions.last_position, EXCLUDED.last_position), \
                 last_recorded_at = greatest(projection_positions.last_recorded_at, EXCLUDED.last_recorded_at), \
                 updated_at = now() RETURNING last_position",
            )
            .bind(NAME)
            .bind(e.global_position)
            .bind(e.recorded_at)
            .fetch_one(&mut *tx)
            .await?;
            let position: i64 = row.try_get("last_position")?;
            // The trace of the change, for the WebSocket push that tells a browser about it.
            let traceparent = mira_telemetry::traceparent_within(&e.traceparent().unwrap_or_default());
            let payload = serde_json::json!({
                "tenant": e.tenant_id, "entity": entity, "id": e.aggregate_id,
                "sequence": e.sequence, "position": position, "traceparent": traceparent,
            });
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload.to_string())
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

/// Replays the whole log (up to the settled watermark) into a fresh read-model schema
/// `schema`, in batches, and returns the events applied. The live schema is untouched; this is
/// the first half of a rebuild, and what convergence checks compare against.
pub async fn replay_into(pool: &sqlx::PgPool, schema: &str) -> Result<u64, ApplyError> {
    sqlx::query("SELECT mira_create_read_models($1)")
        .bind(schema)
        .execute(pool)
        .await?;
    let log = mira_eventlog::EventLog::new(pool.clone());
    let projector = Projector::into_schema(schema);
    let mut cursor = mira_eventlog::Cursor::START;
    let mut n = 0u64;
    loop {
        let batch = log.read_after(cursor, 5_000).await?;
        let Some(last) = batch.last() else { return Ok(n) };
        cursor = last.cursor();
        let mut tx = pool.begin().await?;
        projector.apply_batch(&mut tx, &batch).await?;
        tx.commit().await?;
        n += batch.len() as u64;
    }
}

/// One tenant's usage added by a batch.
#[derive(Default)]
struct UsageAdded {
    gpu_us: i64,
    cpu_us: i64,
    bytes_uploaded: i64,
    bytes_written: i64,
}

/// Device time in whole microseconds.
fn micros(seconds: f64) -> i64 {
    (seconds * 1e6).round() as i64
}

fn ids_of(events: &[StoredEvent], aggregate_type: &str) -> Result<Vec<uuid::Uuid>, ApplyError> {
    let mut ids = events
        .iter()
        .filter(|e| e.aggregate_type == aggregate_type)
        .map(uuid_of)
        .collect::<Result<Vec<_>, _>>()?;
    ids.sort();
    ids.dedup();
    Ok(ids)
}

impl Projector {
    /// Applies events: rows are loaded in one query per table, folded in memory, and written
    /// back in one statement per table. The one way the read models are written: the live
    /// consumer applies a batch of one event, a rebuild thousands, with the same result.
    #[tracing::instrument(name = "project", skip_all, fields(schema = %self.schema, events = events.len()))]
    pub async fn apply_batch(&self, tx: &mut PgConnection, events: &[StoredEvent]) -> Result<(), ApplyError> {
        sqlx::query("SET LOCAL ROLE mira_projector").execute(&mut *tx).await?;
        let mut jobs = self.load::<JobView>(tx, &ids_of(events, "Job")?).await?;
        let mut slides = self.load::<SlideView>(tx, &ids_of(events, "Slide")?).await?;
        let mut usage: BTreeMap<String, UsageAdded> = BTreeMap::new();
        let mut timeline: Vec<StoredTimelineEntry> = Vec::new();
        for e in events {
            let applied = |last: Option<i64>| last.is_some_and(|l| l >= e.sequence);
            match e.aggregate_type.as_str() {
                "Job" => {
                    let id = uuid_of(e)?;
                    if applied(jobs.get(&id).map(|r| r.stored.last_sequence)) {
                        continue;
                    }
                    let md: Metadata = serde_json::from_str(&e.metadata).map_err(ApplyError::failed)?;
                    let event: JobEvent = e.decode()?;
                    if let JobEvent::JobSucceeded { usage: u, .. } = &event {
                        let t = usage.entry(e.tenant_id.clone()).or_default();
                        if u.device == "gpu" {
                            t.gpu_us += micros(u.device_seconds);
                        } else {
                            t.cpu_us += micros(u.device_seconds);
                        }
                        t.bytes_written += u.bytes_written as i64;
                    }
                    fold(&mut jobs, e, &md, event)?;
                    timeline.push(StoredTimelineEntry {
                        entry: TimelineEntry {
                            sequence: e.sequence,
                            event_id: e.event_id,
                            event_type: e.event_type.clone(),
                            actor_kind: md.actor.kind.to_string(),
                            actor_id: md.actor.id.clone(),
                            recorded_at: e.recorded_at,
                            hash: hex::encode(e.hash),
                            position: e.global_position,
                        },
                        job_id: id,
                        tenant_id: e.tenant_id.clone(),
                    });
                }
                "Slide" => {
                    let id = uuid_of(e)?;
                    if applied(slides.get(&id).map(|r| r.stored.last_sequence)) {
                        continue;
                    }
                    let md: Metadata = serde_json::from_str(&e.metadata).map_err(ApplyError::failed)?;
                    let event: SlideEvent = e.decode()?;
                    if let SlideEvent::SlideUploaded { size_bytes, .. } = &event {
                        usage.entry(e.tenant_id.clone()).or_default().bytes_uploaded += *size_bytes as i64;
                    }
                    fold(&mut slides, e, &md, event)?;
                }
                _ => {}
            }
        }
        let s = &self.schema;
        for (tenant, u) in &usage {
            sqlx::query(&format!(
                "INSERT INTO {s}.usage (tenant_id, gpu_us, cpu_us, bytes_uploaded, bytes_written) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id) DO UPDATE SET \
                 gpu_us = {s}.usage.gpu_us + EXCLUDED.gpu_us, cpu_us = {s}.usage.cpu_us + EXCLUDED.cpu_us, \
                 bytes_uploaded = {s}.usage.bytes_uploaded + EXCLUDED.bytes_uploaded, \
                 bytes_written = {s}.usage.bytes_written + EXCLUDED.bytes_written"
            ))
            .persistent(false)
            .bind(tenant)
            .bind(u.gpu_us)
            .bind(u.cpu_us)
            .bind(u.bytes_uploaded)
            .bind(u.bytes_written)
            .execute(&mut *tx)
            .await?;
        }
        self.write_dirty(tx, jobs).await?;
        self.write_dirty(tx, slides).await?;
        self.write(tx, TimelineEntry::TABLE, TimelineEntry::KEY, &timeline, false)
            .await
    }

    async fn write_dirty<V: Entity>(
        &self,
        tx: &mut PgConnection,
        rows: HashMap<uuid::Uuid, Row<V>>,
    ) -> Result<(), ApplyError> {
        let mut dirty: Vec<Stored<V, V::State>> = rows.into_values().filter(|r| r.dirty).map(|r| r.stored).collect();
        // A stable order keeps concurrent writers' row locks in one order.
        dirty.sort_by_key(|r| r.view.id());
        self.write(tx, V::TABLE, V::KEY, &dirty, true).await
    }
}
