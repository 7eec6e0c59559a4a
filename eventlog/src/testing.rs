//! Test support: every test gets its own freshly migrated database with a UUID name, on the
//! server named by `MIRA_TEST_DATABASE_URL` (default: the local server as `postgres`). The
//! database is dropped when the handle is.
//!
//! As in production, the tests run as a login role that owns nothing ([`APP_ROLE`], granted the
//! runtime roles the way `mira migrate` grants them): `pool` and `url` connect as it. `owner`
//! and `owner_url` are the migrating superuser, for what only an attacker or an operator does.

use std::time::Duration;

use sqlx::PgPool;

pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn admin_url() -> String {
    std::env::var("MIRA_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// The tests' application login role (cluster-wide, created on first use).
pub const APP_ROLE: &str = "mira_test_app";

#[derive(Debug)]
pub struct TestDb {
    /// The application's role.
    pub pool: PgPool,
    pub url: String,
    /// The migrating owner (a superuser).
    pub owner: PgPool,
    pub owner_url: String,
    pub name: String,
}

/// `url` with another user and password.
pub fn with_user(url: &str, user: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let host = match rest.find('/') {
        Some(slash) => {
            let (authority, path) = rest.split_at(slash);
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{host}{path}")
        }
        None => rest.rsplit_once('@').map_or(rest, |(_, h)| h).to_owned(),
    };
    format!("{scheme}://{user}:{password}@{host}")
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
        let mut db = Self::empty().await;
        crate::migrate::run(&db.owner)
            .await
            .expect("migrations apply to a fresh database");
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_ROLE}'; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ))
        .execute(&db.owner)
        .await
        .expect("the application login role exists");
        // Roles and memberships are cluster-wide: tests running at once race to grant them.
        for attempt in 0.. {
            let granted: bool =
                sqlx::query_scalar("SELECT bool_and(pg_has_role($1, r, 'MEMBER')) FROM unnest($2::text[]) r")
                    .bind(APP_ROLE)
                    .bind(crate::migrate::RUNTIME_ROLES)
                    .fetch_one(&db.owner)
                    .await
                    .expect("membership query");
            if granted {
                break;
            }
            match crate::migrate::grant_runtime(&db.owner, APP_ROLE).await {
                Ok(()) => break,
                Err(e) if attempt < 20 => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot grant the runtime roles: {e}"),
            }
        }
        // Each process's default login (`mira_svc_<process>`), as `mira migrate` makes them on
        // a cluster: a test whose command migrates as the application role (which may not
        // create roles) must not depend on an earlier test's migration having made them.
        for p in mira_config::DbProcess::ALL {
            for attempt in 0.. {
                match crate::migrate::ensure_login(&db.owner, &p.default_login(), p.group_role(), None).await {
                    Ok(()) => break,
                    Err(e) if attempt < 20 => {
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => panic!("cannot make the login {}: {e}", p.default_login()),
                }
            }
        }
        db.url = with_user(&db.owner_url, APP_ROLE, APP_ROLE);
        db.pool = crate::db::connect(&db.url, 20, Duration::from_secs(10))
            .await
            .expect("connect to the test database as the application role");
        db
    }

    /// A new database without the schema; `pool` is the owner's.
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
        Self {
            owner: pool.clone(),
            owner_url: url.clone(),
            pool,
            url,
            name,
        }
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

/// Runs `sql` on `owner` (a superuser's pool) with the log's append-only triggers switched off,
/// as an attacker with the database's keys would: for the tamper tests.
pub async fn tamper(owner: &PgPool, sql: &str) {
    let mut tx = owner.begin().await.expect("a transaction");
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await
        .expect("replica mode (a superuser)");
    sqlx::raw_sql(sql)
        .execute(&mut *tx)
        .await
        .expect("the tampering statement");
    tx.commit().await.expect("commit");
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_the_user_of_a_url() {
        use super::with_user;
        assert_eq!(
            with_user("postgres://postgres@h:1/db", "a", "b"),
            "postgres://a:b@h:1/db"
        );
        assert_eq!(
            with_user("postgres://p:q@h:1/db?x=1", "a", "b"),
            "postgres://a:b@h:1/db?x=1"
        );
        assert_eq!(with_user("postgres://h:1/db", "a", "b"), "postgres://a:b@h:1/db");
    }

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
