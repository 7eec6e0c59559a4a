//! One role per process (migration 0014, ADR 0012): each process's group role, held by a login
//! of its own, can do what that process does and nothing the others do.

use std::collections::BTreeMap;
use std::time::Duration;

use mira_eventlog::testing::{with_user, TestDb};
use sqlx::PgPool;

const GROUPS: [&str; 5] = [
    "mira_api",
    "mira_relay",
    "mira_projector",
    "mira_handlers",
    "mira_worker",
];

/// A login holding `group` only, and a pool on it.
async fn login(db: &TestDb, group: &str) -> (String, PgPool) {
    let name = format!("t_{group}_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    sqlx::raw_sql(&format!(
        "CREATE ROLE {name} LOGIN PASSWORD '{name}'; GRANT {group} TO {name}; GRANT CONNECT ON DATABASE {} TO {name}",
        db.name
    ))
    .execute(&db.owner)
    .await
    .unwrap();
    let pool = mira_eventlog::db::connect(&with_user(&db.owner_url, &name, &name), 4, Duration::from_secs(10))
        .await
        .unwrap();
    (name, pool)
}

/// An event insert the log accepts from an appender.
const APPEND: &str = "INSERT INTO events (event_id, tenant_id, aggregate_type, aggregate_id, sequence, \
     event_type, event_version, recorded_at, payload, metadata, prev_hash, hash) \
     VALUES (gen_random_uuid(), 'lab', 'Test', gen_random_uuid()::text, 1, 'Tick', '1', now(), '{}', '{}', \
     decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))";

/// What `/metrics` and `mira projections status` read.
const METRICS: &str = "SELECT count(*) FROM projection_positions; SELECT * FROM mira_appender_lag(); \
     SELECT count(*) FROM events WHERE global_position > 0";

async fn sqlstate(pool: &PgPool, sql: &str) -> Option<String> {
    match sqlx::raw_sql(sql).execute(pool).await {
        Ok(_) => None,
        Err(e) => Some(mira_eventlog::db::sqlstate(&e).unwrap_or_else(|| e.to_string())),
    }
}

#[tokio::test]
async fn each_process_role_holds_only_what_its_process_does() {
    let db = TestDb::new().await;
    // The listing: every privilege of every process role on Mira's tables.
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT grantee::text, table_schema || '.' || table_name, string_agg(privilege_type, ',' ORDER BY privilege_type) \
         FROM information_schema.role_table_grants WHERE grantee = ANY($1) \
         GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(&GROUPS[..])
    .fetch_all(&db.owner)
    .await
    .unwrap();
    let mut listing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (role, table, privileges) in rows {
        eprintln!("{role:15} {table:32} {privileges}");
        listing.entry(role).or_default().push(format!("{table} {privileges}"));
    }
    let holds = |role: &str, entry: &str| listing.get(role).is_some_and(|l| l.iter().any(|e| e == entry));
    assert!(holds("mira_api", "public.events INSERT,SELECT"), "{listing:?}");
    assert!(holds("mira_worker", "public.events INSERT,SELECT"), "{listing:?}");
    assert!(holds("mira_projector", "public.events SELECT"), "{listing:?}");
    assert!(holds("mira_relay", "public.events SELECT"), "{listing:?}");
    for role in ["mira_api", "mira_relay", "mira_worker", "mira_handlers"] {
        assert!(
            !listing[role]
                .iter()
                .any(|e| e.starts_with("rm.") && e.contains("INSERT")),
            "{role} writes a read model: {listing:?}"
        );
    }
    for role in ["mira_api", "mira_relay"] {
        assert!(
            !listing[role].iter().any(|e| e.starts_with("public.consumer_streams")),
            "{role} touches consumer_streams: {listing:?}"
        );
    }

    // And through real logins, each holding one role.
    let mut pools = BTreeMap::new();
    let mut names = Vec::new();
    for g in GROUPS {
        let (name, pool) = login(&db, g).await;
        names.push(name);
        pools.insert(g, pool);
    }
    let rm_write = "INSERT INTO rm.usage (tenant_id) VALUES ('lab')";
    let consumer = "SELECT count(*) FROM consumer_streams";
    for (role, sql, refused) in [
        // The worker cannot write read models, nor the handlers' tables.
        ("mira_worker", rm_write, true),
        ("mira_worker", "UPDATE rm.jobs SET status = 'succeeded'", true),
        // It keeps its own slow work in the due-time table, and cannot add a handlers' timer.
        (
            "mira_worker",
            "INSERT INTO due_work (kind, key, due_at) VALUES ('job.lease', 'x', now())",
            true,
        ),
        (
            "mira_worker",
            "INSERT INTO due_work (kind, key, due_at) VALUES ('slow-work:gpu-jobs', 'x', now())",
            false,
        ),
        // The verifier (`mira-worker verify`) is the worker's login too (migration 0015).
        (
            "mira_worker",
            "INSERT INTO due_work (kind, key, due_at) VALUES ('slow-work:verify', 'x', now())",
            false,
        ),
        (
            "mira_worker",
            "INSERT INTO due_work (kind, key, due_at) VALUES ('slow-work:projections', 'x', now())",
            true,
        ),
        ("mira_worker", APPEND, false),
        // The projector cannot append.
        ("mira_projector", APPEND, true),
        ("mira_projector", rm_write, false),
        // The API cannot touch consumer_streams, nor write read models or the relay's cursor.
        ("mira_api", consumer, true),
        ("mira_api", "DELETE FROM consumer_streams", true),
        ("mira_api", rm_write, true),
        ("mira_api", "DELETE FROM relay_cursor", true),
        ("mira_api", APPEND, false),
        // The relay reads the log and writes checkpoints, and appends nothing.
        ("mira_relay", APPEND, true),
        ("mira_relay", consumer, true),
        ("mira_relay", "SELECT count(*) FROM relay_cursor", false),
        // The handlers append and keep their tables, and cannot write read models.
        ("mira_handlers", rm_write, true),
        ("mira_handlers", APPEND, false),
        ("mira_handlers", "SELECT count(*) FROM due_work", false),
        // What /metrics reads, on every login that serves it (`projections status` too).
        ("mira_api", METRICS, false),
        ("mira_relay", METRICS, false),
        ("mira_projector", METRICS, false),
        ("mira_handlers", METRICS, false),
        // The idempotency sweep goes through its function, the API's alone.
        ("mira_api", "SELECT mira_sweep_idempotency(interval '1 day')", false),
        ("mira_handlers", "SELECT mira_sweep_idempotency(interval '1 day')", true),
        ("mira_api", "DELETE FROM api_idempotency", true),
    ] {
        let got = sqlstate(&pools[role], sql).await;
        if refused {
            assert_eq!(got.as_deref(), Some("42501"), "{role}: {sql} must be refused");
        } else {
            assert_eq!(got, None, "{role}: {sql} must be allowed");
        }
    }

    // Nor see or delete one: a worker's DELETE leaves the handlers' timers where they are.
    sqlx::query("INSERT INTO due_work (kind, key, due_at) VALUES ('job.lease', 'timer', now())")
        .execute(&db.owner)
        .await
        .unwrap();
    let deleted = sqlx::query("DELETE FROM due_work")
        .execute(&pools["mira_worker"])
        .await
        .unwrap()
        .rows_affected();
    assert_eq!(
        deleted, 2,
        "the worker deletes its own rows only (its and the verifier's)"
    );
    let timers: i64 = sqlx::query_scalar("SELECT count(*) FROM due_work WHERE kind = 'job.lease'")
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert_eq!(timers, 1);

    // The API's /metrics reads the age of an appender of another login (the worker's): with
    // pg_read_all_stats it sees that session's transaction start, without it the age reads 0.
    let mut open = pools["mira_worker"].begin().await.unwrap();
    sqlx::query(APPEND).execute(&mut *open).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (seconds,): (f64,) = sqlx::query_as("SELECT seconds FROM mira_appender_lag()")
        .fetch_one(&pools["mira_api"])
        .await
        .unwrap();
    assert!(seconds >= 0.2, "the API sees the worker's open appender: {seconds}");
    open.rollback().await.unwrap();

    for p in pools.values() {
        p.close().await;
    }
    for n in names {
        sqlx::raw_sql(&format!("REVOKE ALL ON DATABASE {} FROM {n}; DROP ROLE {n}", db.name))
            .execute(&db.owner)
            .await
            .unwrap();
    }
}
