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

fn failed(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Failed(e.to_string())
}

fn decode<E: serde::de::DeserializeOwned>(e: &StoredEvent) -> Result<E, HandlerError> {
    mira_eventlog::repo::decode(e).map_err(HandlerError::Failed)
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

    /// Locks and loads the aggregate state kept in a row. `None` when the row already holds
    /// `sequence` (a rebuild got there first, or a redelivery); otherwise the state (default for
    /// a new row) and whether the row exists.
    async fn load<A: serde::de::DeserializeOwned + Default>(
        &self,
        tx: &mut PgConnection,
        table: &str,
        key: &str,
        id: uuid::Uuid,
        sequence: i64,
    ) -> Result<Option<(A, bool)>, HandlerError> {
        let s = &self.schema;
        let current: Option<(serde_json::Value, i64)> = sqlx::query_as(&format!(
            "SELECT state, last_sequence FROM {s}.{table} WHERE {key} = $1 FOR UPDATE"
        ))
        .persistent(false)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        match current {
            Some((_, last)) if last >= sequence => Ok(None),
            Some((state, _)) => Ok(Some((serde_json::from_value(state).map_err(failed)?, true))),
            None => Ok(Some((A::default(), false))),
        }
    }

    async fn job(&self, tx: &mut PgConnection, e: &StoredEvent, md: &Metadata) -> Result<(), HandlerError> {
        let id = uuid_of(e)?;
        let event: JobEvent = decode(e)?;
        let s = &self.schema;
        let Some((mut job, exists)) = self.load::<Job>(tx, "jobs", "job_id", id, e.sequence).await? else {
            return Ok(());
        };
        if !exists && !matches!(event, JobEvent::JobSubmitted { .. }) {
            return Err(failed(format!("job {id}: {} before JobSubmitted", e.event_type)));
        }
        if let JobEvent::JobSucceeded { usage, .. } = &event {
            let column = if usage.device == "gpu" { "gpu_us" } else { "cpu_us" };
            sqlx::query(&format!(
                "INSERT INTO {s}.usage (tenant_id, {column}, bytes_written) VALUES ($1, $2, $3) \
                 ON CONFLICT (tenant_id) DO UPDATE SET {column} = {s}.usage.{column} + EXCLUDED.{column}, \
                 bytes_written = {s}.usage.bytes_written + EXCLUDED.bytes_written"
            ))
            .persistent(false)
            .bind(&e.tenant_id)
            .bind(micros(usage.device_seconds))
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
        )).persistent(false)
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
        .persistent(false)
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
        let Some((mut slide, exists)) = self.load::<Slide>(tx, "slides", "slide_id", id, e.sequence).await? else {
            return Ok(());
        };
        if !exists && !matches!(event, SlideEvent::SlideRegistered { .. }) {
            return Err(failed(format!("slide {id}: {} before SlideRegistered", e.event_type)));
        }
        if let SlideEvent::SlideUploaded { size_bytes } = &event {
            sqlx::query(&format!(
                "INSERT INTO {s}.usage (tenant_id, bytes_uploaded) VALUES ($1, $2) ON CONFLICT (tenant_id) \
                 DO UPDATE SET bytes_uploaded = {s}.usage.bytes_uploaded + EXCLUDED.bytes_uploaded"
            ))
            .persistent(false)
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
        )).persistent(false)
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
        projector.apply_batch(&mut tx, &batch).await?;
        tx.commit().await?;
        n += batch.len() as u64;
    }
}

/// A job row being folded in memory during a batch.
struct JobAcc {
    job: Job,
    tenant: String,
    last_sequence: i64,
    position: i64,
    submitted_by: String,
    submitted_at: chrono::DateTime<chrono::Utc>,
    updated_at: chrono::DateTime<chrono::Utc>,
    dirty: bool,
}

#[derive(Default)]
struct UsageAcc {
    gpu_us: i64,
    cpu_us: i64,
    bytes_written: i64,
}

/// Device time in whole microseconds.
fn micros(seconds: f64) -> i64 {
    (seconds * 1e6).round() as i64
}

impl Projector {
    /// Applies many events at once, with the same result as applying them one by one: rows are
    /// loaded in one query, folded in memory, and written back in one statement per table.
    /// Rebuilds use it; the live consumer applies one event per transaction.
    pub async fn apply_batch(&self, tx: &mut PgConnection, events: &[StoredEvent]) -> Result<(), HandlerError> {
        sqlx::query("SET LOCAL ROLE mira_projector").execute(&mut *tx).await?;
        let s = &self.schema;
        let mut ids: Vec<uuid::Uuid> = Vec::new();
        for e in events.iter().filter(|e| e.aggregate_type == "Job") {
            ids.push(uuid_of(e)?);
        }
        ids.sort();
        ids.dedup();
        let rows = sqlx::query(&format!(
            "SELECT job_id, tenant_id, state, last_sequence, position, submitted_by, submitted_at, updated_at \
             FROM {s}.jobs WHERE job_id = ANY($1) FOR UPDATE"
        ))
        .persistent(false)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut jobs: std::collections::HashMap<uuid::Uuid, JobAcc> = std::collections::HashMap::new();
        for r in rows {
            let state: serde_json::Value = r.try_get("state")?;
            jobs.insert(
                r.try_get("job_id")?,
                JobAcc {
                    job: serde_json::from_value(state).map_err(failed)?,
                    tenant: r.try_get("tenant_id")?,
                    last_sequence: r.try_get("last_sequence")?,
                    position: r.try_get("position")?,
                    submitted_by: r.try_get("submitted_by")?,
                    submitted_at: r.try_get("submitted_at")?,
                    updated_at: r.try_get("updated_at")?,
                    dirty: false,
                },
            );
        }
        let mut usage: std::collections::BTreeMap<String, UsageAcc> = std::collections::BTreeMap::new();
        let mut timeline: Vec<(&StoredEvent, Metadata)> = Vec::new();
        for e in events {
            match e.aggregate_type.as_str() {
                "Slide" => {
                    let md: Metadata = serde_json::from_str(&e.metadata).map_err(failed)?;
                    self.slide(tx, e, &md).await?;
                }
                "Job" => {
                    let id = uuid_of(e)?;
                    if jobs.get(&id).is_some_and(|a| a.last_sequence >= e.sequence) {
                        continue;
                    }
                    let md: Metadata = serde_json::from_str(&e.metadata).map_err(failed)?;
                    let event: JobEvent = decode(e)?;
                    let acc = match jobs.entry(id) {
                        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => {
                            if !matches!(event, JobEvent::JobSubmitted { .. }) {
                                return Err(failed(format!("job {id}: {} before JobSubmitted", e.event_type)));
                            }
                            v.insert(JobAcc {
                                job: Job::default(),
                                tenant: e.tenant_id.clone(),
                                last_sequence: 0,
                                position: 0,
                                submitted_by: md.actor.id.clone(),
                                submitted_at: e.recorded_at,
                                updated_at: e.recorded_at,
                                dirty: false,
                            })
                        }
                    };
                    if let JobEvent::JobSucceeded { usage: u, .. } = &event {
                        let t = usage.entry(e.tenant_id.clone()).or_default();
                        if u.device == "gpu" {
                            t.gpu_us += micros(u.device_seconds);
                        } else {
                            t.cpu_us += micros(u.device_seconds);
                        }
                        t.bytes_written += u.bytes_written as i64;
                    }
                    acc.job.apply(event);
                    acc.last_sequence = e.sequence;
                    acc.position = e.global_position;
                    acc.updated_at = e.recorded_at;
                    acc.dirty = true;
                    timeline.push((e, md));
                }
                _ => {}
            }
        }
        // Usage first, in the order the per-event path would add it per tenant.
        for (tenant, u) in &usage {
            sqlx::query(&format!(
                "INSERT INTO {s}.usage (tenant_id, gpu_us, cpu_us, bytes_written) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (tenant_id) DO UPDATE SET gpu_us = {s}.usage.gpu_us + EXCLUDED.gpu_us, \
                 cpu_us = {s}.usage.cpu_us + EXCLUDED.cpu_us, \
                 bytes_written = {s}.usage.bytes_written + EXCLUDED.bytes_written"
            ))
            .persistent(false)
            .bind(tenant)
            .bind(u.gpu_us)
            .bind(u.cpu_us)
            .bind(u.bytes_written)
            .execute(&mut *tx)
            .await?;
        }
        let dirty: Vec<(&uuid::Uuid, &JobAcc)> = jobs.iter().filter(|(_, a)| a.dirty).collect();
        if !dirty.is_empty() {
            let mut c = JobColumns::default();
            for (id, a) in &dirty {
                let j = &a.job;
                c.job_id.push(**id);
                c.tenant_id.push(a.tenant.clone());
                c.slide_id.push(j.slide_id.map(|s| s.as_uuid()).unwrap_or_default());
                c.kind.push(j.kind.clone());
                c.params.push(j.params.clone());
                c.status.push(j.status.as_str().to_owned());
                c.attempt.push(j.attempt as i32);
                c.max_attempts.push(j.max_attempts as i32);
                c.worker_id.push(j.worker_id.clone());
                c.lease_until.push(j.lease_until);
                c.progress_done.push(j.progress.map(|p| p.0 as i64));
                c.progress_total.push(j.progress.map(|p| p.1 as i64));
                c.failure.push(j.failure.clone());
                c.manifest_key.push(j.manifest_key.clone());
                c.manifest_sha256.push(j.manifest_sha256.clone());
                c.state.push(serde_json::to_value(j).map_err(failed)?);
                c.submitted_by.push(a.submitted_by.clone());
                c.submitted_at.push(a.submitted_at);
                c.updated_at.push(a.updated_at);
                c.last_sequence.push(a.last_sequence);
                c.position.push(a.position);
            }
            sqlx::query(&format!(
                "INSERT INTO {s}.jobs (job_id, tenant_id, slide_id, kind, params, status, attempt, max_attempts, \
                 worker_id, lease_until, progress_done, progress_total, failure, manifest_key, manifest_sha256, state, \
                 submitted_by, submitted_at, updated_at, last_sequence, position) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::jsonb[], $6::text[], \
                 $7::int[], $8::int[], $9::text[], $10::timestamptz[], $11::bigint[], $12::bigint[], $13::text[], \
                 $14::text[], $15::text[], $16::jsonb[], $17::text[], $18::timestamptz[], $19::timestamptz[], \
                 $20::bigint[], $21::bigint[]) \
                 ON CONFLICT (job_id) DO UPDATE SET status = EXCLUDED.status, attempt = EXCLUDED.attempt, \
                 max_attempts = EXCLUDED.max_attempts, worker_id = EXCLUDED.worker_id, \
                 lease_until = EXCLUDED.lease_until, progress_done = EXCLUDED.progress_done, \
                 progress_total = EXCLUDED.progress_total, failure = EXCLUDED.failure, \
                 manifest_key = EXCLUDED.manifest_key, manifest_sha256 = EXCLUDED.manifest_sha256, \
                 state = EXCLUDED.state, updated_at = EXCLUDED.updated_at, last_sequence = EXCLUDED.last_sequence, \
                 position = EXCLUDED.position"
            ))
            .persistent(false)
            .bind(c.job_id)
            .bind(c.tenant_id)
            .bind(c.slide_id)
            .bind(c.kind)
            .bind(c.params)
            .bind(c.status)
            .bind(c.attempt)
            .bind(c.max_attempts)
            .bind(c.worker_id)
            .bind(c.lease_until)
            .bind(c.progress_done)
            .bind(c.progress_total)
            .bind(c.failure)
            .bind(c.manifest_key)
            .bind(c.manifest_sha256)
            .bind(c.state)
            .bind(c.submitted_by)
            .bind(c.submitted_at)
            .bind(c.updated_at)
            .bind(c.last_sequence)
            .bind(c.position)
            .execute(&mut *tx)
            .await?;
        }
        if !timeline.is_empty() {
            let mut job_id = Vec::new();
            let mut sequence = Vec::new();
            let mut tenant = Vec::new();
            let mut event_id = Vec::new();
            let mut event_type = Vec::new();
            let mut actor_kind = Vec::new();
            let mut actor_id = Vec::new();
            let mut recorded_at = Vec::new();
            let mut hash = Vec::new();
            let mut position = Vec::new();
            for (e, md) in &timeline {
                job_id.push(uuid_of(e)?);
                sequence.push(e.sequence);
                tenant.push(e.tenant_id.clone());
                event_id.push(e.event_id);
                event_type.push(e.event_type.clone());
                actor_kind.push(md.actor.kind.to_string());
                actor_id.push(md.actor.id.clone());
                recorded_at.push(e.recorded_at);
                hash.push(hex::encode(e.hash));
                position.push(e.global_position);
            }
            sqlx::query(&format!(
                "INSERT INTO {s}.job_timeline (job_id, sequence, tenant_id, event_id, event_type, actor_kind, actor_id, \
                 recorded_at, hash, position) SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::uuid[], \
                 $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::bigint[]) ON CONFLICT DO NOTHING"
            )).persistent(false)
            .bind(job_id)
            .bind(sequence)
            .bind(tenant)
            .bind(event_id)
            .bind(event_type)
            .bind(actor_kind)
            .bind(actor_id)
            .bind(recorded_at)
            .bind(hash)
            .bind(position)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct JobColumns {
    job_id: Vec<uuid::Uuid>,
    tenant_id: Vec<String>,
    slide_id: Vec<uuid::Uuid>,
    kind: Vec<String>,
    params: Vec<serde_json::Value>,
    status: Vec<String>,
    attempt: Vec<i32>,
    max_attempts: Vec<i32>,
    worker_id: Vec<Option<String>>,
    lease_until: Vec<Option<chrono::DateTime<chrono::Utc>>>,
    progress_done: Vec<Option<i64>>,
    progress_total: Vec<Option<i64>>,
    failure: Vec<Option<String>>,
    manifest_key: Vec<Option<String>>,
    manifest_sha256: Vec<Option<String>>,
    state: Vec<serde_json::Value>,
    submitted_by: Vec<String>,
    submitted_at: Vec<chrono::DateTime<chrono::Utc>>,
    updated_at: Vec<chrono::DateTime<chrono::Utc>>,
    last_sequence: Vec<i64>,
    position: Vec<i64>,
}
