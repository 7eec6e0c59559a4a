//! The durable due-time table (DESIGN §5.3): delayed work such as retry backoff and lease
//! expiry lives in PostgreSQL, not in SQS (FIFO queues have no per-message delay, and
//! visibility is capped at 12 hours). Takers poll with `FOR UPDATE SKIP LOCKED`, so several
//! can run at once without taking the same item, and an item is deleted in the same
//! transaction as its effect.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueItem {
    pub kind: String,
    pub key: String,
    pub due_at: DateTime<Utc>,
    pub payload: String,
}

/// Schedules `kind`/`key` at `due_at`, replacing an earlier schedule of the same item.
pub async fn schedule(
    conn: &mut PgConnection,
    kind: &str,
    key: &str,
    due_at: DateTime<Utc>,
    payload: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO due_work (kind, key, due_at, payload) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (kind, key) DO UPDATE SET due_at = EXCLUDED.due_at, payload = EXCLUDED.payload",
    )
    .bind(kind)
    .bind(key)
    .bind(due_at)
    .bind(payload)
    .execute(conn)
    .await?;
    Ok(())
}

/// Removes a schedule (for example when a lease was extended or the job finished).
pub async fn cancel(conn: &mut PgConnection, kind: &str, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM due_work WHERE kind = $1 AND key = $2")
        .bind(kind)
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

/// What [`take_due`]'s effect returns: `None` when the item is done, or the time it is due
/// again. It may use the transaction it is given.
pub type Effect<'c> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<DateTime<Utc>>, sqlx::Error>> + Send + 'c>>;

/// Takes up to `limit` items of `kind` due at `now`, and runs `f` on each inside one
/// transaction that also deletes them, or moves them to the time `f` returns (work that is
/// not ready yet). If `f` fails, nothing changes and the items stay due. Returns the items
/// taken.
pub async fn take_due<F>(
    pool: &PgPool,
    kind: &str,
    now: DateTime<Utc>,
    limit: i64,
    mut f: F,
) -> Result<Vec<DueItem>, sqlx::Error>
where
    F: for<'c> FnMut(&'c mut PgConnection, DueItem) -> Effect<'c>,
{
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "SELECT kind, key, due_at, payload FROM due_work WHERE kind = $1 AND due_at <= $2 \
         ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED",
    )
    .bind(kind)
    .bind(now)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Vec::with_capacity(rows.len());
    for r in rows {
        let item = DueItem {
            kind: r.try_get("kind")?,
            key: r.try_get("key")?,
            due_at: r.try_get("due_at")?,
            payload: r.try_get("payload")?,
        };
        match f(&mut tx, item.clone()).await? {
            None => {
                sqlx::query("DELETE FROM due_work WHERE kind = $1 AND key = $2 AND due_at = $3")
                    .bind(&item.kind)
                    .bind(&item.key)
                    .bind(item.due_at)
                    .execute(&mut *tx)
                    .await?;
            }
            Some(later) => {
                sqlx::query("UPDATE due_work SET due_at = $4 WHERE kind = $1 AND key = $2 AND due_at = $3")
                    .bind(&item.kind)
                    .bind(&item.key)
                    .bind(item.due_at)
                    .bind(later)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        done.push(item);
    }
    tx.commit().await?;
    Ok(done)
}
