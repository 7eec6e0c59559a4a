//! The event log against a real PostgreSQL: ordering, concurrency, append-only, tampering.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, CqrsFramework, EventStore};
use mira_aggregates::{Job, JobCommand, JobError};
use mira_eventlog::checkpoint::{self, AuditKey, CheckpointError, CheckpointInfo, CrashAt};
use mira_eventlog::testing::{settle, TestDb};
use mira_eventlog::witness::DirWitness;
use mira_eventlog::{verify, Cursor, EventLog, NewEvent, PgEventRepository};
use mira_events::canonical::ZERO_HASH;
use mira_events::{Actor, CommandContext, SlideId, TenantId};
use sqlx::{PgPool, Row};

type Cqrs = CqrsFramework<Job, PersistedEventStore<PgEventRepository, Job>>;

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

fn job_store(log: &EventLog, t: &str) -> PersistedEventStore<PgEventRepository, Job> {
    PersistedEventStore::new_event_store(PgEventRepository::new(log.clone(), tenant(t)))
        .with_upcasters(mira_events::upcast::upcasters())
}

fn cqrs(log: &EventLog, t: &str) -> Cqrs {
    CqrsFramework::new(job_store(log, t), vec![], ())
}

fn ctx(t: &str) -> std::collections::HashMap<String, String> {
    CommandContext::new(tenant(t), Actor::user("u-1")).to_cqrs()
}

fn submit() -> JobCommand {
    JobCommand::Submit {
        slide_id: SlideId::new(),
        spec: mira_events::JobSpec::Preprocess(Default::default()),
        max_attempts: 3,
        priority: mira_aggregates::Priority::Routine,
    }
}

/// Runs a job through submit, queue, start, progress and success: five events.
async fn run_job(c: &Cqrs, t: &str, id: &str) {
    let now = Utc::now();
    for cmd in [
        submit(),
        JobCommand::Queue { now },
        JobCommand::Start {
            attempt: 1,
            worker_id: "w".into(),
            lease_until: now + chrono::Duration::minutes(5),
            now,
        },
        JobCommand::Progress {
            attempt: 1,
            done: 1,
            total: 2,
        },
        JobCommand::Succeed {
            attempt: 1,
            manifest_key: format!("results/{id}/1/manifest.json"),
            manifest_sha256: "b".repeat(64),
            usage: mira_events::Usage {
                device: "cpu".into(),
                device_seconds: 0.5,
                bytes_written: 1,
            },
        },
    ] {
        c.execute_with_metadata(id, cmd, ctx(t)).await.unwrap();
    }
}

/// A signing key and a witness directory of the test's own.
struct Audit {
    key: AuditKey,
    witness: DirWitness,
    dir: std::path::PathBuf,
}

impl Audit {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("mira-audit-{}", uuid::Uuid::new_v4()));
        let (key, created) = AuditKey::init(&dir.join("audit.key")).unwrap();
        assert!(created);
        let witness = DirWitness::create_dir(&dir.join("witness")).unwrap();
        Self { key, witness, dir }
    }

    async fn checkpoint(&self, pool: &PgPool) -> CheckpointInfo {
        checkpoint::write(pool, &self.key, &self.witness).await.unwrap()
    }

    async fn verify(&self, pool: &PgPool) -> Result<verify::VerifyReport, verify::VerifyError> {
        verify::verify(pool, &self.key.verifying_key(), &self.witness).await
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn positions_of(pool: &PgPool, aggregate_id: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT global_position FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(aggregate_id)
        .fetch_all(pool)
        .await
        .unwrap()
}

use mira_eventlog::testing::tamper;

async fn verify_err(pool: &PgPool, audit: &Audit) -> verify::Violation {
    match audit.verify(pool).await {
        Err(verify::VerifyError::Violation(v)) => v,
        other => panic!("verify should fail, got {other:?}"),
    }
}

async fn event_id_at(pool: &PgPool, position: i64) -> uuid::Uuid {
    sqlx::query_scalar("SELECT event_id FROM events WHERE global_position = $1")
        .bind(position)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = TestDb::new().await;
    assert!(mira_eventlog::migrate::run(&db.owner).await.unwrap().is_empty());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM mira_schema_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n as usize, mira_eventlog::migrate::MIGRATIONS.len());
}

#[tokio::test]
async fn commands_append_chained_events() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    let c = cqrs(&log, "lab");
    let id = uuid::Uuid::now_v7().to_string();
    run_job(&c, "lab", &id).await;
    let events = log.read_stream(None, "Job", &id, 0).await.unwrap();
    assert_eq!(events.len(), 5);
    assert_eq!(events[0].prev_hash, ZERO_HASH);
    for w in events.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
        assert_eq!(w[1].sequence, w[0].sequence + 1);
    }
    for e in &events {
        assert_eq!(e.recompute_hash(), e.hash);
        assert_eq!(e.tenant_id, "lab");
        assert_eq!(e.event_id.get_version_num(), 7);
        let md: serde_json::Value = serde_json::from_str(&e.metadata).unwrap();
        assert_eq!(md["actor"]["kind"], "user");
    }
    // The aggregate loads back from the log.
    let ctx = job_store(&log, "lab").load_aggregate(&id).await.unwrap();
    let job = cqrs_es::AggregateContext::aggregate(&mut { ctx }).clone();
    assert_eq!(job.status, mira_aggregates::JobStatus::Succeeded);
}

#[tokio::test]
async fn another_tenants_job_is_invisible() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    let id = uuid::Uuid::now_v7().to_string();
    cqrs(&log, "lab-a")
        .execute_with_metadata(&id, submit(), ctx("lab-a"))
        .await
        .unwrap();
    let other = cqrs(&log, "lab-b");
    let err = other
        .execute_with_metadata(&id, JobCommand::Cancel { reason: None }, ctx("lab-b"))
        .await
        .unwrap_err();
    assert!(matches!(err, AggregateError::UserError(JobError::NotFound)), "{err:?}");
    // Creating over it is a conflict, and writes nothing.
    let err = other
        .execute_with_metadata(&id, submit(), ctx("lab-b"))
        .await
        .unwrap_err();
    assert!(matches!(err, AggregateError::AggregateConflict), "{err:?}");
    // Metadata naming another tenant than the repository's is refused.
    let err = cqrs(&log, "lab-a")
        .execute_with_metadata(&id, JobCommand::Queue { now: Utc::now() }, ctx("lab-b"))
        .await;
    assert!(err.is_err());
    assert_eq!(log.read_stream(None, "Job", &id, 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn racing_commands_one_wins_the_other_conflicts() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    let id = uuid::Uuid::now_v7().to_string();
    let c = cqrs(&log, "lab");
    c.execute_with_metadata(&id, submit(), ctx("lab")).await.unwrap();
    c.execute_with_metadata(&id, JobCommand::Queue { now: Utc::now() }, ctx("lab"))
        .await
        .unwrap();

    // Two workers load the same state, both decide to start attempt 1, both commit.
    let store = job_store(&log, "lab");
    let now = Utc::now();
    let mut a = store.load_aggregate(&id).await.unwrap();
    let mut b = store.load_aggregate(&id).await.unwrap();
    let start = move |w: &str| JobCommand::Start {
        attempt: 1,
        worker_id: w.into(),
        lease_until: now + chrono::Duration::minutes(1),
        now,
    };
    let ea = cqrs_es::AggregateContext::aggregate(&mut a)
        .decide(&start("w-a"))
        .unwrap();
    let eb = cqrs_es::AggregateContext::aggregate(&mut b)
        .decide(&start("w-b"))
        .unwrap();
    store.commit(ea, a, ctx("lab")).await.unwrap();
    let err = store.commit(eb, b, ctx("lab")).await.unwrap_err();
    assert!(matches!(err, AggregateError::AggregateConflict), "{err:?}");
    let events = log.read_stream(None, "Job", &id, 0).await.unwrap();
    assert_eq!(events.len(), 3, "nothing half-written");
    assert!(events[2].payload.contains("w-a") && !events.iter().any(|e| e.payload.contains("w-b")));

    // The same race through the framework, many times at once: per job exactly one start.
    let c = Arc::new(c);
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = uuid::Uuid::now_v7().to_string();
        c.execute_with_metadata(&id, submit(), ctx("lab")).await.unwrap();
        c.execute_with_metadata(&id, JobCommand::Queue { now: Utc::now() }, ctx("lab"))
            .await
            .unwrap();
        ids.push(id);
    }
    let mut tasks = Vec::new();
    for id in &ids {
        for w in ["w-a", "w-b"] {
            let (c, id) = (c.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                c.execute_with_metadata(&id, start(w), ctx("lab")).await
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => ok += 1,
            Err(AggregateError::AggregateConflict) => {}
            Err(AggregateError::UserError(JobError::InvalidTransition { .. })) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(ok, ids.len());
    for id in &ids {
        let started = log
            .read_stream(None, "Job", id, 0)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.event_type == "JobStarted")
            .count();
        assert_eq!(started, 1);
    }
}

#[tokio::test]
async fn follower_sees_every_event_exactly_once_despite_late_commits() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    let writers = 8;
    let per_writer = 40;
    let aggregates: Vec<String> = (0..12).map(|i| format!("agg-{i}")).collect();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let late = Arc::new(std::sync::atomic::AtomicUsize::new(0));

    let mut handles = Vec::new();
    for w in 0..writers {
        let (pool, aggs, done, late) = (db.pool.clone(), aggregates.clone(), done.clone(), late.clone());
        handles.push(tokio::spawn(async move {
            let mut appended = 0;
            let mut n = w as u64;
            while appended < per_writer {
                n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let agg = &aggs[(n >> 33) as usize % aggs.len()];
                let mut tx = pool.begin().await.unwrap();
                let next: i64 = sqlx::query_scalar("SELECT coalesce(max(sequence), 0) + 1 FROM events WHERE aggregate_type = 'Test' AND aggregate_id = $1")
                    .bind(agg)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                let ev = NewEvent {
                    aggregate_type: "Test".into(),
                    aggregate_id: agg.clone(),
                    sequence: next as u64,
                    event_type: "Tick".into(),
                    event_version: "1".into(),
                    payload: format!("{{\"writer\":{w},\"n\":{appended}}}"),
                    metadata: "{}".into(),
                };
                match EventLog::append_in_tx(&mut tx, &tenant("lab"), &[ev]).await {
                    Ok(stored) => {
                        // Hold some transactions open after their insert, so that later
                        // positions commit first; count the times that really happened.
                        if (n >> 40) % 3 == 0 {
                            tokio::time::sleep(Duration::from_millis((n >> 20) % 25)).await;
                            let overtaken: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE global_position > $1)")
                                .bind(stored[0].global_position)
                                .fetch_one(&pool)
                                .await
                                .unwrap();
                            if overtaken {
                                late.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                        }
                        tx.commit().await.unwrap();
                        appended += 1;
                    }
                    Err(mira_eventlog::AppendError::Conflict { .. }) => tx.rollback().await.unwrap(),
                    Err(e) => panic!("{e}"),
                }
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }

    // Follow until every writer has finished and the follower has caught up. The watermark is
    // cluster-wide, so other tests' open transactions may hold it back for a while: poll
    // with a deadline rather than stopping at the first empty read.
    let total = writers * per_writer;
    let mut seen = Vec::new();
    let mut cursor = Cursor::START;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < total || done.load(std::sync::atomic::Ordering::SeqCst) < writers {
        assert!(
            std::time::Instant::now() < deadline,
            "follower saw {} of {total} events",
            seen.len()
        );
        let batch = log.read_after(cursor, 7).await.unwrap();
        for e in &batch {
            assert!(e.cursor() > cursor, "the follower went backwards");
            cursor = e.cursor();
            seen.push(e.event_id);
        }
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    // Nothing more appears behind the cursor, however long we wait for the watermark.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(log.read_after(cursor, 7).await.unwrap().is_empty());
    for h in handles {
        h.await.unwrap();
    }
    let all: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT event_id FROM events")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(all.len(), writers * per_writer);
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an event was delivered twice");
    assert_eq!(unique, all.iter().collect::<HashSet<_>>(), "an event was skipped");
    // Late commits really happened: a later position was committed while an earlier one
    // was still open.
    assert!(
        late.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no late commit was exercised"
    );
}

#[tokio::test]
async fn the_log_refuses_update_delete_and_truncate_even_for_its_owner() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    run_job(&cqrs(&log, "lab"), "lab", "j-1").await;
    let audit = Audit::new();
    settle(&db.pool).await;
    audit.checkpoint(&db.pool).await;
    for sql in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
        "UPDATE checkpoints SET key_id = 'x'",
        "DELETE FROM checkpoints",
        "TRUNCATE checkpoints",
        "UPDATE log_epoch SET epoch = gen_random_uuid()",
        "TRUNCATE log_epoch",
    ] {
        let err = sqlx::query(sql).execute(&db.owner).await.unwrap_err();
        assert_eq!(
            mira_eventlog::db::sqlstate(&err).as_deref(),
            Some("42501"),
            "{sql}: {err}"
        );
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert!(audit.verify(&db.pool).await.is_ok());
}

/// The processes' login role (DATABASE_URL) reads and appends, and can do nothing else to the
/// log: not change or remove rows, and not switch off or drop the guards.
#[tokio::test]
async fn the_application_role_cannot_touch_the_log_or_its_guards() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    run_job(&cqrs(&log, "lab"), "lab", "j-1").await;
    let audit = Audit::new();
    settle(&db.pool).await;
    audit.checkpoint(&db.pool).await;
    assert!(!mira_eventlog::migrate::can_disable_guards(&db.pool).await.unwrap());
    assert!(mira_eventlog::migrate::can_disable_guards(&db.owner).await.unwrap());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 5);
    for table in ["events", "checkpoints", "log_epoch"] {
        let trigger: String = sqlx::query_scalar(
            "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal LIMIT 1",
        )
        .bind(table)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        for sql in [
            format!("ALTER TABLE {table} DISABLE TRIGGER ALL"),
            format!("ALTER TABLE {table} DISABLE TRIGGER {trigger}"),
            format!("DROP TRIGGER {trigger} ON {table}"),
            format!("UPDATE {table} SET created_at = now()"),
            format!("DELETE FROM {table}"),
            format!("TRUNCATE {table}"),
            format!("ALTER TABLE {table} OWNER TO {}", mira_eventlog::testing::APP_ROLE),
            "SET session_replication_role = replica".to_owned(),
        ] {
            let sql = sql.replace("UPDATE events SET created_at", "UPDATE events SET recorded_at");
            let err = sqlx::query(&sql).execute(&db.pool).await.unwrap_err();
            assert_eq!(
                mira_eventlog::db::sqlstate(&err).as_deref(),
                Some("42501"),
                "{sql} must be refused: {err}"
            );
        }
    }
    // Nothing changed: same rows, and the log still verifies.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert_eq!(n, 5);
    assert!(audit.verify(&db.pool).await.is_ok());
}

/// Three jobs of five events each, and a checkpoint covering them.
async fn checkpointed_log() -> (TestDb, EventLog, Audit) {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    let c = cqrs(&log, "lab");
    for id in ["j-1", "j-2", "j-3"] {
        run_job(&c, "lab", id).await;
    }
    let audit = Audit::new();
    settle(&db.pool).await;
    let info = audit.checkpoint(&db.pool).await;
    assert_eq!((info.seq, info.event_count, info.new_events), (1, 15, 15));
    let report = audit.verify(&db.pool).await.unwrap();
    assert_eq!((report.events, report.checkpoints, report.uncheckpointed), (15, 1, 0));
    assert_eq!(report.witnessed_checkpoint, Some(1));
    (db, log, audit)
}

#[tokio::test]
async fn tamper_a_changed_payload_byte_is_named() {
    let (db, _log, audit) = checkpointed_log().await;
    let pos = positions_of(&db.pool, "j-2").await[2];
    tamper(
        &db.owner,
        &format!("UPDATE events SET payload = overlay(payload placing 'X' from 3 for 1) WHERE global_position = {pos}"),
    )
    .await;
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!(
        (v.position, v.event_id),
        (pos, Some(event_id_at(&db.pool, pos).await)),
        "{v}"
    );
    assert!(v.reason.contains("altered"), "{v}");
}

#[tokio::test]
async fn tamper_a_deleted_event_in_a_stream_is_named() {
    let (db, _log, audit) = checkpointed_log().await;
    let pos = positions_of(&db.pool, "j-2").await[2];
    let id = event_id_at(&db.pool, pos).await;
    tamper(&db.owner, &format!("DELETE FROM events WHERE global_position = {pos}")).await;
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!((v.position, v.event_id), (pos, Some(id)), "{v}");
    assert!(v.reason.contains("missing"), "{v}");
}

#[tokio::test]
async fn tamper_a_deleted_event_without_a_checkpoint_breaks_the_chain() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    run_job(&cqrs(&log, "lab"), "lab", "j-1").await;
    let audit = Audit::new();
    let pos = positions_of(&db.pool, "j-1").await;
    settle(&db.pool).await;
    tamper(
        &db.owner,
        &format!("DELETE FROM events WHERE global_position = {}", pos[1]),
    )
    .await;
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!(v.position, pos[2], "{v}");
    assert!(v.reason.contains("jumps from sequence 1 to 3"), "{v}");
}

/// Rewrites j-2's progress event (its fourth), then recomputes its hash and every later hash
/// of j-2, as a superuser would. Returns the rewritten event's position and id.
async fn rewrite_and_rehash_j2(db: &TestDb, log: &EventLog) -> (i64, uuid::Uuid) {
    let k = 3;
    let mut events = log.read_stream(None, "Job", "j-2", 0).await.unwrap();
    events[k].payload = events[k].payload.replace("\"done\":1", "\"done\":2");
    assert!(events[k].payload.contains("\"done\":2"));
    let mut sql = String::new();
    for i in k..events.len() {
        events[i].prev_hash = events[i - 1].hash;
        events[i].hash = events[i].recompute_hash();
        sql.push_str(&format!(
            "UPDATE events SET payload = '{}', prev_hash = '\\x{}', hash = '\\x{}' WHERE global_position = {};",
            events[i].payload,
            hex::encode(events[i].prev_hash),
            hex::encode(events[i].hash),
            events[i].global_position
        ));
    }
    tamper(&db.owner, &sql).await;
    // The chains alone now look intact.
    let rows = log.read_stream(None, "Job", "j-2", 0).await.unwrap();
    assert!(rows.iter().all(|e| e.recompute_hash() == e.hash));
    (events[k].global_position, events[k].event_id)
}

#[tokio::test]
async fn tamper_a_rehashed_chain_is_caught_by_the_signed_checkpoint() {
    let (db, log, audit) = checkpointed_log().await;
    let (pos, id) = rewrite_and_rehash_j2(&db, &log).await;
    // The signed checkpoint names the altered event.
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!((v.position, v.event_id), (pos, Some(id)), "{v}");
    assert!(v.reason.contains("checkpoint 1"), "{v}");
}

#[tokio::test]
async fn tamper_deleting_every_checkpoint_and_rehashing_is_caught_by_the_witness() {
    let (db, log, audit) = checkpointed_log().await;
    rewrite_and_rehash_j2(&db, &log).await;
    tamper(&db.owner, "DELETE FROM checkpoints").await;
    let v = verify_err(&db.pool, &audit).await;
    assert!(
        v.reason.contains("checkpoint 1 of epoch") && v.reason.contains("missing from the database"),
        "{v}"
    );
}

#[tokio::test]
async fn tamper_deleting_the_newest_checkpoint_and_the_events_after_it_is_caught_by_the_witness() {
    let (db, log, audit) = checkpointed_log().await;
    let first_end: i64 = sqlx::query_scalar("SELECT upto_position FROM checkpoints WHERE seq = 1")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    assert_eq!(audit.checkpoint(&db.pool).await.seq, 2);
    tamper(
        &db.owner,
        &format!("DELETE FROM checkpoints WHERE seq = 2; DELETE FROM events WHERE global_position > {first_end}"),
    )
    .await;
    let v = verify_err(&db.pool, &audit).await;
    assert!(
        v.reason.contains("checkpoint 2 of epoch") && v.reason.contains("missing from the database"),
        "{v}"
    );
}

#[tokio::test]
async fn a_witness_without_the_database_checkpoints_is_refused() {
    let (db, _log, audit) = checkpointed_log().await;
    let elsewhere = Audit::new();
    let err = verify::verify(&db.pool, &audit.key.verifying_key(), &elsewhere.witness)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("holds no checkpoint but the database has 1"),
        "{err}"
    );
}

#[tokio::test]
async fn tamper_an_event_moved_below_a_checkpoint_is_not_covered() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    let pos = positions_of(&db.pool, "j-4").await[0];
    // Its hash does not cover tx_id: moved first in follow order, every chain still holds.
    tamper(
        &db.owner,
        &format!("UPDATE events SET tx_id = '3' WHERE global_position = {pos}"),
    )
    .await;
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!(
        (v.position, v.event_id),
        (pos, Some(event_id_at(&db.pool, pos).await)),
        "{v}"
    );
    assert!(v.reason.contains("not covered by checkpoint 1"), "{v}");
}

#[tokio::test]
async fn a_long_log_is_covered_by_checkpoints_of_bounded_span() {
    let (db, log, audit) = checkpointed_log().await;
    for id in ["j-4", "j-5"] {
        run_job(&cqrs(&log, "lab"), "lab", id).await;
    }
    settle(&db.pool).await;
    let info = checkpoint::write_spans(&db.pool, &audit.key, &audit.witness, 4, CrashAt::Never)
        .await
        .unwrap();
    // 10 new events in spans of 4, 4 and 2.
    assert_eq!(
        (info.written, info.new_events, info.seq, info.event_count),
        (3, 10, 4, 25)
    );
    let spans: Vec<i64> = sqlx::query_scalar("SELECT length(leaves)::bigint / 56 FROM checkpoints ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(spans, [15, 4, 4, 2]);
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!(
        (r.events, r.checkpoints, r.uncheckpointed, r.witnessed_checkpoint),
        (25, 4, 0, Some(4))
    );
}

#[tokio::test]
async fn tamper_a_deleted_tail_after_a_checkpoint_is_named() {
    let (db, _log, audit) = checkpointed_log().await;
    let tail = positions_of(&db.pool, "j-3").await;
    let first_gone = tail[3];
    let id = event_id_at(&db.pool, first_gone).await;
    tamper(
        &db.owner,
        &format!("DELETE FROM events WHERE global_position >= {first_gone}"),
    )
    .await;
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!((v.position, v.event_id), (first_gone, Some(id)), "{v}");
    assert!(v.reason.contains("missing"), "{v}");
}

#[tokio::test]
async fn a_checkpoint_signed_by_another_key_is_refused() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    let forger = Audit::new();
    settle(&db.pool).await;
    // The forger cannot write to the real witness (its epoch record is not the forger's), so
    // it writes to a witness of its own and inserts the row.
    let err = checkpoint::write(&db.pool, &forger.key, &audit.witness)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    checkpoint::write(&db.pool, &forger.key, &forger.witness).await.unwrap();
    let v = verify_err(&db.pool, &audit).await;
    assert!(
        v.reason.contains("checkpoint 2") && v.reason.contains("signature"),
        "{v}"
    );
}

#[tokio::test]
async fn checkpoints_chain_and_count_incrementally() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!((r.events, r.uncheckpointed), (20, 5));
    let info = audit.checkpoint(&db.pool).await;
    assert_eq!((info.seq, info.event_count, info.new_events), (2, 20, 5));
    let empty = audit.checkpoint(&db.pool).await;
    assert_eq!((empty.seq, empty.new_events), (3, 0));
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!((r.events, r.checkpoints, r.uncheckpointed), (20, 3, 0));
    let rows = sqlx::query("SELECT count(*) AS n FROM checkpoints")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows.get::<i64, _>("n"), 3);
}

#[tokio::test]
async fn following_walks_the_index_without_sorting_the_log() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    // The table is empty here, so make the planner plan as it would for a large log.
    sqlx::raw_sql("SET enable_seqscan = off; SET enable_bitmapscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "PREPARE follow(text, bigint, text, bigint) AS {}",
        mira_eventlog::store::follow_below_sql()
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE follow('100', 0, '200', 500)")
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("events_follow_idx"), "{plan}");
    assert!(
        !plan.contains("Sort"),
        "the follow query sorts instead of walking the index:\n{plan}"
    );
}

fn tick(aggregate: &str, sequence: u64) -> NewEvent {
    NewEvent {
        aggregate_type: "Test".into(),
        aggregate_id: aggregate.into(),
        sequence,
        event_type: "Tick".into(),
        event_version: "1".into(),
        payload: "{}".into(),
        metadata: "{}".into(),
    }
}

/// A transaction that holds an id and is not an appender: a report, an idle `psql` session.
async fn hold_an_id(pool: &PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

async fn tx_id(conn: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_unregistered_lower_id_is_passed_over_here_and_in_another_database() {
    let db = TestDb::new().await;
    let other = TestDb::empty().await;
    let log = EventLog::new(db.pool.clone());
    let mut here = hold_an_id(&db.pool).await;
    let mut there = hold_an_id(&other.pool).await;
    let (low_here, low_there) = (tx_id(&mut here).await, tx_id(&mut there).await);
    log.append(&tenant("lab"), &[tick("a", 1)]).await.unwrap();
    let appended = log.append(&tenant("lab"), &[tick("a", 2)]).await.unwrap();
    assert!(appended[0].tx_id > low_here.max(low_there));
    // Both long transactions are still open, with lower ids than the appenders: the follower
    // reads past them at once.
    let seen = log.read_after(Cursor::START, 10).await.unwrap();
    assert_eq!(seen.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
    assert!(log.watermark().await.unwrap() > appended[0].tx_id);
    let lag = mira_eventlog::store::watermark_lag(&db.pool).await.unwrap();
    assert_eq!(lag.events, 0, "{lag:?}");
    here.rollback().await.unwrap();
    there.rollback().await.unwrap();
}

#[tokio::test]
async fn an_open_appender_holds_the_bound_and_is_not_skipped_when_it_commits_mid_read() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    log.append(&tenant("lab"), &[tick("a", 1)]).await.unwrap();
    // An appender registers, appends, and stays open.
    let mut slow = db.pool.begin().await.unwrap();
    let held = EventLog::append_in_tx(&mut slow, &tenant("lab"), &[tick("b", 1)])
        .await
        .unwrap();
    // A later appender commits first.
    let later = log.append(&tenant("lab"), &[tick("c", 1)]).await.unwrap();
    assert!(later[0].tx_id > held[0].tx_id);

    // The follower takes its bound while the slow appender is open...
    let bound = log.watermark().await.unwrap();
    assert!(
        bound <= held[0].tx_id,
        "bound {bound} passes the open appender {}",
        held[0].tx_id
    );
    let lag = mira_eventlog::store::watermark_lag(&db.pool).await.unwrap();
    assert_eq!(
        lag.events, 1,
        "the committed later event waits behind the appender: {lag:?}"
    );
    assert!(lag.seconds > 0.0, "{lag:?}");
    // ...the appender commits between the bound and the read...
    slow.commit().await.unwrap();
    // ...and the read below that bound stops before it, so the cursor cannot pass it.
    let first = mira_eventlog::store::read_below(&db.pool, Cursor::START, bound, 10)
        .await
        .unwrap();
    assert_eq!(first.iter().map(|e| e.aggregate_id.as_str()).collect::<Vec<_>>(), ["a"]);
    let rest = log.read_after(first[0].cursor(), 10).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| e.aggregate_id.as_str()).collect::<Vec<_>>(),
        ["b", "c"],
        "the late appender is read in follow order, once"
    );
}

/// A raw insert of one `Test` event with the given extra columns and values (`recorded_at`
/// is among them when `time` is not `now()`).
fn raw_insert(extra_columns: &str, extra_values: &str, time: &str) -> String {
    format!(
        "INSERT INTO public.events ({extra_columns}event_id, tenant_id, aggregate_type, aggregate_id, sequence, \
         event_type, event_version, recorded_at, payload, metadata, prev_hash, hash) \
         VALUES ({extra_values}gen_random_uuid(), 'lab', 'Test', 'raw', 1, 'Tick', '1', {time}, '{{}}', '{{}}', \
         decode(repeat('00', 32), 'hex'), decode(repeat('00', 32), 'hex'))"
    )
}

async fn count_events(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_log_assigns_order_and_time_and_refuses_chosen_values() {
    let db = TestDb::new().await;
    // As the application's login role: a chosen transaction id, a chosen position (with and
    // without OVERRIDING SYSTEM VALUE), a time in the past or the future are refused.
    for (sql, state) in [
        (raw_insert("tx_id, ", "'3', ", "now()"), "42501"),
        (raw_insert("global_position, ", "1, ", "now()"), "42501"),
        (
            raw_insert("global_position, ", "1, ", "now()").replace(") VALUES", ") OVERRIDING SYSTEM VALUE VALUES"),
            "42501",
        ),
        (raw_insert("", "", "now() - interval '1 hour'"), "23514"),
        (raw_insert("", "", "clock_timestamp() + interval '1 second'"), "23514"),
    ] {
        let err = sqlx::query(&sql).execute(&db.pool).await.unwrap_err();
        assert_eq!(
            mira_eventlog::db::sqlstate(&err).as_deref(),
            Some(state),
            "{sql}: {err}"
        );
    }
    assert_eq!(count_events(&db.pool).await, 0);
    // The sequence is the log's alone: the role can neither take nor set a position.
    for sql in [
        "SELECT nextval('events_global_position_seq')",
        "SELECT setval('events_global_position_seq', 1)",
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        assert_eq!(
            mira_eventlog::db::sqlstate(&err).as_deref(),
            Some("42501"),
            "{sql}: {err}"
        );
    }
    // An honest raw insert, with no registration call: the database registers it, and assigns
    // the transaction's id and the next position.
    let mut tx = db.pool.begin().await.unwrap();
    let (tx_id, position, own): (i64, i64, i64) = sqlx::query_as(&format!(
        "{} RETURNING tx_id::text::bigint, global_position, pg_current_xact_id()::text::bigint",
        raw_insert("", "", "now()")
    ))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(tx_id, own);
    assert!(position >= 1);
    let holds_k: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory' \
         AND classid = 1835627105 AND objid = 1819240225 AND granted)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert!(holds_k, "the first insert takes the appenders' lock");
    tx.commit().await.unwrap();
    assert_eq!(count_events(&db.pool).await, 1);
    // The release before the database assigned the time registers by calling
    // mira_register_appender() and hashes its own clock's time: refused on a new log...
    let legacy = |time: &str| {
        format!(
            "SELECT mira_register_appender(); {}",
            raw_insert("", "", time).replace("'raw', 1,", "gen_random_uuid()::text, 1,")
        )
    };
    let err = sqlx::raw_sql(&legacy("clock_timestamp()"))
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(mira_eventlog::db::sqlstate(&err).as_deref(), Some("23514"), "{err}");
    // ...and admitted within the leeway on a log that had events before (migration 0013),
    // while a time outside it still is not.
    sqlx::query("UPDATE log_rules SET recorded_at_leeway = interval '5 minutes'")
        .execute(&db.owner)
        .await
        .unwrap();
    sqlx::raw_sql(&legacy("clock_timestamp()"))
        .execute(&db.pool)
        .await
        .unwrap();
    let err = sqlx::raw_sql(&legacy("now() - interval '1 hour'"))
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(mira_eventlog::db::sqlstate(&err).as_deref(), Some("23514"), "{err}");
    assert_eq!(count_events(&db.pool).await, 2);
    // The application's role cannot widen it.
    let err = sqlx::query("UPDATE log_rules SET recorded_at_leeway = interval '1 year'")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(mira_eventlog::db::sqlstate(&err).as_deref(), Some("42501"), "{err}");
}

/// The late-commit attack (ADR 0010): a transaction that has an id before it looks like an
/// appender (it set the old registration setting, and takes the appenders' lock K itself after
/// a first write) holds its insert while the followers pass its id. The insert is refused, so
/// nothing can commit behind their cursors.
#[tokio::test]
async fn an_insert_after_a_first_write_is_refused_however_the_transaction_dresses_up() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    // (what the transaction does after its first write, whether the followers pass its id)
    for (dress, passed) in [
        ("SELECT set_config('mira.appender', 'on', true)", true),
        ("SELECT 1", true),
        // A temporary table named like the log, holding the transaction's id, must not pass
        // for an earlier append of its own.
        (
            "CREATE TEMP TABLE events (tx_id xid8) ON COMMIT DROP; INSERT INTO events VALUES (pg_current_xact_id())",
            true,
        ),
        // Holding K with an id holds the followers back (it cannot be told from an appender),
        // but still cannot append.
        ("SELECT pg_advisory_xact_lock_shared(1835627105, 1819240225)", false),
    ] {
        let mut attacker = db.pool.begin().await.unwrap();
        sqlx::query("INSERT INTO due_work (kind, key, due_at) VALUES ('k', 'attack', now())")
            .execute(&mut *attacker)
            .await
            .unwrap();
        sqlx::raw_sql(dress).execute(&mut *attacker).await.unwrap();
        let id = tx_id(&mut attacker).await;
        // The followers advance past the attacker's id while it is open.
        let n = count_events(&db.pool).await as u64;
        let appended = log.append(&tenant("lab"), &[tick("honest", n + 1)]).await.unwrap();
        assert!(appended[0].tx_id > id);
        let seen = log.read_after(Cursor::START, 100).await.unwrap();
        if passed {
            assert_eq!(
                seen.last().map(|e| e.sequence),
                Some(n as i64 + 1),
                "the follower passed the open id"
            );
            assert!(log.watermark().await.unwrap() > id);
        } else {
            assert!(log.watermark().await.unwrap() <= id);
        }
        let err = sqlx::query(&raw_insert("", "", "now()"))
            .execute(&mut *attacker)
            .await
            .unwrap_err();
        assert_eq!(
            mira_eventlog::db::sqlstate(&err).as_deref(),
            Some("55000"),
            "{dress}: {err}"
        );
        assert!(err.to_string().contains("first write"), "{err}");
        attacker.rollback().await.unwrap();
    }
    // Only the honest events are in the log.
    let all = log.read_after(Cursor::START, 100).await.unwrap();
    assert!(all.iter().all(|e| e.aggregate_id == "honest"), "{all:?}");
    assert_eq!(all.len(), 4);
}

#[tokio::test]
async fn an_append_after_the_transaction_has_an_id_is_refused() {
    let db = TestDb::new().await;
    // Through the log's own API: a transaction that already wrote cannot append.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO due_work (kind, key, due_at) VALUES ('k', 'x', now())")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = EventLog::append_in_tx(&mut tx, &tenant("lab"), &[tick("a", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, mira_eventlog::AppendError::NotFirstWrite(_)), "{err}");
    tx.rollback().await.unwrap();
    // Appending first, the same transaction may write elsewhere and append more than once.
    let mut tx = db.pool.begin().await.unwrap();
    EventLog::append_in_tx(&mut tx, &tenant("lab"), &[tick("a", 1)])
        .await
        .unwrap();
    sqlx::query("INSERT INTO due_work (kind, key, due_at) VALUES ('k', 'x', now())")
        .execute(&mut *tx)
        .await
        .unwrap();
    EventLog::append_in_tx(&mut tx, &tenant("lab"), &[tick("a", 2)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A savepoint rolled back takes its append with it: a later insert in the transaction is
    // no longer preceded by one of its own events.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("SAVEPOINT s").execute(&mut *tx).await.unwrap();
    EventLog::append_in_tx(&mut tx, &tenant("lab"), &[tick("b", 1)])
        .await
        .unwrap();
    sqlx::query("ROLLBACK TO SAVEPOINT s").execute(&mut *tx).await.unwrap();
    let err = EventLog::append_in_tx(&mut tx, &tenant("lab"), &[tick("b", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, mira_eventlog::AppendError::NotFirstWrite(_)), "{err}");
    tx.rollback().await.unwrap();
    settle(&db.pool).await;
}

#[tokio::test]
async fn outside_read_committed_the_bound_does_not_pass_a_running_transaction() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    let mut holder = hold_an_id(&db.pool).await;
    let low = tx_id(&mut holder).await;
    // A later transaction completes, so the holder is below xmax and in the snapshot's running
    // list.
    log.append(&tenant("lab"), &[tick("a", 1)]).await.unwrap();
    assert!(
        log.watermark().await.unwrap() > low,
        "read committed passes the unregistered holder"
    );
    // A follower in REPEATABLE READ reads with its first snapshot: the bound must not pass
    // anything that snapshot saw running.
    let mut rr = db.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *rr)
        .await
        .unwrap();
    let bound = mira_eventlog::store::watermark(&mut *rr).await.unwrap();
    assert!(
        bound <= low,
        "bound {bound} passes the running {low} under repeatable read"
    );
    rr.rollback().await.unwrap();
    holder.rollback().await.unwrap();
}

async fn verify_stream(db: &TestDb, audit: &Audit, id: &str) -> Result<verify::StreamReport, verify::VerifyError> {
    verify::verify_stream(
        &db.pool,
        &audit.key.verifying_key(),
        &audit.witness,
        Some(&tenant("lab")),
        "Job",
        id,
    )
    .await
}

#[tokio::test]
async fn one_stream_verifies_and_its_tampering_is_named() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-5").await;
    let r = verify_stream(&db, &audit, "j-2").await.unwrap();
    assert_eq!((r.events, r.checkpointed, r.witnessed_checkpoint), (5, 5, Some(1)));
    // Events after the last checkpoint are held by their chain alone.
    let r = verify_stream(&db, &audit, "j-5").await.unwrap();
    assert_eq!((r.events, r.checkpointed), (5, 0));
    // Another tenant's stream reads as empty.
    let other = verify::verify_stream(
        &db.pool,
        &audit.key.verifying_key(),
        &audit.witness,
        Some(&tenant("lab-x")),
        "Job",
        "j-2",
    )
    .await
    .unwrap();
    assert_eq!(other.events, 0);
    // A rewritten and re-hashed event: its chain holds, the signed leaf does not.
    let (pos, id) = rewrite_and_rehash_j2(&db, &log).await;
    match verify_stream(&db, &audit, "j-2").await {
        Err(verify::VerifyError::Violation(v)) => {
            assert_eq!((v.position, v.event_id), (pos, Some(id)), "{v}");
            assert!(v.reason.contains("signed in checkpoint 1"), "{v}");
        }
        other => panic!("j-2 must not verify: {other:?}"),
    }
    assert!(
        verify_stream(&db, &audit, "j-1").await.is_ok(),
        "other streams still verify"
    );
    // A changed byte in a stream no checkpoint covers yet: its hash.
    let pos5 = positions_of(&db.pool, "j-5").await[1];
    tamper(
        &db.owner,
        &format!(
            "UPDATE events SET payload = overlay(payload placing 'X' from 3 for 1) WHERE global_position = {pos5}"
        ),
    )
    .await;
    match verify_stream(&db, &audit, "j-5").await {
        Err(verify::VerifyError::Violation(v)) => assert!(v.position == pos5 && v.reason.contains("altered"), "{v}"),
        other => panic!("j-5 must not verify: {other:?}"),
    }
}

/// Production PostgreSQL refuses plain connections (RDS with `rds.force_ssl`), so Mira's
/// connections speak TLS when the URL asks for it. The test server offers TLS (Debian's default
/// snakeoil certificate); `sslmode=require` must end in an encrypted session, not in
/// "TLS upgrade required but SQLx was built without TLS support".
#[tokio::test]
async fn connections_speak_tls_when_the_url_requires_it() {
    let base = std::env::var("MIRA_TEST_DATABASE_URL").expect("MIRA_TEST_DATABASE_URL");
    let url = format!("{base}{}sslmode=require", if base.contains('?') { '&' } else { '?' });
    let pool = PgPool::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("a TLS connection to the test database failed: {e}"));
    let ssl: bool = sqlx::query_scalar("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the session is not encrypted");
}

// ---- the witness counts every checkpoint (ADR 0019) ---------------------------------------

async fn checkpoint_rows(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM checkpoints ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn upto_of(pool: &PgPool, seq: i64) -> i64 {
    sqlx::query_scalar("SELECT upto_position FROM checkpoints WHERE seq = $1")
        .bind(seq)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Two checkpoints, then what a superuser does: the events after the first and the second
/// checkpoint's row deleted. Returns where the deleted events began.
async fn deleted_tail(db: &TestDb, log: &EventLog, audit: &Audit) -> i64 {
    run_job(&cqrs(log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    assert_eq!(audit.checkpoint(&db.pool).await.seq, 2);
    audit.verify(&db.pool).await.unwrap();
    let first_end = upto_of(&db.pool, 1).await;
    tamper(
        &db.owner,
        &format!("DELETE FROM checkpoints WHERE seq = 2; DELETE FROM events WHERE global_position > {first_end}"),
    )
    .await;
    first_end + 1
}

#[tokio::test]
async fn checkpoints_numbered_past_deleted_ones_are_refused_and_verify_keeps_naming_the_gap() {
    let (db, log, audit) = checkpointed_log().await;
    let first_missing = deleted_tail(&db, &log, &audit).await;
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!(v.position, first_missing, "{v}");

    // Work goes on; the next checkpoint would be numbered 2 again: the witness holds another
    // 2, so nothing is written, and that is the tamper signal.
    for (i, id) in ["j-5", "j-6"].into_iter().enumerate() {
        run_job(&cqrs(&log, "lab"), "lab", id).await;
        settle(&db.pool).await;
        let err = checkpoint::write(&db.pool, &audit.key, &audit.witness)
            .await
            .unwrap_err();
        match &err {
            CheckpointError::Conflict { seq, reason } => {
                assert_eq!(*seq, 2, "round {i}: {err}");
                assert!(reason.contains("different checkpoint 2"), "{reason}");
            }
            other => panic!("round {i}: expected a conflict, got {other}"),
        }
        assert_eq!(checkpoint_rows(&db.pool).await, [1], "round {i}: no row is left behind");
    }
    let v = verify_err(&db.pool, &audit).await;
    assert_eq!(v.position, first_missing, "{v}");
    assert!(
        v.reason.contains("checkpoint 2 of epoch") && v.reason.contains("missing from the database"),
        "{v}"
    );
}

#[tokio::test]
async fn a_checkpointer_that_counts_conflicts_and_successes() {
    let (db, log, audit) = checkpointed_log().await;
    deleted_tail(&db, &log, &audit).await;
    run_job(&cqrs(&log, "lab"), "lab", "j-5").await;
    settle(&db.pool).await;
    let c = checkpoint::Checkpointer::new(
        Arc::new(AuditKey::from_hex("k", &audit.key.secret_hex()).unwrap()),
        Arc::new(audit.witness.clone()),
    );
    assert!(c.write(&db.pool).await.unwrap_err().is_conflict());
    assert_eq!((c.health.conflicts(), c.health.last_success_unix()), (1, 0));
}

#[tokio::test]
async fn a_deleted_middle_checkpoint_is_caught() {
    let (db, log, audit) = checkpointed_log().await;
    for id in ["j-4", "j-5"] {
        run_job(&cqrs(&log, "lab"), "lab", id).await;
        settle(&db.pool).await;
        audit.checkpoint(&db.pool).await;
    }
    tamper(&db.owner, "DELETE FROM checkpoints WHERE seq = 2").await;
    let v = verify_err(&db.pool, &audit).await;
    assert!(v.reason.contains("checkpoint 3 follows checkpoint 1"), "{v}");
    // Renumbered to close the gap: the witness still has the real 2 and 3.
    tamper(&db.owner, "UPDATE checkpoints SET seq = 2 WHERE seq = 3").await;
    let v = verify_err(&db.pool, &audit).await;
    assert!(v.reason.contains("checkpoint 2"), "{v}");
}

#[tokio::test]
async fn checkpoints_re_signed_under_a_new_key_do_not_match_the_witness() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    audit.checkpoint(&db.pool).await;
    // The attacker re-signs every row with a key of its own and hands the verifier that key.
    let forger = Audit::new();
    let rows = sqlx::query(
        "SELECT seq, epoch, created_at, upto_tx::text::bigint AS upto_tx, upto_position, event_count, prev_digest, digest FROM checkpoints",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut sql = String::new();
    for r in rows {
        let ck = mira_events::canonical::CanonicalCheckpoint {
            epoch: r.get("epoch"),
            seq: r.get("seq"),
            created_at_micros: r.get::<chrono::DateTime<Utc>, _>("created_at").timestamp_micros(),
            upto_tx: r.get("upto_tx"),
            upto_position: r.get("upto_position"),
            event_count: r.get("event_count"),
            prev_digest: r.get::<Vec<u8>, _>("prev_digest").try_into().unwrap(),
            digest: r.get::<Vec<u8>, _>("digest").try_into().unwrap(),
        };
        let sig = forger.key.sign(&ck.bytes());
        sql.push_str(&format!(
            "UPDATE checkpoints SET signature = '\\x{}', key_id = '{}' WHERE seq = {};",
            hex::encode(sig),
            checkpoint::key_id(&forger.key.verifying_key()),
            ck.seq
        ));
    }
    tamper(&db.owner, &sql).await;
    let err = verify::verify(&db.pool, &forger.key.verifying_key(), &audit.witness)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("signature that the audit key did not make"),
        "{err}"
    );
}

#[tokio::test]
async fn a_crash_between_the_witness_and_the_insert_rolls_forward_without_an_alarm() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    let err = checkpoint::write_spans(
        &db.pool,
        &audit.key,
        &audit.witness,
        checkpoint::MAX_SPAN,
        CrashAt::AfterWitness,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CheckpointError::Witness { seq: 2, .. }), "{err}");
    assert_eq!(checkpoint_rows(&db.pool).await, [1]);
    // Before the next writer comes, verify sees a witnessed checkpoint the database lacks.
    assert!(verify_err(&db.pool, &audit)
        .await
        .reason
        .contains("checkpoint 2 of epoch"));
    // More events meanwhile: the orphan covers only what it covered, the rest goes in 3.
    run_job(&cqrs(&log, "lab"), "lab", "j-5").await;
    settle(&db.pool).await;
    let info = audit.checkpoint(&db.pool).await;
    assert_eq!(
        (info.rolled_forward, info.written, info.seq, info.event_count),
        (1, 2, 3, 25)
    );
    assert_eq!(
        upto_of(&db.pool, 2).await,
        *positions_of(&db.pool, "j-4").await.last().unwrap()
    );
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!(
        (r.checkpoints, r.witness_records, r.witnessed_checkpoint),
        (3, 3, Some(3))
    );
}

#[tokio::test]
async fn a_record_in_the_witness_that_is_not_ours_is_a_conflict_not_a_roll_forward() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    checkpoint::write_spans(
        &db.pool,
        &audit.key,
        &audit.witness,
        MAX_SPAN_FOR_TESTS,
        CrashAt::AfterWitness,
    )
    .await
    .unwrap_err();
    // The orphan's digest no longer folds from the log: an event it covered was altered.
    let pos = positions_of(&db.pool, "j-4").await[1];
    tamper(
        &db.owner,
        &format!(
            "UPDATE events SET hash = '\\x{}' WHERE global_position = {pos}",
            "ab".repeat(32)
        ),
    )
    .await;
    let err = checkpoint::write(&db.pool, &audit.key, &audit.witness)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert!(err.to_string().contains("do not fold"), "{err}");
    assert_eq!(checkpoint_rows(&db.pool).await, [1]);
}

const MAX_SPAN_FOR_TESTS: i64 = checkpoint::MAX_SPAN;

#[tokio::test]
async fn a_restore_then_a_new_epoch_verifies_and_reports_both_epochs() {
    let (db, log, audit) = checkpointed_log().await;
    // A point-in-time restore looks to the log exactly like the deleted tail.
    deleted_tail(&db, &log, &audit).await;
    run_job(&cqrs(&log, "lab"), "lab", "j-5").await;
    settle(&db.pool).await;
    assert!(checkpoint::write(&db.pool, &audit.key, &audit.witness)
        .await
        .unwrap_err()
        .is_conflict());
    // The operator records it.
    let e = checkpoint::new_epoch(&db.pool, &audit.key, &audit.witness, "restored to 12:00 (ticket 42)")
        .await
        .unwrap();
    assert_eq!(e.after_seq, 1);
    let info = audit.checkpoint(&db.pool).await;
    assert_eq!((info.seq, info.epoch), (2, e.epoch));
    let r = audit.verify(&db.pool).await.unwrap();
    let epochs: Vec<_> = r
        .epochs
        .iter()
        .map(|x| {
            (
                x.epoch,
                x.in_log,
                x.current,
                x.first_seq,
                x.last_seq,
                x.records,
                x.abandoned,
            )
        })
        .collect();
    assert_eq!(
        epochs,
        [
            (e.previous, true, false, 1, Some(1), 2, 1),
            (e.epoch, true, true, 2, None, 1, 0)
        ]
    );
    assert_eq!(r.epochs[1].reason.as_deref(), Some("restored to 12:00 (ticket 42)"));
    // A second restore, to before the new epoch: its record stays in the witness as a branch.
    tamper(
        &db.owner,
        "DELETE FROM checkpoints WHERE seq = 2; DELETE FROM log_epochs",
    )
    .await;
    let v = verify_err(&db.pool, &audit).await;
    assert!(v.reason.contains("checkpoint 2 of epoch"), "{v}");
    let e3 = checkpoint::new_epoch(&db.pool, &audit.key, &audit.witness, "restored again")
        .await
        .unwrap();
    audit.checkpoint(&db.pool).await;
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!(r.epochs.len(), 3, "{:?}", r.epochs);
    assert!(r
        .epochs
        .iter()
        .any(|x| x.epoch == e.epoch && !x.in_log && x.records == 1));
    assert!(r.epochs.iter().any(|x| x.epoch == e3.epoch && x.current));
}

#[tokio::test]
async fn an_epoch_the_database_started_without_the_witness_is_refused() {
    let (db, _log, audit) = checkpointed_log().await;
    let other = Audit::new();
    // Started against another witness: this one never heard of it.
    checkpoint::new_epoch(&db.pool, &audit.key, &other.witness, "elsewhere")
        .await
        .unwrap();
    let v = verify_err(&db.pool, &audit).await;
    assert!(v.reason.contains("has no record of it"), "{v}");
    let err = checkpoint::write(&db.pool, &audit.key, &audit.witness)
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
}

#[tokio::test]
async fn a_checkpoint_row_the_witness_never_saw_is_caught() {
    let (db, log, audit) = checkpointed_log().await;
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    // Written (signed, with the real key) to a witness that is not the one verify reads.
    let other = Audit::new();
    std::fs::create_dir_all(other.witness.path()).unwrap();
    let elsewhere = DirWitness::open(other.witness.path()).unwrap();
    // Copy the epoch record, so the writer accepts the other witness.
    let epoch = checkpoint::db_epochs(&db.pool).await.unwrap()[0].epoch;
    let rec = mira_eventlog::witness::Witness::get(&audit.witness, &mira_eventlog::witness::EpochRecord::name(epoch))
        .await
        .unwrap()
        .unwrap();
    mira_eventlog::witness::Witness::create(&elsewhere, &mira_eventlog::witness::EpochRecord::name(epoch), &rec)
        .await
        .unwrap();
    checkpoint::write(&db.pool, &audit.key, &elsewhere).await.unwrap();
    let v = verify_err(&db.pool, &audit).await;
    assert!(
        v.reason
            .contains("checkpoint 2 is in the database but not in the witness"),
        "{v}"
    );
}

#[tokio::test]
async fn records_from_before_epoch_folders_still_count_and_cut_over() {
    let (db, log, audit) = checkpointed_log().await;
    // A log from before this change: its records at the top of the witness, no epoch record.
    let epoch = checkpoint::db_epochs(&db.pool).await.unwrap()[0].epoch;
    let dir = audit.witness.path().to_path_buf();
    std::fs::rename(
        dir.join(epoch.to_string())
            .join(mira_eventlog::witness::checkpoint_file(1)),
        dir.join(mira_eventlog::witness::checkpoint_file(1)),
    )
    .unwrap();
    std::fs::remove_dir_all(dir.join(epoch.to_string())).unwrap();
    // A checkpoint the old writer made and never copied (a catch-up gap).
    run_job(&cqrs(&log, "lab"), "lab", "j-4").await;
    settle(&db.pool).await;
    let other = Audit::new();
    let before = other.witness.clone();
    let k = AuditKey::from_hex("k", &audit.key.secret_hex()).unwrap();
    checkpoint::write(&db.pool, &k, &before).await.unwrap();
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!(
        (r.checkpoints, r.witness_records, r.witnessed_checkpoint),
        (2, 1, Some(1))
    );
    // The first write under the new rule records the cut-over: from 3 on, every checkpoint.
    run_job(&cqrs(&log, "lab"), "lab", "j-5").await;
    settle(&db.pool).await;
    assert_eq!(audit.checkpoint(&db.pool).await.seq, 3);
    let r = audit.verify(&db.pool).await.unwrap();
    assert_eq!((r.witness_records, r.epochs[0].witness_from), (2, Some(3)));
    // Below the cut-over a writer never numbers a checkpoint again: 2 was written before it.
    let end1 = upto_of(&db.pool, 1).await;
    tamper(
        &db.owner,
        &format!("DELETE FROM checkpoints WHERE seq > 1; DELETE FROM events WHERE global_position > {end1}"),
    )
    .await;
    run_job(&cqrs(&log, "lab"), "lab", "j-6").await;
    settle(&db.pool).await;
    let err = checkpoint::write(&db.pool, &audit.key, &audit.witness)
        .await
        .unwrap_err();
    assert!(err.is_conflict() && err.to_string().contains("up to 2"), "{err}");
    assert_eq!(checkpoint_rows(&db.pool).await, [1]);
    // The old record still counts: every checkpoint row gone, it is the first named.
    tamper(&db.owner, "DELETE FROM checkpoints").await;
    let v = verify_err(&db.pool, &audit).await;
    assert!(
        v.reason.contains("checkpoint 1 (at the top of the witness") && v.reason.contains("missing from the database"),
        "{v}"
    );
}

/// A witness that counts what is asked of it.
#[derive(Debug)]
struct Counting {
    inner: DirWitness,
    gets: std::sync::atomic::AtomicUsize,
    lists: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl mira_eventlog::witness::Witness for Counting {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn create(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> Result<mira_eventlog::witness::Created, mira_eventlog::witness::WitnessError> {
        self.inner.create(name, bytes).await
    }
    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, mira_eventlog::witness::WitnessError> {
        self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.get(name).await
    }
    async fn epochs(&self) -> Result<Vec<uuid::Uuid>, mira_eventlog::witness::WitnessError> {
        self.lists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.epochs().await
    }
    async fn list(
        &self,
        folder: Option<uuid::Uuid>,
        after: &str,
        limit: usize,
    ) -> Result<Vec<mira_eventlog::witness::Listed>, mira_eventlog::witness::WitnessError> {
        self.lists.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.list(folder, after, limit).await
    }
}

#[tokio::test]
async fn the_per_job_check_reads_the_records_it_needs_and_the_newest_never_the_whole_witness() {
    let (db, log, audit) = checkpointed_log().await;
    for id in ["j-4", "j-5", "j-6", "j-7"] {
        run_job(&cqrs(&log, "lab"), "lab", id).await;
        settle(&db.pool).await;
        audit.checkpoint(&db.pool).await;
    }
    let counting = Counting {
        inner: audit.witness.clone(),
        gets: Default::default(),
        lists: Default::default(),
    };
    let r = verify::verify_stream(&db.pool, &audit.key.verifying_key(), &counting, None, "Job", "j-2")
        .await
        .unwrap();
    // j-2 lies under checkpoint 1 of 5: its record, the newest's, the epoch record, one probe.
    assert_eq!((r.checkpoints, r.checkpointed, r.witnessed_checkpoint), (1, 5, Some(5)));
    let gets = counting.gets.load(std::sync::atomic::Ordering::Relaxed);
    assert!(gets <= 4, "{gets} records read");
    assert_eq!(counting.lists.load(std::sync::atomic::Ordering::Relaxed), 0);
    // The attack on the newest is seen by the per-job check too.
    let end = upto_of(&db.pool, 4).await;
    tamper(
        &db.owner,
        &format!("DELETE FROM checkpoints WHERE seq = 5; DELETE FROM events WHERE global_position > {end}"),
    )
    .await;
    match verify::verify_stream(&db.pool, &audit.key.verifying_key(), &counting, None, "Job", "j-2").await {
        Err(verify::VerifyError::Violation(v)) => {
            assert!(
                v.reason.contains("checkpoint 5 of epoch") && v.reason.contains("missing"),
                "{v}"
            );
            assert_eq!(v.position, end + 1, "{v}");
        }
        other => panic!("j-2's check must see the deleted checkpoint: {other:?}"),
    }
}
