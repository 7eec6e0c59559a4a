//! The lifecycle handlers against a real PostgreSQL, fed by the relay over the in-memory bus:
//! waiting for a slide's verdict, retries after backoff, lease expiry, cancellation, and
//! duplicate deliveries.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mira_aggregates::{Job, JobCommand, JobStatus, SlideCommand};
use mira_bus::consumer::{Consumer, ConsumerConfig};
use mira_bus::memory::MemoryBus;
use mira_bus::relay::{Relay, RelayConfig};
use mira_bus::{Bus, Group};
use mira_eventlog::commands::Commands;
use mira_eventlog::testing::{settle, TestDb};
use mira_eventlog::EventLog;
use mira_events::{Actor, CommandContext, JobId, LocalKeyring, SlideId, SlideMetadata, TenantId, Usage};
use mira_handlers::{DueRunner, Lifecycle};
use tokio_util::sync::CancellationToken;

struct World {
    db: TestDb,
    bus: MemoryBus,
    commands: Commands,
    consumer: Consumer,
    runner: DueRunner,
}

fn tenant() -> TenantId {
    TenantId::parse("lab").unwrap()
}

fn user() -> CommandContext {
    CommandContext::new(tenant(), Actor::user("u-1"))
}

fn worker() -> CommandContext {
    CommandContext::new(tenant(), Actor::worker("w-1"))
}

impl World {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let dir = std::env::temp_dir().join(format!("mira-handlers-keys-{}", uuid::Uuid::new_v4()));
        let commands = Commands::new(
            EventLog::new(db.pool.clone()),
            Arc::new(LocalKeyring::init(dir).unwrap().0),
        );
        let bus = MemoryBus::new(Duration::from_secs(5), 5, &[mira_bus::Group::Handlers]);
        let mut cfg = ConsumerConfig::for_group(Group::Handlers);
        cfg.wait = Duration::from_millis(50);
        let consumer = Consumer::new(
            EventLog::new(db.pool.clone()),
            bus.queue(Group::Handlers),
            Arc::new(Lifecycle::new(commands.clone())),
            cfg,
        );
        let runner = DueRunner::new(db.pool.clone(), commands.clone());
        Self {
            db,
            bus,
            commands,
            consumer,
            runner,
        }
    }

    /// Relays every settled event and lets the handlers consume them, `times` deliveries each
    /// (a second delivery is what an at-least-once bus may do at any time).
    async fn pump_with(&self, times: usize) {
        settle(&self.db.pool).await;
        let relay = Relay::new(
            EventLog::new(self.db.pool.clone()),
            Arc::new(self.bus.clone()),
            RelayConfig::default(),
            None,
        );
        relay.drain(&CancellationToken::new()).await.unwrap();
        let queue = self.bus.queue(Group::Handlers);
        loop {
            let batch = queue.receive(10, Duration::from_millis(20)).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for d in batch {
                // Extra deliveries of the same message, as an at-least-once bus may make.
                for _ in 1..times {
                    assert!(self.consumer.process(&d).await.settled());
                }
                assert!(self.consumer.handle(&d).await.settled());
            }
        }
    }

    async fn pump(&self) {
        self.pump_with(1).await
    }

    /// Handles events, then runs what is due at `now`, until nothing moves.
    async fn run_until_quiet(&self, now: DateTime<Utc>) {
        for _ in 0..10 {
            self.pump().await;
            // Never earlier than the wall clock: rows written just now are due "now".
            if self.runner.run_once(now.max(Utc::now())).await.unwrap() == 0 {
                self.pump().await;
                return;
            }
        }
        panic!("the handlers never went quiet");
    }

    async fn job(&self, id: JobId) -> Job {
        self.commands.load_job(&tenant(), id).await.unwrap().unwrap()
    }

    async fn slide(&self) -> SlideId {
        let id = self.registered_slide().await;
        self.commands
            .slide(
                &user(),
                id,
                SlideCommand::MarkUploaded {
                    size_bytes: 10,
                    version_id: None,
                },
            )
            .await
            .unwrap();
        id
    }

    /// A slide whose upload never came.
    async fn registered_slide(&self) -> SlideId {
        let id = SlideId::new();
        self.commands
            .slide(
                &user(),
                id,
                SlideCommand::Register {
                    slide_id: id,
                    name: "s".into(),
                    file_name: None,
                    size_bytes: 10,
                    content_type: "image/tiff".into(),
                    sha256: None,
                    object_key: format!("slides/lab/{id}"),
                },
            )
            .await
            .unwrap();
        id
    }

    async fn verify(&self, slide: SlideId) {
        let metadata = SlideMetadata {
            vendor: Some("aperio".into()),
            width: 100,
            height: 100,
            levels: vec![mira_events::SlideLevel {
                width: 100,
                height: 100,
                downsample: 1.0,
            }],
            mpp_x: None,
            mpp_y: None,
            objective_power: None,
            sealed_properties: None,
        };
        self.commands
            .slide(
                &worker(),
                slide,
                SlideCommand::Verify {
                    metadata,
                    sha256: "0".repeat(64),
                    sensitive_properties: None,
                },
            )
            .await
            .unwrap();
    }

    async fn submit(&self, slide: SlideId, max_attempts: u32) -> JobId {
        let id = JobId::new();
        self.commands
            .job(
                &user(),
                id,
                JobCommand::Submit {
                    slide_id: slide,
                    spec: mira_events::JobSpec::Preprocess(Default::default()),
                    max_attempts,
                    priority: mira_aggregates::Priority::Routine,
                },
            )
            .await
            .unwrap();
        id
    }

    async fn start(&self, job: JobId, lease: chrono::Duration) -> u32 {
        let attempt = self.job(job).await.attempt;
        let now = Utc::now();
        self.commands
            .job(
                &worker(),
                job,
                JobCommand::Start {
                    attempt,
                    worker_id: "w-1".into(),
                    lease_until: now + lease,
                    now,
                },
            )
            .await
            .unwrap();
        attempt
    }

    async fn events(&self, job: JobId) -> Vec<String> {
        sqlx::query_scalar("SELECT event_type FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(job.to_string())
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_job_on_an_unverified_slide_waits_then_is_queued_when_the_slide_is_verified() {
    let w = World::new().await;
    let slide = w.slide().await;
    let job = w.submit(slide, 3).await;
    w.run_until_quiet(Utc::now()).await;
    assert_eq!(
        w.job(job).await.status,
        JobStatus::Submitted,
        "it waits for the verdict"
    );
    w.verify(slide).await;
    w.run_until_quiet(Utc::now()).await;
    let j = w.job(job).await;
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!(j.attempt, 1);
    // A job submitted after the verdict is queued straight away.
    let later = w.submit(slide, 3).await;
    w.run_until_quiet(Utc::now()).await;
    assert_eq!(w.job(later).await.status, JobStatus::Queued);
    // The queueing was done by the system, caused by the events before it.
    let actor: String = sqlx::query_scalar(
        "SELECT metadata::jsonb -> 'actor' ->> 'kind' FROM events WHERE aggregate_id = $1 AND event_type = 'JobQueued'",
    )
    .bind(job.to_string())
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(actor, "system");
}

#[tokio::test]
async fn a_job_whose_slide_never_arrives_fails_after_the_wait_and_one_verified_in_time_does_not() {
    let w = World::new().await;
    let never = w.registered_slide().await;
    let unverified = w.slide().await;
    let on_time = w.slide().await;
    let (j1, j2, j3) = (
        w.submit(never, 3).await,
        w.submit(unverified, 3).await,
        w.submit(on_time, 3).await,
    );
    let t0 = Utc::now();
    w.run_until_quiet(t0).await;
    w.run_until_quiet(t0 + chrono::Duration::hours(23)).await;
    for j in [j1, j2, j3] {
        assert_eq!(w.job(j).await.status, JobStatus::Submitted, "it waits for its slide");
    }
    w.verify(on_time).await;
    w.run_until_quiet(t0).await;
    assert_eq!(w.job(j3).await.status, JobStatus::Queued);
    w.run_until_quiet(t0 + chrono::Duration::hours(25)).await;
    let (a, b) = (w.job(j1).await, w.job(j2).await);
    assert_eq!(a.status, JobStatus::Failed);
    assert_eq!(a.failure.as_deref(), Some("the slide was never uploaded (waited 24 h)"));
    assert_eq!(b.status, JobStatus::Failed);
    assert_eq!(
        b.failure.as_deref(),
        Some("the slide was uploaded but not verified in time (waited 24 h)")
    );
    // The job released in time is left alone, and nothing is left waiting or due.
    assert_eq!(w.events(j3).await.last().map(String::as_str), Some("JobQueued"));
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM handler_waiting) + (SELECT count(*) FROM due_work WHERE kind = 'job.slide_wait')",
    )
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
    // The failure was the system's, and happens once however often the runner looks again.
    let before = w.events(j1).await.len();
    w.run_until_quiet(t0 + chrono::Duration::hours(48)).await;
    assert_eq!(w.events(j1).await.len(), before);
    let actor: String = sqlx::query_scalar(
        "SELECT metadata::jsonb -> 'actor' ->> 'id' FROM events WHERE aggregate_id = $1 AND event_type = 'JobFailed'",
    )
    .bind(j1.to_string())
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(actor, "handlers");
}

#[tokio::test]
async fn a_rejected_slide_fails_its_waiting_jobs_with_the_reason() {
    let w = World::new().await;
    let slide = w.slide().await;
    let job = w.submit(slide, 3).await;
    w.run_until_quiet(Utc::now()).await;
    w.commands
        .slide(
            &worker(),
            slide,
            SlideCommand::Reject {
                reason: "not a TIFF".into(),
            },
        )
        .await
        .unwrap();
    w.run_until_quiet(Utc::now()).await;
    let j = w.job(job).await;
    assert_eq!(j.status, JobStatus::Failed);
    assert!(j.failure.as_deref().unwrap().contains("not a TIFF"), "{:?}", j.failure);
}

#[tokio::test]
async fn duplicate_deliveries_queue_a_job_once() {
    let w = World::new().await;
    let slide = w.slide().await;
    let job = w.submit(slide, 3).await;
    w.verify(slide).await;
    w.pump_with(3).await;
    w.runner.run_once(Utc::now()).await.unwrap();
    w.pump_with(2).await;
    w.runner.run_once(Utc::now()).await.unwrap();
    assert_eq!(w.events(job).await, ["JobSubmitted", "JobQueued"]);
}

#[tokio::test]
async fn a_retryable_failure_is_queued_again_after_its_backoff() {
    let w = World::new().await;
    let slide = w.slide().await;
    w.verify(slide).await;
    let job = w.submit(slide, 3).await;
    w.run_until_quiet(Utc::now()).await;
    let attempt = w.start(job, chrono::Duration::minutes(5)).await;
    let failed_at = Utc::now();
    w.commands
        .job(
            &worker(),
            job,
            JobCommand::Fail {
                attempt,
                reason: "S3 timed out".into(),
                retryable: true,
                stalled: false,
                now: failed_at,
            },
        )
        .await
        .unwrap();
    w.run_until_quiet(Utc::now()).await;
    let j = w.job(job).await;
    assert_eq!(j.status, JobStatus::RetryScheduled, "not before the backoff");
    let due = j.retry_not_before.unwrap();
    w.run_until_quiet(due + chrono::Duration::milliseconds(1)).await;
    let j = w.job(job).await;
    assert_eq!(j.status, JobStatus::Queued);
    assert_eq!(j.attempt, 2);
}

#[tokio::test]
async fn an_expired_lease_times_out_and_retries_and_an_extended_one_does_not() {
    let w = World::new().await;
    let slide = w.slide().await;
    w.verify(slide).await;
    let job = w.submit(slide, 2).await;
    w.run_until_quiet(Utc::now()).await;
    let attempt = w.start(job, chrono::Duration::seconds(30)).await;
    w.run_until_quiet(Utc::now()).await;
    // The worker extends its lease before the first expiry would fire.
    let extended = Utc::now() + chrono::Duration::minutes(10);
    w.commands
        .job(
            &worker(),
            job,
            JobCommand::Heartbeat {
                attempt,
                lease_until: extended,
            },
        )
        .await
        .unwrap();
    w.run_until_quiet(Utc::now() + chrono::Duration::seconds(60)).await;
    assert_eq!(w.job(job).await.status, JobStatus::Running, "the extended lease holds");
    // Past the extended lease, the attempt times out and the next is scheduled.
    w.run_until_quiet(extended + chrono::Duration::seconds(1)).await;
    let j = w.job(job).await;
    assert_eq!(j.status, JobStatus::RetryScheduled, "{:?}", w.events(job).await);
    w.run_until_quiet(j.retry_not_before.unwrap()).await;
    let attempt2 = w.start(job, chrono::Duration::seconds(30)).await;
    assert_eq!(attempt2, 2);
    // The stale worker of attempt 1 cannot succeed now.
    let late = w
        .commands
        .job(
            &worker(),
            job,
            JobCommand::Succeed {
                attempt,
                manifest_key: mira_aggregates::manifest_key(&worker().tenant, job, attempt),
                manifest_sha256: "0".repeat(64),
                usage: Usage {
                    device: "cpu".into(),
                    device_seconds: 1.0,
                    bytes_written: 1,
                },
            },
        )
        .await;
    assert!(
        matches!(
            late,
            Err(cqrs_es::AggregateError::UserError(
                mira_aggregates::JobError::StaleAttempt { current: 2, got: 1 }
            ))
        ),
        "{late:?}"
    );
    // The last attempt times out too: the failure is final.
    w.run_until_quiet(Utc::now() + chrono::Duration::minutes(1)).await;
    let j = w.job(job).await;
    assert_eq!(j.status, JobStatus::Failed, "{:?}", w.events(job).await);
}

#[tokio::test]
async fn a_cancel_requested_while_running_ends_cancelled_when_the_worker_is_gone() {
    let w = World::new().await;
    let slide = w.slide().await;
    w.verify(slide).await;
    let job = w.submit(slide, 3).await;
    w.run_until_quiet(Utc::now()).await;
    w.start(job, chrono::Duration::seconds(30)).await;
    w.commands
        .job(
            &user(),
            job,
            JobCommand::Cancel {
                reason: Some("wrong slide".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(w.job(job).await.status, JobStatus::CancelRequested);
    w.run_until_quiet(Utc::now() + chrono::Duration::minutes(1)).await;
    assert_eq!(
        w.job(job).await.status,
        JobStatus::Cancelled,
        "{:?}",
        w.events(job).await
    );
}

/// A slot no admitted job holds any more (its attempt ended where this runner did not see
/// it: a handler of the release before, a race) is freed, so the admission window does not
/// shrink for good; a queued job's slot is kept, and a running job's is marked started.
#[tokio::test]
async fn slots_no_job_holds_are_freed() {
    let w = World::new().await;
    let submit = |id: JobId| {
        let w = &w;
        async move {
            w.commands
                .job(
                    &user(),
                    id,
                    JobCommand::Submit {
                        slide_id: SlideId::new(),
                        spec: mira_events::JobSpec::Preprocess(Default::default()),
                        max_attempts: 3,
                        priority: mira_aggregates::Priority::Routine,
                    },
                )
                .await
                .unwrap()
        }
    };
    let (ended, queued, running) = (JobId::new(), JobId::new(), JobId::new());
    for id in [ended, queued, running] {
        submit(id).await;
    }
    for id in [queued, running] {
        w.commands
            .job(&user(), id, JobCommand::Queue { now: Utc::now() })
            .await
            .unwrap();
    }
    w.commands
        .job(
            &worker(),
            running,
            JobCommand::Start {
                attempt: 1,
                worker_id: "w-1".into(),
                lease_until: Utc::now() + chrono::Duration::minutes(5),
                now: Utc::now(),
            },
        )
        .await
        .unwrap();
    for id in [ended, queued, running] {
        sqlx::query(
            "INSERT INTO job_slots (job_id, tenant_id, priority, admitted_at) VALUES ($1, 'lab', 'routine', now() - interval '2 minutes')",
        )
        .bind(id.as_uuid())
        .execute(&w.db.pool)
        .await
        .unwrap();
    }
    assert_eq!(w.runner.reconcile_slots().await.unwrap(), 1);
    let left: Vec<(uuid::Uuid, bool)> = sqlx::query_as("SELECT job_id, started FROM job_slots ORDER BY started")
        .fetch_all(&w.db.pool)
        .await
        .unwrap();
    assert_eq!(left, [(queued.as_uuid(), false), (running.as_uuid(), true)]);
}
