//! The read-model query layer the gateway uses. Every transaction runs as `mira_api` with
//! `mira.tenant_id` set for that transaction only, so row-level security applies even when
//! `DATABASE_URL` is a superuser's, and a query that forgets its tenant filter still sees only
//! its tenant.

use chrono::{DateTime, Utc};
use mira_events::TenantId;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

#[derive(Debug, Clone)]
pub struct ReadModels {
    pool: PgPool,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub job_id: uuid::Uuid,
    pub tenant_id: String,
    pub slide_id: uuid::Uuid,
    pub kind: String,
    pub params: serde_json::Value,
    pub status: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker_id: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub progress_done: Option<i64>,
    pub progress_total: Option<i64>,
    pub failure: Option<String>,
    pub manifest_key: Option<String>,
    pub manifest_sha256: Option<String>,
    pub submitted_by: String,
    pub submitted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub position: i64,
}

/// Filters for the job list; all optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<String>,
    pub slide_id: Option<uuid::Uuid>,
    pub submitted_by: Option<String>,
    pub submitted_after: Option<DateTime<Utc>>,
    pub submitted_before: Option<DateTime<Utc>>,
}

/// Keyset pagination: the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JobCursor {
    pub submitted_at: DateTime<Utc>,
    pub job_id: uuid::Uuid,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<JobCursor>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TimelineRow {
    pub sequence: i64,
    pub event_id: uuid::Uuid,
    pub event_type: String,
    pub actor_kind: String,
    pub actor_id: String,
    pub recorded_at: DateTime<Utc>,
    pub hash: String,
    pub position: i64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct SlideRow {
    pub slide_id: uuid::Uuid,
    pub tenant_id: String,
    pub status: String,
    /// The sealed display name; the gateway opens it with the keyring.
    pub name: serde_json::Value,
    pub size_bytes: i64,
    pub content_type: String,
    pub object_key: String,
    pub metadata: Option<serde_json::Value>,
    pub rejection: Option<String>,
    pub registered_by: String,
    pub registered_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub position: i64,
}

const SLIDE_COLUMNS: &str = "slide_id, tenant_id, status, name, size_bytes, content_type, object_key, metadata, \
    rejection, registered_by, registered_at, updated_at, position";

impl ReadModels {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// How far the read models have applied the log: the projector's last position (0 before
    /// its first event).
    pub async fn position(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT coalesce((SELECT last_position FROM projection_positions WHERE projection = $1), 0)")
            .bind(crate::projector::NAME)
            .fetch_one(&self.pool)
            .await
    }

    /// A transaction confined to `tenant` by row-level security.
    pub async fn begin(&self, tenant: &TenantId) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL ROLE mira_api").execute(&mut *tx).await?;
        sqlx::query("SELECT set_config('mira.tenant_id', $1, true)")
            .bind(tenant.as_str())
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }

    pub async fn job(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Option<JobRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let row = sqlx::query_as::<_, JobRow>(&format!("SELECT {JOB_COLUMNS} FROM rm.jobs WHERE job_id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Newest first, `limit` per page.
    pub async fn jobs(
        &self,
        tenant: &TenantId,
        filter: &JobFilter,
        after: Option<JobCursor>,
        limit: i64,
    ) -> Result<Page<JobRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let items = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM rm.jobs WHERE ($1::text IS NULL OR status = $1) \
             AND ($2::uuid IS NULL OR slide_id = $2) AND ($3::text IS NULL OR submitted_by = $3) \
             AND ($4::timestamptz IS NULL OR submitted_at >= $4) AND ($5::timestamptz IS NULL OR submitted_at < $5) \
             AND ($6::timestamptz IS NULL OR (submitted_at, job_id) < ($6, $7)) \
             ORDER BY submitted_at DESC, job_id DESC LIMIT $8"
        ))
        .bind(&filter.status)
        .bind(filter.slide_id)
        .bind(&filter.submitted_by)
        .bind(filter.submitted_after)
        .bind(filter.submitted_before)
        .bind(after.map(|c| c.submitted_at))
        .bind(after.map(|c| c.job_id))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let next = (items.len() as i64 == limit)
            .then(|| {
                items.last().map(|j| JobCursor {
                    submitted_at: j.submitted_at,
                    job_id: j.job_id,
                })
            })
            .flatten();
        Ok(Page { items, next })
    }

    pub async fn slide(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Option<SlideRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let row = sqlx::query_as::<_, SlideRow>(&format!("SELECT {SLIDE_COLUMNS} FROM rm.slides WHERE slide_id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Newest first; `before` is the `registered_at` and id of the last slide of the previous page.
    pub async fn slides(
        &self,
        tenant: &TenantId,
        before: Option<(DateTime<Utc>, uuid::Uuid)>,
        limit: i64,
    ) -> Result<Vec<SlideRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows = sqlx::query_as::<_, SlideRow>(&format!(
            "SELECT {SLIDE_COLUMNS} FROM rm.slides WHERE ($1::timestamptz IS NULL OR (registered_at, slide_id) < ($1, $2)) \
             ORDER BY registered_at DESC, slide_id DESC LIMIT $3"
        ))
        .bind(before.map(|b| b.0))
        .bind(before.map(|b| b.1))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Jobs whose read-model position is after `position`, oldest change first: what a
    /// WebSocket client that saw `position` has missed.
    pub async fn jobs_since(&self, tenant: &TenantId, position: i64, limit: i64) -> Result<Vec<JobRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows = sqlx::query_as::<_, JobRow>(&format!(
            "SELECT {JOB_COLUMNS} FROM rm.jobs WHERE position > $1 ORDER BY position LIMIT $2"
        ))
        .bind(position)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Slides whose read-model position is after `position`, oldest change first.
    pub async fn slides_since(
        &self,
        tenant: &TenantId,
        position: i64,
        limit: i64,
    ) -> Result<Vec<SlideRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows = sqlx::query_as::<_, SlideRow>(&format!(
            "SELECT {SLIDE_COLUMNS} FROM rm.slides WHERE position > $1 ORDER BY position LIMIT $2"
        ))
        .bind(position)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }

    pub async fn timeline(&self, tenant: &TenantId, job: uuid::Uuid) -> Result<Vec<TimelineRow>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows = sqlx::query_as::<_, TimelineRow>(
            "SELECT sequence, event_id, event_type, actor_kind, actor_id, recorded_at, hash, position \
             FROM rm.job_timeline WHERE job_id = $1 ORDER BY sequence",
        )
        .bind(job)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows)
    }
}

const JOB_COLUMNS: &str = "job_id, tenant_id, slide_id, kind, params, status, attempt, max_attempts, worker_id, \
    lease_until, progress_done, progress_total, failure, manifest_key, manifest_sha256, submitted_by, submitted_at, \
    updated_at, position";
