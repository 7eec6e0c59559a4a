//! The read-model query layer the gateway uses. Every transaction runs as `mira_api` with
//! `mira.tenant_id` set for that transaction only, so row-level security applies even when
//! `DATABASE_URL` is a superuser's, and a query that forgets its tenant filter still sees only
//! its tenant.

use chrono::{DateTime, Utc};
use mira_aggregates::JobStatus;
use mira_events::TenantId;
use serde::Serialize;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::views::{JobView, SlideName, SlideView, Table, TimelineEntry};

#[derive(Debug, Clone)]
pub struct ReadModels {
    pool: PgPool,
}

/// Filters for the job list; all optional.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// A job id, or its short id (its last 8 hex digits, lower case).
    pub id: Option<String>,
    pub status: Option<JobStatus>,
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

/// A view's rows as JSON, without the aggregate state nobody reads here.
fn rows_of(table: &str) -> String {
    format!("SELECT to_jsonb(t) - 'state' FROM rm.{table} t")
}

type Rows<T> = Vec<Json<T>>;

fn unwrap<T>(rows: Rows<T>) -> Vec<T> {
    rows.into_iter().map(|r| r.0).collect()
}

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

    /// The tenant's row of `V` with key `id`.
    async fn one<V: Table + Send + Unpin + 'static>(
        &self,
        tenant: &TenantId,
        id: uuid::Uuid,
    ) -> Result<Option<V>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let row: Option<Json<V>> = sqlx::query_scalar(&format!("{} WHERE {} = $1", rows_of(V::TABLE), V::KEY))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.map(|r| r.0))
    }

    /// The tenant's rows of `V` whose read-model position is after `position`, oldest change
    /// first: what a WebSocket client that saw `position` has missed.
    async fn since<V: Table + Send + Unpin + 'static>(
        &self,
        tenant: &TenantId,
        position: i64,
        limit: i64,
    ) -> Result<Vec<V>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows: Rows<V> = sqlx::query_scalar(&format!(
            "{} WHERE position > $1 ORDER BY position LIMIT $2",
            rows_of(V::TABLE)
        ))
        .bind(position)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(unwrap(rows))
    }

    pub async fn job(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Option<JobView>, sqlx::Error> {
        self.one(tenant, id).await
    }

    /// Newest first, `limit` per page.
    pub async fn jobs(
        &self,
        tenant: &TenantId,
        filter: &JobFilter,
        after: Option<JobCursor>,
        limit: i64,
    ) -> Result<Page<JobView>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let items: Rows<JobView> = sqlx::query_scalar(&format!(
            "{} WHERE ($1::text IS NULL OR status = $1) \
             AND ($2::uuid IS NULL OR slide_id = $2) AND ($3::text IS NULL OR submitted_by = $3) \
             AND ($4::timestamptz IS NULL OR submitted_at >= $4) AND ($5::timestamptz IS NULL OR submitted_at < $5) \
             AND ($6::timestamptz IS NULL OR (submitted_at, job_id) < ($6, $7)) \
             AND ($9::text IS NULL OR job_id::text = $9 OR (length($9) = 8 AND right(job_id::text, 8) = $9)) \
             ORDER BY submitted_at DESC, job_id DESC LIMIT $8",
            rows_of(JobView::TABLE)
        ))
        .bind(filter.status.map(JobStatus::as_str))
        .bind(filter.slide_id)
        .bind(&filter.submitted_by)
        .bind(filter.submitted_after)
        .bind(filter.submitted_before)
        .bind(after.map(|c| c.submitted_at))
        .bind(after.map(|c| c.job_id))
        .bind(limit)
        .bind(&filter.id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let items = unwrap(items);
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

    pub async fn slide(&self, tenant: &TenantId, id: uuid::Uuid) -> Result<Option<SlideView>, sqlx::Error> {
        self.one(tenant, id).await
    }

    /// Newest first; `before` is the `registered_at` and id of the last slide of the previous page.
    pub async fn slides(
        &self,
        tenant: &TenantId,
        before: Option<(DateTime<Utc>, uuid::Uuid)>,
        limit: i64,
    ) -> Result<Vec<SlideView>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows: Rows<SlideView> = sqlx::query_scalar(&format!(
            "{} WHERE ($1::timestamptz IS NULL OR (registered_at, slide_id) < ($1, $2)) \
             ORDER BY registered_at DESC, slide_id DESC LIMIT $3",
            rows_of(SlideView::TABLE)
        ))
        .bind(before.map(|b| b.0))
        .bind(before.map(|b| b.1))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(unwrap(rows))
    }

    /// Jobs changed after `position`, oldest change first.
    pub async fn jobs_since(&self, tenant: &TenantId, position: i64, limit: i64) -> Result<Vec<JobView>, sqlx::Error> {
        self.since(tenant, position, limit).await
    }

    /// Slides changed after `position`, oldest change first.
    pub async fn slides_since(
        &self,
        tenant: &TenantId,
        position: i64,
        limit: i64,
    ) -> Result<Vec<SlideView>, sqlx::Error> {
        self.since(tenant, position, limit).await
    }

    /// The names of the tenant's slides among `ids`, as stored (sealed): what a list of jobs
    /// shows beside each job, read in one query for the whole page.
    pub async fn slide_names(
        &self,
        tenant: &TenantId,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<(uuid::Uuid, SlideName)>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin(tenant).await?;
        let rows: Vec<(uuid::Uuid, Json<SlideName>)> =
            sqlx::query_as("SELECT slide_id, name FROM rm.slides WHERE slide_id = ANY($1)")
                .bind(ids)
                .fetch_all(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|(id, n)| (id, n.0)).collect())
    }

    pub async fn timeline(&self, tenant: &TenantId, job: uuid::Uuid) -> Result<Vec<TimelineEntry>, sqlx::Error> {
        let mut tx = self.begin(tenant).await?;
        let rows: Rows<TimelineEntry> = sqlx::query_scalar(&format!(
            "{} WHERE job_id = $1 ORDER BY sequence",
            rows_of(TimelineEntry::TABLE)
        ))
        .bind(job)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(unwrap(rows))
    }
}
