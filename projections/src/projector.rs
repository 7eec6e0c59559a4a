//! The read-model projector.

use cqrs_es::Aggregate;
use mira_aggregates::{Job, Slide};
use mira_bus::consumer::{Handler, HandlerError};
use mira_eventlog::StoredEvent;
use mira_events::{JobEvent, Metadata, SlideEvent};
use sqlx::{PgConnection, Row};

/// The NOTIFY channel the gateway listens on.
pub const CHANNEL: &str = "mira_read_models";
/// This projection's name in `projection_positions`.
pub const NAME: &str = "read_models";
/// Advisory lock between projector writes (shared) and a rebuild's swap (exclusive).
pub const SWAP_LOCK: i64 = 0x6d69_7261_7377_6170; // "miraswap"

/// Applies events to the read models in `schema` (`rm`, or a rebuild's schema).
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

fn failed(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Failed(e.to_string())
}

fn decode<E: serde::de::DeserializeOwned>(e: &StoredEvent) -> Result<E, HandlerError> {
    let s = mira_events::upcast::upcast(mira_eventlog::repo::to_serialized(e.clone()).map_err(failed)?);
    serde_json::from_value(s.payload).map_err(failed)
}

fn uuid_of(e: &StoredEvent) -> Result<uuid::Uuid, HandlerError> {
    uuid::Uuid::parse_str(&e.aggregate_id).map_err(|_| failed(format!("aggregate id {} is not a UUID", e.aggregate_id)))
}

impl Projector {
    /// A projector writing into `schema` without notifications (rebuilds and comparisons).
    pub fn into_schema(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            notify: false,
        }
    }

    async fn job(&self, tx: &mut PgConnection, e: &StoredEvent, md: &Metadata) -> Result<(), HandlerError> {
        let id = uuid_of(e)?;
        let event: JobEvent = decode(e)?;
        let s = &self.schema;
        let current: Option<serde_json::Value> =
            sqlx::query_scalar(&format!("SELECT state FROM {s}.jobs WHERE job_id = $1"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let mut job: Job = match &current {
            Some(v) => serde_json::from_value(v.clone()).map_err(failed)?,
            None => Job::default(),
        };
        if current.is_none() && !matches!(event, JobEvent::JobSubmitted { .. }) {
            return Err(failed(format!("job {id}: {} before JobSubmitted", e.event_type)));
        }
        if let JobEvent::JobSucceeded { usage, .. } = &event {
            let column = if usage.device == "gpu" {
                "gpu_seconds"
            } else {
                "cpu_seconds"
            };
            sqlx::query(&format!(
                "INSERT INTO {s}.usage (tenant_id, {column}, bytes_written) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id) DO UPDATE SET {column} = {s}.usage.{column} + EXCLUDED.{column}, \
                 bytes_written = {s}.usage.bytes_written + EXCLUDED.bytes_written"
            ))
            .bind(&e.tenant_id)
            .bind(usage.device_seconds)
            .bind(usage.bytes_written as i64)
            .execute(&mut *tx)
            .await?;
        }
        job.apply(event);
        let state = serde_json::to_value(&job).map_err(failed)?;
        let (done, total) = job
            .progress
            .map_or((None, None), |(d, t)| (Some(d as i64), Some(t as i64)));
        sqlx::query(&format!(
            "INSERT INTO {s}.jobs (job_id, tenant_id, slide_id, kind, params, status, attempt, max_attempts, worker_id, \
             lease_until, progress_done, progress_total, failure, manifest_key, manifest_sha256, state, submitted_by, \
             submitted_at, updated_at, last_sequence, position) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $18, $19, $20) \
             ON CONFLICT (job_id) DO UPDATE SET status = EXCLUDED.status, attempt = EXCLUDED.attempt, \
             max_attempts = EXCLUDED.max_attempts, worker_id = EXCLUDED.worker_id, lease_until = EXCLUDED.lease_until, \
             progress_done = EXCLUDED.progress_done, progress_total = EXCLUDED.progress_total, failure = EXCLUDED.failure, \
             manifest_key = EXCLUDED.manifest_key, manifest_sha256 = EXCLUDED.manifest_sha256, state = EXCLUDED.state, \
             updated_at = EXCLUDED.updated_at, last_sequence = EXCLUDED.last_sequence, position = EXCLUDED.position"
        ))
        .bind(id)
        .bind(&e.tenant_id)
        .bind(job.slide_id.map(|s| s.as_uuid()).unwrap_or_default())
        .bind(&job.kind)
        .bind(&job.params)
        .bind(job.status.as_str())
        .bind(job.attempt as i32)
        .bind(job.max_attempts as i32)
        .bind(&job.worker_id)
        .bind(job.lease_until)
        .bind(done)
        .bind(total)
        .bind(&job.failure)
        .bind(&job.manifest_key)
        .bind(&job.manifest_sha256)
        .bind(state)
        .bind(&md.actor.id)
        .bind(e.recorded_at)
        .bind(e.sequence)
        .bind(e.global_position)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "INSERT INTO {s}.job_timeline (job_id, sequence, tenant_id, event_id, event_type, actor_kind, actor_id, \
             recorded_at, hash, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING"
        ))
        .bind(id)
        .bind(e.sequence)
        .bind(&e.tenant_id)
        .bind(e.event_id)
        .bind(&e.event_type)
        .bind(md.actor.kind.to_string())
        .bind(&md.actor.id)
        .bind(e.recorded_at)
        .bind(hex::encode(e.hash))
        .bind(e.global_position)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn slide(&self, tx: &mut PgConnection, e: &StoredEvent, md: &Metadata) -> Result<(), HandlerError> {
        let id = uuid_of(e)?;
        let event: SlideEvent = decode(e)?;
        let s = &self.schema;
        let current: Option<(serde_json::Value, i64)> = sqlx::query_as(&format!(
            "SELECT state, last_sequence FROM {s}.slides WHERE slide_id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if current.as_ref().is_some_and(|(_, last)| *last >= e.sequence) {
            return Ok(());
        }
        let mut slide: Slide = match &current {
            Some((v, _)) => serde_json::from_value(v.clone()).map_err(failed)?,
            None => Slide::default(),
        };
        if current.is_none() && !matches!(event, SlideEvent::SlideRegistered { .. }) {
            return Err(failed(format!("slide {id}: {} before SlideRegistered", e.event_type)));
        }
        if let SlideEvent::SlideUploaded { size_bytes } = &event {
            sqlx::query(&format!(
                "INSERT INTO {s}.usage (tenant_id, bytes_uploaded) VALUES ($1, $2) ON CONFLICT (tenant_id) \
                 DO UPDATE SET bytes_uploaded = {s}.usage.bytes_uploaded + EXCLUDED.bytes_uploaded"
            ))
            .bind(&e.tenant_id)
            .bind(*size_bytes as i64)
            .execute(&mut *tx)
            .await?;
        }
        slide.apply(event);
        let state = serde_json::to_value(&slide).map_err(failed)?;
        let name = serde_json::to_value(&slide.name).map_err(failed)?;
        let metadata = slide
            .metadata
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(failed)?;
        sqlx::query(&format!(
            "INSERT INTO {s}.slides (slide_id, tenant_id, status, name, size_bytes, content_type, object_key, metadata, \
             rejection, state, registered_by, registered_at, updated_at, last_sequence, position) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14) \
             ON CONFLICT (slide_id) DO UPDATE SET status = EXCLUDED.status, metadata = EXCLUDED.metadata, \
             rejection = EXCLUDED.rejection, state = EXCLUDED.state, updated_at = EXCLUDED.updated_at, \
             last_sequence = EXCLUDED.last_sequence, position = EXCLUDED.position"
        ))
        .bind(id)
        .bind(&e.tenant_id)
        .bind(slide.status.as_str())
        .bind(name)
        .bind(slide.size_bytes as i64)
        .bind(&slide.content_type)
        .bind(&slide.object_key)
        .bind(metadata)
        .bind(&slide.rejection)
        .bind(state)
        .bind(&md.actor.id)
        .bind(e.recorded_at)
        .bind(e.sequence)
        .bind(e.global_position)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Handler for Projector {
    async fn apply(&self, tx: &mut PgConnection, e: &StoredEvent) -> Result<(), HandlerError> {
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
    /// nobody reads yet).
    pub async fn apply_unlocked(&self, tx: &mut PgConnection, e: &StoredEvent) -> Result<(), HandlerError> {
        sqlx::query("SET LOCAL ROLE mira_projector").execute(&mut *tx).await?;
        let md: Metadata = serde_json::from_str(&e.metadata).map_err(failed)?;
        let entity = match e.aggregate_type.as_str() {
            "Job" => {
                self.job(tx, e, &md).await?;
                "job"
            }
            "Slide" => {
                self.slide(tx, e, &md).await?;
                "slide"
            }
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
            let payload = serde_json::json!({
                "tenant": e.tenant_id, "entity": entity, "id": e.aggregate_id,
                "sequence": e.sequence, "position": position,
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
pub async fn replay_into(pool: &sqlx::PgPool, schema: &str) -> Result<u64, HandlerError> {
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
        for e in &batch {
            projector.apply(&mut tx, e).await?;
        }
        tx.commit().await?;
        n += batch.len() as u64;
    }
}
