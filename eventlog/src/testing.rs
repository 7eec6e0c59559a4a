//! Test support: every test gets its own freshly migrated database with a UUID name, on the
//! server named by `MIRA_TEST_DATABASE_URL` (default: the local server as `postgres`). The
//! database is dropped when the handle is.

use std::time::Duration;

use sqlx::PgPool;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn admin_url() -> String {
    std::env::var("MIRA_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

#[derive(Debug)]
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    pub name: String,
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > base.find("://").map_or(0, |j| j + 2) => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl TestDb {
    /// A new, migrated database.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        crate::migrate::run(&db.pool)
            .await
            .expect("migrations apply to a fresh database");
        db
    }

    /// A new database without the schema.
    pub async fn empty() -> Self {
        let admin = admin_url();
        let name = format!("mira_test_{}", uuid::Uuid::new_v4().simple());
        let admin_pool = crate::db::connect(&admin, 1, Duration::from_secs(10))
            .await
            .expect("the test PostgreSQL server is reachable (MIRA_TEST_DATABASE_URL)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin_pool)
            .await
            .expect("CREATE DATABASE");
        admin_pool.close().await;
        let url = with_database(&admin, &name);
        let pool = crate::db::connect(&url, 20, Duration::from_secs(10))
            .await
            .expect("connect to test database");
        Self { pool, url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropping may happen inside a runtime; do the async work on a thread of its own.
        // The pool is not closed from there: its connections belong to the test's runtime,
        // which is blocked in this drop. FORCE ends them on the server instead.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                if let Ok(admin) = crate::db::connect(&admin_url(), 1, Duration::from_secs(5)).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&admin)
                        .await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

/// Waits until every committed event is below the watermark (an appender still open holds it
/// back for a moment); panics after 30 s.
pub async fn settle(pool: &PgPool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !sqlx::query_scalar::<_, bool>("SELECT coalesce(mira_follow_bound() > max(tx_id), true) FROM events")
        .fetch_one(pool)
        .await
        .expect("the watermark query runs")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the watermark did not pass the log's end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(with_database("postgres://u@h:1/postgres", "x"), "postgres://u@h:1/x");
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
