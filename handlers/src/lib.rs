//! `mira-handlers` owns the Job lifecycle that no user drives (DESIGN §3, §5.3):
//!
//! * a job submitted on a slide that is not verified yet waits; the slide's verdict queues it
//!   (`JobQueued`) or fails it with the slide's reason;
//! * a retryable failure is queued again once its backoff is over (`JobRetryScheduled` →
//!   `JobQueued`);
//! * an attempt whose lease expires times out (`JobTimedOut`), then retries or fails; a job
//!   whose cancellation was asked for while running is cancelled when its lease runs out;
//! * a job whose slide is not uploaded and verified within `Jobs__SlideWaitHours` fails with
//!   "the slide was never uploaded" (or was not verified in time).
//!
//! Two halves. [`Lifecycle`] is the consumer of the `handlers` queue: for each event it writes
//! rows of the durable due-time table in the consumer's own transaction, so an event's effect
//! is recorded exactly once. [`DueRunner`] takes due rows and sends the commands. Commands are
//! idempotent against the aggregates (a job already queued refuses a second `Queue`), so a row
//! run twice after a crash does no harm, and a row that comes too early (a lease extended
//! meanwhile) moves to the time the aggregate names.

pub mod due;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::AggregateError;
use mira_aggregates::{JobCommand, JobError, SlideStatus};
use mira_bus::consumer::{Apply, ApplyError};
use mira_eventlog::commands::Commands;
use mira_eventlog::StoredEvent;
use mira_events::{Actor, CommandContext, JobEvent, JobId, Metadata, SlideEvent, SlideId, TenantId};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Queue a job (its slide is verified, or its retry is due).
pub const QUEUE: &str = "job.queue";
/// Fail a waiting job because its slide was rejected or deleted.
pub const FAIL: &str = "job.fail_for_slide";
/// Expire an attempt's lease.
pub const LEASE: &str = "job.lease";
/// Fail a job whose slide did not arrive within `Jobs__SlideWaitHours`.
pub const SLIDE_WAIT: &str = "job.slide_wait";

/// A duration as people read it: `24 h`, `1.5 h`, `36 s`.
fn readable(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 {
        format!("{} h", (s / 360.0).round() / 10.0)
    } else {
        format!("{} s", s.round())
    }
}

/// What a due row carries: enough to send the command as the system, in the trace and
/// correlation of the event that caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DueCommand {
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub correlation_id: uuid::Uuid,
    pub causation_id: uuid::Uuid,
    pub traceparent: String,
}

fn failed(e: impl std::fmt::Display) -> ApplyError {
    ApplyError::Failed(e.to_string())
}

fn decode<E: serde::de::DeserializeOwned>(e: &StoredEvent) -> Result<E, ApplyError> {
    mira_eventlog::repo::decode(e).map_err(ApplyError::Failed)
}

/// The consumer of the `handlers` queue.
#[derive(Clone)]
pub struct Lifecycle {
    commands: Commands,
    /// `Jobs__SlideWaitHours`.
    slide_wait: Duration,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lifecycle")
    }
}

impl Lifecycle {
    pub fn new(commands: Commands) -> Self {
        Self {
            commands,
            slide_wait: Duration::from_secs(24 * 3600),
        }
    }

    /// How long a job waits for its slide (`Jobs__SlideWaitHours`).
    pub fn with_slide_wait(mut self, wait: Duration) -> Self {
        self.slide_wait = wait;
        self
    }

    fn due_command(e: &StoredEvent, attempt: Option<u32>, reason: Option<String>) -> Result<DueCommand, ApplyError> {
        let meta: Metadata = serde_json::from_str(&e.metadata).map_err(failed)?;
        Ok(DueCommand {
            tenant: e.tenant_id.clone(),
            attempt,
            reason,
            correlation_id: meta.correlation_id,
            causation_id: e.event_id,
            traceparent: meta.traceparent,
        })
    }

    async fn schedule(
        tx: &mut PgConnection,
        kind: &str,
        job: &str,
        at: DateTime<Utc>,
        w: &DueCommand,
    ) -> Result<(), ApplyError> {
        let payload = serde_json::to_string(w).map_err(failed)?;
        due::schedule(tx, kind, job, at, &payload).await?;
        Ok(())
    }

    /// Serialises everything the handlers do about one slide's waiting jobs.
    async fn lock_slide(tx: &mut PgConnection, slide: &SlideId) -> Result<(), ApplyError> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('mira.slide:' || $1, 0))")
            .bind(slide.to_string())
            .execute(tx)
            .await?;
        Ok(())
    }

    /// A job entered `submitted` (first submission or a user's retry): queue it if its slide
    /// is verified, fail it if the slide is gone, otherwise wait for the verdict.
    async fn submitted(&self, tx: &mut PgConnection, e: &StoredEvent, slide: SlideId) -> Result<(), ApplyError> {
        let tenant = TenantId::parse(&e.tenant_id).map_err(failed)?;
        Self::lock_slide(tx, &slide).await?;
        // Under the lock the log is the truth: a verdict committed before this load is seen
        // here; one committed after it finds the waiting row below.
        let state = self.commands.load_slide(&tenant, slide).await.map_err(failed)?;
        let now = Utc::now();
        let reason = match state.map(|s| (s.status, s.rejection)) {
            Some((SlideStatus::Verified, _)) => {
                return Self::schedule(tx, QUEUE, &e.aggregate_id, now, &Self::due_command(e, None, None)?).await
            }
            Some((SlideStatus::Rejected, why)) => format!("the slide was rejected: {}", why.unwrap_or_default()),
            Some((SlideStatus::Deleted, _)) | None => "the slide no longer exists".to_owned(),
            Some(_) => {
                sqlx::query(
                    "INSERT INTO handler_waiting (slide_id, job_id, tenant_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(slide.as_uuid())
                .bind(uuid::Uuid::parse_str(&e.aggregate_id).map_err(failed)?)
                .bind(&e.tenant_id)
                .execute(&mut *tx)
                .await?;
                // Not for ever: past the wait the job fails and says why.
                let until = now + chrono::Duration::from_std(self.slide_wait).map_err(failed)?;
                let why = format!("the slide was never uploaded (waited {})", readable(self.slide_wait));
                return Self::schedule(
                    tx,
                    SLIDE_WAIT,
                    &e.aggregate_id,
                    until,
                    &Self::due_command(e, None, Some(why))?,
                )
                .await;
            }
        };
        Self::schedule(
            tx,
            FAIL,
            &e.aggregate_id,
            now,
            &Self::due_command(e, None, Some(reason))?,
        )
        .await
    }

    /// A slide's verdict: release its waiting jobs.
    async fn verdict(
        &self,
        tx: &mut PgConnection,
        e: &StoredEvent,
        kind: &str,
        reason: Option<String>,
    ) -> Result<(), ApplyError> {
        let slide = SlideId::parse(&e.aggregate_id).map_err(failed)?;
        Self::lock_slide(tx, &slide).await?;
        // The waits' due rows before the waiting rows: the due runner takes them in that order
        // too (a due row, then its waiting row), so neither waits for the other in a circle.
        sqlx::query(
            "DELETE FROM due_work WHERE kind = $1 AND key IN \
             (SELECT job_id::text FROM handler_waiting WHERE slide_id = $2)",
        )
        .bind(SLIDE_WAIT)
        .bind(slide.as_uuid())
        .execute(&mut *tx)
        .await?;
        let jobs: Vec<uuid::Uuid> =
            sqlx::query_scalar("DELETE FROM handler_waiting WHERE slide_id = $1 RETURNING job_id")
                .bind(slide.as_uuid())
                .fetch_all(&mut *tx)
                .await?;
        let w = Self::due_command(e, None, reason)?;
        for job in jobs {
            Self::schedule(tx, kind, &job.to_string(), Utc::now(), &w).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Apply for Lifecycle {
    async fn apply(&self, tx: &mut PgConnection, e: &StoredEvent) -> Result<(), ApplyError> {
        // The handlers work across tenants: as `mira_handlers`, whose policies say so (a login
        // that also holds `mira_api`, as the tests' does, is confined to one tenant by its
        // policies otherwise).
        sqlx::query("SET LOCAL ROLE mira_handlers").execute(&mut *tx).await?;
        match e.aggregate_type.as_str() {
            "Job" => match decode::<JobEvent>(e)? {
                JobEvent::JobSubmitted { slide_id, .. } => self.submitted(tx, e, slide_id).await,
                JobEvent::JobRetryRequested { .. } => {
                    let tenant = TenantId::parse(&e.tenant_id).map_err(failed)?;
                    let job = JobId::parse(&e.aggregate_id).map_err(failed)?;
                    let slide = self
                        .commands
                        .load_job(&tenant, job)
                        .await
                        .map_err(failed)?
                        .and_then(|j| j.slide_id)
                        .ok_or_else(|| failed("a retried job has no slide"))?;
                    self.submitted(tx, e, slide).await
                }
                JobEvent::JobRetryScheduled { not_before, .. } => {
                    Self::schedule(
                        tx,
                        QUEUE,
                        &e.aggregate_id,
                        not_before,
                        &Self::due_command(e, None, None)?,
                    )
                    .await
                }
                JobEvent::JobStarted {
                    attempt, lease_until, ..
                }
                | JobEvent::JobLeaseExtended { attempt, lease_until } => {
                    Self::schedule(
                        tx,
                        LEASE,
                        &e.aggregate_id,
                        lease_until,
                        &Self::due_command(e, Some(attempt), None)?,
                    )
                    .await
                }
                JobEvent::JobSucceeded { .. }
                | JobEvent::JobAttemptFailed { .. }
                | JobEvent::JobTimedOut { .. }
                | JobEvent::JobFailed { .. }
                | JobEvent::JobCancelled { .. } => {
                    due::cancel(tx, LEASE, &e.aggregate_id).await?;
                    Ok(())
                }
                JobEvent::JobQueued { .. } | JobEvent::JobProgressed { .. } | JobEvent::JobCancelRequested { .. } => {
                    Ok(())
                }
            },
            "Slide" => match decode::<SlideEvent>(e)? {
                SlideEvent::SlideVerified { .. } => self.verdict(tx, e, QUEUE, None).await,
                SlideEvent::SlideRejected { reason } => {
                    self.verdict(tx, e, FAIL, Some(format!("the slide was rejected: {reason}")))
                        .await
                }
                SlideEvent::SlideDeleted { .. } => {
                    self.verdict(tx, e, FAIL, Some("the slide was deleted".into())).await
                }
                SlideEvent::SlideRegistered { .. } | SlideEvent::SlideUploaded { .. } => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

/// Takes due rows and sends their commands.
#[derive(Clone)]
pub struct DueRunner {
    pool: PgPool,
    commands: Commands,
    /// How long to wait when nothing was due.
    pub idle_poll: Duration,
}

impl std::fmt::Debug for DueRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DueRunner")
    }
}

/// What became of one due row.
fn settle(kind: &str, job: &str, r: Result<(), AggregateError<JobError>>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match r {
        Ok(()) => {
            tracing::info!(kind, job_id = job, "lifecycle command sent");
            None
        }
        Err(AggregateError::UserError(JobError::NotDue(t))) => Some(t),
        Err(AggregateError::UserError(JobError::LeaseNotExpired { until, .. })) => Some(until),
        // The job moved on (already queued, finished, a newer attempt): nothing to do.
        Err(AggregateError::UserError(e)) => {
            tracing::debug!(kind, job_id = job, reason = %e, "lifecycle command no longer applies");
            None
        }
        Err(AggregateError::AggregateConflict) => Some(now + chrono::Duration::milliseconds(50)),
        Err(e) => {
            tracing::warn!(kind, job_id = job, error = %e, "lifecycle command failed; retrying in 5 s");
            Some(now + chrono::Duration::seconds(5))
        }
    }
}

/// A job's wait for its slide is over: if it still waits (its row in `handler_waiting`, taken
/// here in the due row's transaction), it fails with the reason the row carries, or, where the
/// slide did arrive but was not verified in time, says so.
async fn slide_wait_over(
    conn: &mut PgConnection,
    commands: &Commands,
    ctx: &CommandContext,
    id: JobId,
    w: &DueCommand,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query("SET LOCAL ROLE mira_handlers").execute(&mut *conn).await?;
    let waiting: Option<(uuid::Uuid, String)> =
        sqlx::query_as("DELETE FROM handler_waiting WHERE job_id = $1 RETURNING slide_id, tenant_id")
            .bind(id.as_uuid())
            .fetch_optional(&mut *conn)
            .await?;
    let Some((slide, tenant)) = waiting else {
        // Released by the slide's verdict, or never waiting: nothing to do.
        sqlx::query("RESET ROLE").execute(&mut *conn).await?;
        return Ok(None);
    };
    let never = w
        .reason
        .clone()
        .unwrap_or_else(|| "the slide was never uploaded".into());
    let reason = match commands.load_slide(&ctx.tenant, SlideId(slide)).await {
        Ok(Some(s)) if s.status != SlideStatus::Registered => {
            never.replace("was never uploaded", "was uploaded but not verified in time")
        }
        _ => never,
    };
    let r = commands.job(ctx, id, JobCommand::FailForSlide { reason }).await;
    let again = settle(SLIDE_WAIT, &id.to_string(), r, now);
    if again.is_some() {
        // Tried again later: the job still waits.
        sqlx::query(
            "INSERT INTO handler_waiting (slide_id, job_id, tenant_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(slide)
        .bind(id.as_uuid())
        .bind(tenant)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query("RESET ROLE").execute(&mut *conn).await?;
    Ok(again)
}

impl DueRunner {
    pub fn new(pool: PgPool, commands: Commands) -> Self {
        Self {
            pool,
            commands,
            idle_poll: Duration::from_millis(100),
        }
    }

    /// Runs every row due at `now`; returns how many were taken.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<usize, sqlx::Error> {
        let mut n = 0;
        for kind in [QUEUE, FAIL, LEASE, SLIDE_WAIT] {
            let commands = self.commands.clone();
            let taken = due::take_due(&self.pool, kind, now, 50, move |conn, item| {
                let commands = commands.clone();
                Box::pin(async move {
                    let job = item.key.clone();
                    let (w, id) = match (serde_json::from_str::<DueCommand>(&item.payload), JobId::parse(&job)) {
                        (Ok(w), Ok(id)) => (w, id),
                        _ => {
                            tracing::error!(kind = item.kind, key = job, "unreadable due row dropped");
                            return Ok(None);
                        }
                    };
                    let Ok(tenant) = TenantId::parse(&w.tenant) else {
                        tracing::error!(kind = item.kind, key = job, "due row with an invalid tenant dropped");
                        return Ok(None);
                    };
                    let ctx = CommandContext {
                        tenant: tenant.clone(),
                        actor: Actor::system("handlers"),
                        correlation_id: w.correlation_id,
                        causation_id: w.causation_id,
                        traceparent: w.traceparent.clone(),
                        idempotency_key: None,
                    };
                    if item.kind == SLIDE_WAIT {
                        return slide_wait_over(conn, &commands, &ctx, id, &w, now).await;
                    }
                    let command = match item.kind.as_str() {
                        QUEUE => JobCommand::Queue { now },
                        FAIL => JobCommand::FailForSlide {
                            reason: w
                                .reason
                                .clone()
                                .unwrap_or_else(|| "the slide cannot be processed".into()),
                        },
                        _ => JobCommand::ExpireLease {
                            attempt: w.attempt.unwrap_or(0),
                            now,
                        },
                    };
                    let r = commands.job(&ctx, id, command).await;
                    Ok(settle(&item.kind, &job, r, now))
                })
            })
            .await?;
            n += taken.len();
        }
        Ok(n)
    }

    /// Runs until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), sqlx::Error> {
        while !shutdown.is_cancelled() {
            let n = match self.run_once(Utc::now()).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "due-time table unreachable; retrying");
                    0
                }
            };
            if n == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.idle_poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        Ok(())
    }
}

/// The handlers' consumer and due runner together, until `shutdown` (`mira handlers`).
pub async fn run(
    pool: PgPool,
    commands: Commands,
    queue: Arc<dyn mira_bus::Queue>,
    slide_wait: Duration,
    shutdown: CancellationToken,
) -> Result<(), mira_bus::BusError> {
    let consumer = mira_bus::consumer::Consumer::new(
        mira_eventlog::EventLog::new(pool.clone()),
        queue,
        Arc::new(Lifecycle::new(commands.clone()).with_slide_wait(slide_wait)),
        mira_bus::consumer::ConsumerConfig::for_group(mira_bus::Group::Handlers),
    );
    let runner = DueRunner::new(pool, commands);
    let stop = shutdown.clone();
    let due = tokio::spawn(async move { runner.run(stop).await });
    let r = consumer.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = due.await;
    r
}
