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
use tracing::Instrument;

use chrono::{DateTime, Utc};
use cqrs_es::AggregateError;
use mira_aggregates::{JobCommand, JobError, JobStatus, SlideStatus};
use mira_bus::consumer::{Apply, ApplyError};
use mira_eventlog::commands::Commands;
use mira_eventlog::StoredEvent;
use mira_events::{Actor, CommandContext, JobEvent, JobId, Metadata, Priority, SlideEvent, SlideId, TenantId};
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
    /// A queue row's job priority: STAT rows are admitted at once (routine when absent, as in
    /// rows of the release before).
    #[serde(default, skip_serializing_if = "is_routine")]
    pub priority: Priority,
    pub correlation_id: uuid::Uuid,
    pub causation_id: uuid::Uuid,
    pub traceparent: String,
}

fn is_routine(p: &Priority) -> bool {
    *p == Priority::Routine
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
        let meta: Metadata = serde_json::from_str(&e.metadata).map_err(ApplyError::failed)?;
        Ok(DueCommand {
            tenant: e.tenant_id.clone(),
            attempt,
            reason,
            priority: Priority::Routine,
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
        let payload = serde_json::to_string(w).map_err(ApplyError::failed)?;
        due::schedule(tx, kind, job, at, &payload).await?;
        Ok(())
    }

    /// The job `e` is about, as the log has it.
    async fn job(&self, e: &StoredEvent) -> Result<mira_aggregates::Job, ApplyError> {
        let tenant = e.tenant()?;
        let job = e.id::<JobId>()?;
        self.commands
            .load_job(&tenant, job)
            .await
            .map_err(ApplyError::failed)?
            .ok_or_else(|| ApplyError::failed("no such job"))
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
    /// is verified (through admission, with its `priority`), fail it if the slide is gone,
    /// otherwise wait for the verdict.
    async fn submitted(
        &self,
        tx: &mut PgConnection,
        e: &StoredEvent,
        slide: SlideId,
        priority: Priority,
    ) -> Result<(), ApplyError> {
        let tenant = e.tenant()?;
        Self::lock_slide(tx, &slide).await?;
        // Under the lock the log is the truth: a verdict committed before this load is seen
        // here; one committed after it finds the waiting row below.
        let state = self
            .commands
            .load_slide(&tenant, slide)
            .await
            .map_err(ApplyError::failed)?;
        let now = Utc::now();
        let reason = match state.map(|s| (s.status, s.rejection)) {
            Some((SlideStatus::Verified, _)) => {
                let w = DueCommand {
                    priority,
                    ..Self::due_command(e, None, None)?
                };
                return Self::schedule(tx, QUEUE, &e.aggregate_id, now, &w).await;
            }
            Some((SlideStatus::Rejected, why)) => format!("the slide was rejected: {}", why.unwrap_or_default()),
            Some((SlideStatus::Deleted, _)) | None => "the slide no longer exists".to_owned(),
            Some(_) => {
                sqlx::query(
                    "INSERT INTO handler_waiting (slide_id, job_id, tenant_id, priority) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(slide.as_uuid())
                .bind(uuid::Uuid::parse_str(&e.aggregate_id).map_err(ApplyError::failed)?)
                .bind(&e.tenant_id)
                .bind(priority.as_str())
                .execute(&mut *tx)
                .await?;
                // Not for ever: past the wait the job fails and says why.
                let until = now + chrono::Duration::from_std(self.slide_wait).map_err(ApplyError::failed)?;
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
        let slide = e.id::<SlideId>()?;
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
        let jobs: Vec<(uuid::Uuid, String)> =
            sqlx::query_as("DELETE FROM handler_waiting WHERE slide_id = $1 RETURNING job_id, priority")
                .bind(slide.as_uuid())
                .fetch_all(&mut *tx)
                .await?;
        let w = Self::due_command(e, None, reason)?;
        for (job, priority) in jobs {
            let w = DueCommand {
                priority: priority.parse().unwrap_or_default(),
                ..w.clone()
            };
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
            "Job" => match e.decode::<JobEvent>()? {
                JobEvent::JobSubmitted { slide_id, priority, .. } => self.submitted(tx, e, slide_id, priority).await,
                JobEvent::JobRetryRequested { .. } => {
                    let job = self.job(e).await?;
                    let slide = job
                        .slide_id
                        .ok_or_else(|| ApplyError::failed("a retried job has no slide"))?;
                    self.submitted(tx, e, slide, job.priority).await
                }
                JobEvent::JobRetryScheduled { not_before, .. } => {
                    let w = DueCommand {
                        priority: self.job(e).await?.priority,
                        ..Self::due_command(e, None, None)?
                    };
                    Self::schedule(tx, QUEUE, &e.aggregate_id, not_before, &w).await
                }
                JobEvent::JobStarted {
                    attempt, lease_until, ..
                } => {
                    // The admitted job is running: it no longer counts against the window. An
                    // upsert: the admission that queued it may commit its row after this event
                    // arrives (the worker can start a job before that transaction ends), and
                    // its insert then leaves this row as it is.
                    sqlx::query(
                        "INSERT INTO job_slots (job_id, tenant_id, priority, started) VALUES ($1, $2, 'routine', true) \
                         ON CONFLICT (job_id) DO UPDATE SET started = true",
                    )
                    .bind(uuid::Uuid::parse_str(&e.aggregate_id).map_err(ApplyError::failed)?)
                    .bind(&e.tenant_id)
                    .execute(&mut *tx)
                    .await?;
                    Self::schedule(
                        tx,
                        LEASE,
                        &e.aggregate_id,
                        lease_until,
                        &Self::due_command(e, Some(attempt), None)?,
                    )
                    .await
                }
                JobEvent::JobLeaseExtended { attempt, lease_until } => {
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
                    // The attempt is over: its slot is free (a retry is admitted again).
                    sqlx::query("DELETE FROM job_slots WHERE job_id = $1")
                        .bind(uuid::Uuid::parse_str(&e.aggregate_id).map_err(ApplyError::failed)?)
                        .execute(&mut *tx)
                        .await?;
                    Ok(())
                }
                JobEvent::JobQueued { .. } | JobEvent::JobProgressed { .. } | JobEvent::JobCancelRequested { .. } => {
                    Ok(())
                }
            },
            "Slide" => match e.decode::<SlideEvent>()? {
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

/// How ready jobs are admitted to the GPU queues (ADR 0027): STAT at once; routine while
/// fewer than `window` routine jobs are queued and not started, the tenant admitted least
/// recently first, none past `max_per_tenant` jobs admitted and not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// `Jobs__AdmissionWindow`.
    pub window: u32,
    /// `Jobs__MaxRunningPerTenant` (0 in the setting: none).
    pub max_per_tenant: Option<u32>,
}

impl Default for Admission {
    /// The settings' defaults: a window of 2, no cap.
    fn default() -> Self {
        Self {
            window: 2,
            max_per_tenant: None,
        }
    }
}

/// How long an admission holds a ready row while it sends the job's `Queue`: a crash in
/// between leaves the row due again after this.
pub const ADMISSION_CLAIM: Duration = Duration::from_secs(30);

/// A job queued this long without starting no longer holds a place in the admission window
/// (its message was lost, or no worker can take it): the window admits others around it.
pub const QUEUED_SLOT_LIMIT: Duration = Duration::from_secs(15 * 60);

/// A job ready to be queued: its row in the due-time table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub tenant: String,
    pub priority: Priority,
}

/// What is admitted and not finished: routine jobs queued and not started, and every admitted
/// job per tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    pub routine_waiting: u32,
    pub per_tenant: std::collections::HashMap<String, u32>,
}

/// Which of `ready` (oldest first) to admit now, by index: every STAT job; then routine jobs
/// while the window has room, one at a time to the eligible tenant admitted least recently
/// (`turns`; never admitted goes first), each tenant's oldest first.
pub fn choose(
    ready: &[Ready],
    slots: &Slots,
    turns: &std::collections::HashMap<String, DateTime<Utc>>,
    a: Admission,
) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..ready.len())
        .filter(|&i| ready[i].priority == Priority::Stat)
        .collect();
    let mut room = a.window.saturating_sub(slots.routine_waiting);
    let mut per_tenant = slots.per_tenant.clone();
    for &i in &chosen {
        *per_tenant.entry(ready[i].tenant.clone()).or_default() += 1;
    }
    // Each tenant's routine jobs, oldest first.
    let mut queues: std::collections::BTreeMap<&str, std::collections::VecDeque<usize>> = Default::default();
    for (i, r) in ready
        .iter()
        .enumerate()
        .filter(|(_, r)| r.priority == Priority::Routine)
    {
        queues.entry(r.tenant.as_str()).or_default().push_back(i);
    }
    let mut turns = turns.clone();
    let mut tick = 0i64;
    while room > 0 {
        let next = queues
            .iter()
            .filter(|(t, q)| {
                !q.is_empty()
                    && a.max_per_tenant
                        .is_none_or(|cap| per_tenant.get(**t).copied().unwrap_or(0) < cap)
            })
            .min_by_key(|(t, q)| (turns.get(**t).copied(), q[0]))
            .map(|(t, _)| t.to_string());
        let Some(tenant) = next else { break };
        let i = queues
            .get_mut(tenant.as_str())
            .and_then(|q| q.pop_front())
            .expect("a tenant with a job");
        chosen.push(i);
        room -= 1;
        *per_tenant.entry(tenant.clone()).or_default() += 1;
        // Later than every turn so far: this tenant goes to the back.
        tick += 1;
        let last = turns.values().max().copied().unwrap_or_else(Utc::now);
        turns.insert(tenant, last.max(Utc::now()) + chrono::Duration::microseconds(tick));
    }
    chosen
}

/// Takes due rows and sends their commands.
#[derive(Clone)]
pub struct DueRunner {
    pool: PgPool,
    commands: Commands,
    /// How long to wait when nothing was due.
    pub idle_poll: Duration,
    /// How ready jobs are admitted.
    pub admission: Admission,
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
            admission: Admission::default(),
        }
    }

    /// Admits ready jobs (the `job.queue` rows due at `now`) as [`choose`] says, and queues
    /// them; returns how many rows were settled. Two steps, so that no transaction spans the
    /// commands: under an advisory lock (one admitter across handler tasks; a busy lock skips
    /// this turn), a short transaction reserves each chosen job's slot and claims its row for
    /// [`ADMISSION_CLAIM`]; then each `Queue` is sent, and its row deleted, or moved with the
    /// slot freed where the job was not queued.
    pub async fn admit(&self, now: DateTime<Utc>) -> Result<usize, sqlx::Error> {
        use sqlx::Row;
        let mut tx = self.pool.begin().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended('mira.admission', 0))")
                .fetch_one(&mut *tx)
                .await?;
        if !locked {
            return Ok(0);
        }
        // STAT rows, and each tenant's oldest (no more than one turn can take), however many
        // older rows other tenants have.
        let rows = sqlx::query(
            "SELECT key, due_at, payload FROM due_work WHERE kind = $1 AND key IN ( \
               SELECT key FROM ( \
                 SELECT key, coalesce(payload::jsonb ->> 'priority', 'routine') = 'stat' AS stat, \
                        row_number() OVER (PARTITION BY payload::jsonb ->> 'tenant' ORDER BY due_at, key) AS n \
                 FROM due_work WHERE kind = $1 AND due_at <= $2) r \
               WHERE r.stat OR r.n <= $3) \
             ORDER BY due_at, key LIMIT 2000 FOR UPDATE SKIP LOCKED",
        )
        .bind(QUEUE)
        .bind(now)
        .bind(i64::from(self.admission.window))
        .fetch_all(&mut *tx)
        .await?;
        let mut ready = Vec::new();
        let mut items = Vec::new();
        let mut settled = 0;
        for r in rows {
            let (key, payload): (String, String) = (r.try_get("key")?, r.try_get("payload")?);
            match (serde_json::from_str::<DueCommand>(&payload), JobId::parse(&key)) {
                (Ok(w), Ok(id)) if TenantId::parse(&w.tenant).is_ok() => {
                    ready.push(Ready {
                        tenant: w.tenant.clone(),
                        priority: w.priority,
                    });
                    items.push((key, w, id));
                }
                _ => {
                    tracing::error!(kind = QUEUE, key, "unreadable due row dropped");
                    due::cancel(&mut tx, QUEUE, &key).await?;
                    settled += 1;
                }
            }
        }
        if ready.is_empty() {
            tx.commit().await?;
            return Ok(settled);
        }
        let mut slots = Slots::default();
        let held: Vec<(String, String, bool)> = sqlx::query_as("SELECT tenant_id, priority, started FROM job_slots")
            .fetch_all(&mut *tx)
            .await?;
        for (tenant, priority, started) in held {
            *slots.per_tenant.entry(tenant).or_default() += 1;
            if priority != "stat" && !started {
                slots.routine_waiting += 1;
            }
        }
        let turns: std::collections::HashMap<String, DateTime<Utc>> =
            sqlx::query_as("SELECT tenant_id, last_admitted FROM admission_turns")
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
        let chosen = choose(&ready, &slots, &turns, self.admission);
        let claim = now + chrono::Duration::from_std(ADMISSION_CLAIM).unwrap_or_default();
        for &i in &chosen {
            let (key, w, id) = &items[i];
            // The slot first: the job's JobStarted, or its end, may reach the handlers before
            // this runner has done anything more.
            sqlx::query(
                "INSERT INTO job_slots (job_id, tenant_id, priority) VALUES ($1, $2, $3) \
                 ON CONFLICT (job_id) DO UPDATE SET priority = EXCLUDED.priority",
            )
            .bind(id.as_uuid())
            .bind(&w.tenant)
            .bind(w.priority.as_str())
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE due_work SET due_at = $3 WHERE kind = $1 AND key = $2")
                .bind(QUEUE)
                .bind(key)
                .bind(claim)
                .execute(&mut *tx)
                .await?;
            if w.priority == Priority::Routine {
                sqlx::query(
                    "INSERT INTO admission_turns (tenant_id, last_admitted) VALUES ($1, clock_timestamp()) \
                     ON CONFLICT (tenant_id) DO UPDATE SET last_admitted = EXCLUDED.last_admitted",
                )
                .bind(&w.tenant)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        for &i in &chosen {
            let (key, w, id) = &items[i];
            // Admission continues the trace of the job's request.
            let span = tracing::info_span!("handlers.admit", job_id = %id);
            mira_telemetry::follow(&span, &w.traceparent);
            let ctx = CommandContext {
                tenant: TenantId::parse(&w.tenant).expect("checked above"),
                actor: Actor::system("handlers"),
                correlation_id: w.correlation_id,
                causation_id: w.causation_id,
                traceparent: span.in_scope(|| mira_telemetry::traceparent_within(&w.traceparent)),
                idempotency_key: None,
            };
            let r = self
                .commands
                .job(&ctx, *id, JobCommand::Queue { now })
                .instrument(span)
                .await;
            let queued = r.is_ok();
            let mut conn = self.pool.acquire().await?;
            match settle(QUEUE, key, r, now) {
                None => due::cancel(&mut conn, QUEUE, key).await?,
                Some(later) => {
                    sqlx::query("UPDATE due_work SET due_at = $3 WHERE kind = $1 AND key = $2")
                        .bind(QUEUE)
                        .bind(key)
                        .bind(later)
                        .execute(&mut *conn)
                        .await?;
                }
            }
            if !queued {
                // Not queued now (moved on, not due, a conflict): the slot is not its.
                sqlx::query("DELETE FROM job_slots WHERE job_id = $1 AND NOT started")
                    .bind(id.as_uuid())
                    .execute(&mut *conn)
                    .await?;
            }
            settled += 1;
        }
        Ok(settled)
    }

    /// Frees the slots no admitted job holds any more: the job's attempt ended (its end
    /// handled by a handler of the release before, or lost in a race), or it has been queued
    /// for [`QUEUED_SLOT_LIMIT`] without starting (its message lost: it no longer holds the
    /// window). The log says which; slots younger than a minute are left alone.
    pub async fn reconcile_slots(&self) -> Result<usize, sqlx::Error> {
        let held: Vec<(uuid::Uuid, String, bool, DateTime<Utc>)> = sqlx::query_as(
            "SELECT job_id, tenant_id, started, admitted_at FROM job_slots WHERE admitted_at < now() - interval '1 minute'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut freed = 0;
        for (job, tenant, started, admitted_at) in held {
            let Ok(t) = TenantId::parse(&tenant) else { continue };
            let state = match self.commands.load_job(&t, JobId(job)).await {
                Ok(s) => s.map(|j| j.status),
                Err(e) => {
                    tracing::warn!(job_id = %job, error = %e, "cannot read a job to check its slot");
                    continue;
                }
            };
            let stale = Utc::now() - chrono::Duration::from_std(QUEUED_SLOT_LIMIT).unwrap_or_default();
            let keep = match state {
                Some(JobStatus::Running | JobStatus::CancelRequested) => {
                    if !started {
                        sqlx::query("UPDATE job_slots SET started = true WHERE job_id = $1")
                            .bind(job)
                            .execute(&self.pool)
                            .await?;
                    }
                    true
                }
                Some(JobStatus::Queued) => started || admitted_at > stale,
                _ => false,
            };
            if !keep {
                sqlx::query("DELETE FROM job_slots WHERE job_id = $1 AND admitted_at = $2")
                    .bind(job)
                    .bind(admitted_at)
                    .execute(&self.pool)
                    .await?;
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Runs every row due at `now`; returns how many were taken.
    pub async fn run_once(&self, now: DateTime<Utc>) -> Result<usize, sqlx::Error> {
        let mut n = 0;
        // Admission's trouble must not hold back lease expiry and the slide waits.
        match self.admit(now).await {
            Ok(k) => n += k,
            Err(e) => tracing::warn!(error = %e, "admission failed; trying again"),
        }
        for kind in [FAIL, LEASE, SLIDE_WAIT] {
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
                    // A timeout, a retry or a slide's wait: in the trace of the event that set it.
                    let span = tracing::info_span!("handlers.due", kind = %item.kind, job_id = %job);
                    mira_telemetry::follow(&span, &w.traceparent);
                    let ctx = CommandContext {
                        tenant: tenant.clone(),
                        actor: Actor::system("handlers"),
                        correlation_id: w.correlation_id,
                        causation_id: w.causation_id,
                        traceparent: span.in_scope(|| mira_telemetry::traceparent_within(&w.traceparent)),
                        idempotency_key: None,
                    };
                    if item.kind == SLIDE_WAIT {
                        return slide_wait_over(conn, &commands, &ctx, id, &w, now)
                            .instrument(span)
                            .await;
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
                    let r = commands.job(&ctx, id, command).instrument(span).await;
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
        let mut reconciled = std::time::Instant::now();
        while !shutdown.is_cancelled() {
            if reconciled.elapsed() >= Duration::from_secs(60) {
                reconciled = std::time::Instant::now();
                if let Err(e) = self.reconcile_slots().await {
                    tracing::warn!(error = %e, "checking the admission slots failed");
                }
            }
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
    admission: Admission,
    shutdown: CancellationToken,
) -> Result<(), mira_bus::BusError> {
    let consumer = mira_bus::consumer::Consumer::new(
        mira_eventlog::EventLog::new(pool.clone()),
        queue,
        Arc::new(Lifecycle::new(commands.clone()).with_slide_wait(slide_wait)),
        mira_bus::consumer::ConsumerConfig::for_group(mira_bus::Group::Handlers),
    );
    let mut runner = DueRunner::new(pool, commands);
    runner.admission = admission;
    let stop = shutdown.clone();
    let due = tokio::spawn(async move { runner.run(stop).await });
    let r = consumer.run(shutdown.clone()).await;
    shutdown.cancel();
    let _ = due.await;
    r
}

#[cfg(test)]
mod admission_tests {
    use super::*;
    use std::collections::HashMap;

    fn ready(spec: &[(&str, Priority)]) -> Vec<Ready> {
        spec.iter()
            .map(|(t, p)| Ready {
                tenant: (*t).to_owned(),
                priority: *p,
            })
            .collect()
    }

    const R: Priority = Priority::Routine;
    const S: Priority = Priority::Stat;

    #[test]
    fn stat_is_admitted_whatever_the_window() {
        let r = ready(&[("a", R), ("a", S), ("b", R)]);
        let full = Slots {
            routine_waiting: 2,
            ..Default::default()
        };
        assert_eq!(choose(&r, &full, &HashMap::new(), Admission::default()), [1]);
    }

    #[test]
    fn a_lone_tenant_fills_the_window_oldest_first() {
        let r = ready(&[("a", R), ("a", R), ("a", R), ("a", R)]);
        assert_eq!(
            choose(&r, &Slots::default(), &HashMap::new(), Admission::default()),
            [0, 1]
        );
        let one_waiting = Slots {
            routine_waiting: 1,
            ..Default::default()
        };
        assert_eq!(choose(&r, &one_waiting, &HashMap::new(), Admission::default()), [0]);
    }

    /// Tenant A has forty ready, B two: B, admitted never, goes first, then they alternate.
    #[test]
    fn tenants_take_turns() {
        let mut spec = vec![("a", R); 40];
        spec.extend([("b", R), ("b", R)]);
        let r = ready(&spec);
        let turns = HashMap::from([("a".to_owned(), Utc::now())]);
        let a = Admission {
            window: 4,
            max_per_tenant: None,
        };
        let got: Vec<&str> = choose(&r, &Slots::default(), &turns, a)
            .into_iter()
            .map(|i| r[i].tenant.as_str())
            .collect();
        assert_eq!(got, ["b", "a", "b", "a"]);
    }

    #[test]
    fn a_tenant_at_its_cap_waits_and_others_go_on() {
        let r = ready(&[("a", R), ("a", R), ("b", R)]);
        let slots = Slots {
            routine_waiting: 0,
            per_tenant: HashMap::from([("a".to_owned(), 3)]),
        };
        let a = Admission {
            window: 3,
            max_per_tenant: Some(3),
        };
        assert_eq!(choose(&r, &slots, &HashMap::new(), a), [2]);
        // STAT is not held back by the cap.
        let r = ready(&[("a", S)]);
        assert_eq!(choose(&r, &slots, &HashMap::new(), a), [0]);
    }
}
