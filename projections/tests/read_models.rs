//! Read models against a real PostgreSQL: convergence under duplicate and out-of-order
//! delivery, and tenant isolation through row-level security.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::CqrsFramework;
use mira_aggregates::{Job, JobCommand, Slide, SlideCommand, SlideServices};
use mira_bus::consumer::{Consumer, ConsumerConfig};
use mira_bus::memory::MemoryBus;
use mira_bus::{Bus, EventMessage, Group};
use mira_eventlog::testing::{settle, TestDb};
use mira_eventlog::{EventLog, PgEventRepository};
use mira_events::{Actor, CommandContext, JobId, LocalKeyring, SlideId, TenantId, Usage};
use mira_projections::projector::replay_into;
use mira_projections::query::JobFilter;
use mira_projections::{Projector, ReadModels};
use tokio_util::sync::CancellationToken;

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A random but valid-or-refused mix of commands over `jobs` jobs and a few slides.
async fn random_history(log: &EventLog, tenants: &[&str], jobs: usize, seed: u64) {
    let mut rng = Rng(seed);
    let keyring = Arc::new(
        LocalKeyring::init(std::env::temp_dir().join(format!("mira-rm-{}", uuid::Uuid::new_v4())))
            .unwrap()
            .0,
    );
    for t in tenants {
        let ctx = CommandContext::new(tenant(t), Actor::user(format!("{t}-user")));
        let jc: CqrsFramework<Job, _> = CqrsFramework::new(
            PersistedEventStore::<_, Job>::new_event_store(PgEventRepository::new(log.clone(), tenant(t))),
            vec![],
            (),
        );
        let sc: CqrsFramework<Slide, _> = CqrsFramework::new(
            PersistedEventStore::<_, Slide>::new_event_store(PgEventRepository::new(log.clone(), tenant(t))),
            vec![],
            SlideServices {
                keyring: keyring.clone(),
            },
        );
        let slide = SlideId::new();
        let register = SlideCommand::Register {
            slide_id: slide,
            name: format!("{t} slide"),
            file_name: None,
            size_bytes: 1000,
            content_type: "image/tiff".into(),
            sha256: None,
            object_key: format!("uploads/{slide}"),
        };
        sc.execute_with_metadata(&slide.to_string(), register, ctx.to_cqrs())
            .await
            .unwrap();
        sc.execute_with_metadata(
            &slide.to_string(),
            SlideCommand::MarkUploaded {
                size_bytes: 1000,
                version_id: None,
            },
            ctx.to_cqrs(),
        )
        .await
        .unwrap();
        for _ in 0..jobs {
            let id = JobId::new().to_string();
            let submit = JobCommand::Submit {
                slide_id: slide,
                spec: mira_events::JobSpec::Preprocess(Default::default()),
                max_attempts: 2,
                priority: mira_aggregates::Priority::Routine,
            };
            jc.execute_with_metadata(&id, submit, ctx.to_cqrs()).await.unwrap();
            for _ in 0..12 {
                let now = Utc::now();
                let attempt = 1 + rng.next(2) as u32;
                let cmd = match rng.next(8) {
                    0 | 1 => JobCommand::Queue {
                        now: now + chrono::Duration::hours(1),
                    },
                    2 => JobCommand::Start {
                        attempt,
                        worker_id: "w".into(),
                        lease_until: now + chrono::Duration::minutes(5),
                        now,
                    },
                    3 => JobCommand::Progress {
                        attempt,
                        done: 1,
                        total: 4,
                    },
                    4 => JobCommand::Succeed {
                        attempt,
                        manifest_key: format!("results/{id}/{attempt}/manifest.json"),
                        manifest_sha256: "c".repeat(64),
                        usage: Usage {
                            device: if rng.next(2) == 0 { "cpu".into() } else { "gpu".into() },
                            device_seconds: 0.5,
                            bytes_written: 100,
                        },
                    },
                    5 => JobCommand::Fail {
                        attempt,
                        reason: "boom".into(),
                        retryable: true,
                        stalled: false,
                        now,
                    },
                    6 => JobCommand::Cancel { reason: None },
                    _ => JobCommand::Retry,
                };
                // Refused commands write nothing; that is part of the mix.
                let _ = jc.execute_with_metadata(&id, cmd, ctx.to_cqrs()).await;
            }
        }
    }
    settle(log.pool()).await;
}

async fn table(pool: &sqlx::PgPool, schema: &str, table: &str, key: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(&format!("SELECT to_jsonb(t) FROM {schema}.{table} t ORDER BY {key}"))
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_converge_to_a_replay_despite_duplicates_and_reordering() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    random_history(&log, &["lab-a", "lab-b"], 20, 7).await;
    let mut events = Vec::new();
    let mut cursor = mira_eventlog::Cursor::START;
    loop {
        let batch = log.read_after(cursor, 1000).await.unwrap();
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        events.extend(batch);
    }
    assert!(events.len() > 120, "only {} events", events.len());

    // Deliver everything out of order, most of it twice.
    let bus = MemoryBus::new(Duration::from_secs(5), 10, &[mira_bus::Group::Projections]);
    let mut msgs: Vec<EventMessage> = events.iter().map(EventMessage::from).collect();
    let mut rng = Rng(99);
    for i in (1..msgs.len()).rev() {
        msgs.swap(i, rng.next(i as u64 + 1) as usize);
    }
    let queue = bus.memory_queue(Group::Projections);
    for (i, m) in msgs.iter().enumerate() {
        queue.send(m.group_id(), format!("{}-a", m.event_id), m.to_body());
        if i % 3 != 0 {
            queue.send(m.group_id(), format!("{}-b", m.event_id), m.to_body());
        }
    }
    let mut cfg = ConsumerConfig::for_group(Group::Projections);
    cfg.wait = Duration::from_millis(100);
    let consumer = Consumer::new(
        log.clone(),
        bus.queue(Group::Projections),
        Arc::new(Projector::default()),
        cfg,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue.depth() > 0 {
        assert!(Instant::now() < deadline, "{} messages left", queue.depth());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(mira_bus::consumer::list_parked(&db.pool).await.unwrap().is_empty());

    let replayed = replay_into(&db.owner, "rm_check").await.unwrap();
    assert_eq!(replayed as usize, events.len());
    for (t, key) in [
        ("jobs", "job_id"),
        ("slides", "slide_id"),
        ("job_timeline", "job_id, sequence"),
        ("usage", "tenant_id"),
    ] {
        let live = table(&db.owner, "rm", t, key).await;
        let rebuilt = table(&db.owner, "rm_check", t, key).await;
        assert!(!live.is_empty(), "{t} is empty");
        assert_eq!(live.len(), rebuilt.len(), "{t}: row counts differ");
        for (a, b) in live.iter().zip(&rebuilt) {
            assert_eq!(a, b, "{t}: rows differ");
        }
    }
    let statuses: Vec<String> = sqlx::query_scalar("SELECT DISTINCT status FROM rm.jobs")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(statuses.len() >= 4, "the mix reached only {statuses:?}");
    assert!(
        statuses.contains(&"succeeded".to_string()),
        "no job succeeded: {statuses:?}"
    );
    let cpu: i64 = sqlx::query_scalar("SELECT sum(cpu_us + gpu_us)::bigint FROM rm.usage")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cpu > 0);
}

#[tokio::test]
async fn a_tenant_sees_only_its_rows_even_through_a_superuser_connection() {
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    random_history(&log, &["lab-a", "lab-b"], 3, 1).await;
    // Project into the live schema directly.
    {
        let mut cursor = mira_eventlog::Cursor::START;
        let p = Projector::default();
        loop {
            let batch = log.read_after(cursor, 1000).await.unwrap();
            let Some(last) = batch.last() else { break };
            cursor = last.cursor();
            let mut tx = db.pool.begin().await.unwrap();
            for e in &batch {
                mira_bus::consumer::Apply::apply(&p, &mut tx, e).await.unwrap();
            }
            tx.commit().await.unwrap();
        }
    }
    let is_super: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert!(is_super, "this test connects as a superuser on purpose");
    let rm = ReadModels::new(db.owner.clone());

    // A query with no tenant filter sees only tenant A.
    let mut tx = rm.begin(&tenant("lab-a")).await.unwrap();
    let tenants: Vec<String> = sqlx::query_scalar("SELECT DISTINCT tenant_id FROM rm.jobs")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(tenants, vec!["lab-a".to_string()]);
    let slides: Vec<String> = sqlx::query_scalar("SELECT tenant_id FROM rm.slides")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(slides, vec!["lab-a".to_string()]);
    let by_status: Vec<String> = sqlx::query_scalar("SELECT DISTINCT tenant_id FROM rm.jobs_by_status")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(by_status, vec!["lab-a".to_string()], "views are security_invoker");
    // A write to tenant B's row fails.
    let err = sqlx::query("UPDATE rm.jobs SET status = 'succeeded' WHERE tenant_id = 'lab-b'")
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(mira_eventlog::db::sqlstate(&err).as_deref(), Some("42501"), "{err}");
    tx.rollback().await.unwrap();
    let b_job: uuid::Uuid = sqlx::query_scalar("SELECT job_id FROM rm.jobs WHERE tenant_id = 'lab-b' LIMIT 1")
        .fetch_one(&db.owner)
        .await
        .unwrap();
    assert!(
        rm.job(&tenant("lab-a"), b_job).await.unwrap().is_none(),
        "another tenant's job reads as absent"
    );
    assert!(rm.job(&tenant("lab-b"), b_job).await.unwrap().is_some());
    let page = rm.jobs(&tenant("lab-b"), &JobFilter::default(), None, 2).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let rest = rm
        .jobs(&tenant("lab-b"), &JobFilter::default(), page.next, 10)
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    let lab_b: std::collections::BTreeSet<uuid::Uuid> =
        sqlx::query_scalar("SELECT job_id FROM rm.jobs WHERE tenant_id = 'lab-b'")
            .fetch_all(&db.owner)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let paged: std::collections::BTreeSet<uuid::Uuid> =
        page.items.iter().chain(&rest.items).map(|j| j.job_id).collect();
    assert_eq!(paged, lab_b, "the pages hold lab-b's jobs, each once");
    assert!(!rm.timeline(&tenant("lab-b"), b_job).await.unwrap().is_empty());
    assert!(rm.timeline(&tenant("lab-a"), b_job).await.unwrap().is_empty());

    let a_slides = rm.slides(&tenant("lab-a"), None, 10).await.unwrap();
    assert_eq!(a_slides.len(), 1);
    assert!(
        matches!(a_slides[0].name, mira_projections::views::SlideName::Sealed(_)),
        "the name is stored sealed"
    );
    assert!(rm
        .slide(&tenant("lab-b"), a_slides[0].slide_id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        rm.slide(&tenant("lab-a"), a_slides[0].slide_id)
            .await
            .unwrap()
            .unwrap()
            .status,
        mira_aggregates::SlideStatus::Uploaded
    );
    // With no tenant set, the query fails instead of returning everything.
    let mut tx = db.owner.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE mira_api").execute(&mut *tx).await.unwrap();
    let err = sqlx::query("SELECT count(*) FROM rm.jobs")
        .fetch_one(&mut *tx)
        .await
        .unwrap_err();
    assert_eq!(mira_eventlog::db::sqlstate(&err).as_deref(), Some("42501"), "{err}");
    assert!(err.to_string().contains("mira.tenant_id is not set"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_under_load_never_shows_a_partial_model_and_ends_complete() {
    use mira_bus::relay::{Relay, RelayConfig};
    let db = TestDb::new().await;
    let log = EventLog::new(db.pool.clone());
    random_history(&log, &["lab-a", "lab-b"], 10, 3).await;
    let bus = MemoryBus::new(Duration::from_secs(5), 10, &[mira_bus::Group::Projections]);
    let stop = CancellationToken::new();
    // The live system: relay and projector.
    let relay = Relay::new(log.clone(), bus.publisher(), RelayConfig::default(), None);
    let relay_task = tokio::spawn({
        let stop = stop.clone();
        async move {
            while !stop.is_cancelled() {
                match relay.publish_next(&stop).await.unwrap() {
                    Some(p) => relay.commit(&p).await.unwrap(),
                    None => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
    });
    let mut cfg = ConsumerConfig::for_group(Group::Projections);
    cfg.wait = Duration::from_millis(50);
    let consumer = Consumer::new(
        log.clone(),
        bus.queue(Group::Projections),
        Arc::new(Projector::default()),
        cfg,
    );
    let consumer_task = tokio::spawn({
        let stop = stop.clone();
        async move { consumer.run(stop).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while mira_projections::rebuild::status(&db.pool).await.unwrap()[0].lag_events > 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Commands keep arriving, and a reader keeps reading, during the rebuild.
    let writing = CancellationToken::new();
    let writer = tokio::spawn({
        let (log, writing) = (log.clone(), writing.clone());
        async move {
            let mut seed = 100;
            while !writing.is_cancelled() {
                random_history(&log, &["lab-a"], 1, seed).await;
                seed += 1;
            }
        }
    });
    let reading = CancellationToken::new();
    let reader = tokio::spawn({
        let (pool, reading) = (db.pool.clone(), reading.clone());
        async move {
            let mut last = 0i64;
            let mut reads = 0;
            while !reading.is_cancelled() {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rm.jobs")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                assert!(n > 0 && n >= last, "a reader saw {n} jobs after {last}");
                last = n;
                reads += 1;
            }
            reads
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = mira_projections::rebuild::rebuild(&db.pool, false, |_| {})
        .await
        .unwrap();
    assert!(report.swapped);
    tokio::time::sleep(Duration::from_millis(200)).await;
    writing.cancel();
    writer.await.unwrap();
    reading.cancel();
    assert!(reader.await.unwrap() > 10);
    // After the swap the live projector carries on; once caught up the model is complete.
    let deadline = Instant::now() + Duration::from_secs(60);
    while mira_projections::rebuild::status(&db.pool).await.unwrap()[0].lag_events > 0
        || bus.memory_queue(Group::Projections).depth() > 0
    {
        assert!(Instant::now() < deadline, "the projector did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    relay_task.await.unwrap();
    consumer_task.await.unwrap().unwrap();
    replay_into(&db.owner, "rm_check").await.unwrap();
    for (t, key) in [
        ("jobs", "job_id"),
        ("slides", "slide_id"),
        ("job_timeline", "job_id, sequence"),
        ("usage", "tenant_id"),
    ] {
        assert_eq!(
            table(&db.owner, "rm", t, key).await,
            table(&db.owner, "rm_check", t, key).await,
            "{t} differs"
        );
    }
    // An interrupted rebuild's leftovers do not stop the next one, and --verify finds nothing.
    sqlx::query("SELECT mira_create_read_models('rm_rebuild')")
        .execute(&db.owner)
        .await
        .unwrap();
    let again = mira_projections::rebuild::rebuild(&db.pool, true, |_| {})
        .await
        .unwrap();
    assert!(again.swapped && again.differences.is_empty(), "{:?}", again.differences);
    // And a damaged live model is reported, and kept.
    sqlx::query("UPDATE rm.jobs SET status = 'succeeded' WHERE job_id = (SELECT job_id FROM rm.jobs WHERE status <> 'succeeded' LIMIT 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    let damaged = mira_projections::rebuild::rebuild(&db.pool, true, |_| {})
        .await
        .unwrap();
    assert!(!damaged.swapped);
    assert_eq!(damaged.differences.len(), 1, "{:?}", damaged.differences);
    assert!(damaged.differences[0].starts_with("jobs "), "{:?}", damaged.differences);
}
