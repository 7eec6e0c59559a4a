//! The Job aggregate (DESIGN §3).
//!
//! ```text
//! submitted ─Queue─▶ queued ─Start(n)─▶ running ─Succeed(n)─▶ succeeded
//!     │                 ▲                  │ Fail(n) / ExpireLease(n)
//!     │ FailForSlide    │ Queue (due)      ▼
//!     ▼                 └──────────── retry_scheduled      (or failed, after the last attempt)
//!   failed
//! Cancel: immediate unless running; while running → cancel_requested → ConfirmCancelled(n).
//! Retry (by a user) from failed or cancelled → submitted, with a fresh attempt budget.
//! ```
//!
//! Commands from a worker carry the attempt number. A command for any attempt other than the
//! current one is refused with `StaleAttempt`; with the terminal states this fencing makes two
//! `JobSucceeded` impossible.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use mira_events::{JobEvent, JobId, JobSpec, Priority, SlideId, TenantId, Usage};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    #[default]
    New,
    Submitted,
    Queued,
    Running,
    RetryScheduled,
    CancelRequested,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// The API's name for the status (DESIGN §7).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Submitted => "submitted",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::RetryScheduled => "retry_scheduled",
            Self::CancelRequested => "cancel_requested",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Every status a submitted job can be in: what the API shows and filters on (`new` is
    /// the state before the first event, never stored).
    pub const SHOWN: [JobStatus; 8] = [
        Self::Submitted,
        Self::Queued,
        Self::Running,
        Self::RetryScheduled,
        Self::CancelRequested,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The status named `s` among [`Self::SHOWN`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::SHOWN.into_iter().find(|x| x.as_str() == s)
    }
}

impl utoipa::PartialSchema for JobStatus {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        crate::schema::status_schema(Self::SHOWN.iter().map(|s| s.as_str()))
    }
}

impl utoipa::ToSchema for JobStatus {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub status: JobStatus,
    pub slide_id: Option<SlideId>,
    /// What the job runs: its kind and parameters, from the submission. Kept as the two fields
    /// `kind` and `params` beside the others, the shape the read models' `state` column has
    /// always held, so rows written before the spec was typed read as they are (and a release
    /// before this one reads these).
    #[serde(flatten)]
    pub spec: Option<JobSpec>,
    /// The attempts one submission (or one user retry) may use.
    pub attempt_budget: u32,
    /// The highest attempt number allowed before failure is final.
    pub max_attempts: u32,
    /// The current (or last) attempt; 0 before the first `JobQueued`.
    pub attempt: u32,
    pub worker_id: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub retry_not_before: Option<DateTime<Utc>>,
    pub progress: Option<(u64, u64)>,
    pub manifest_key: Option<String>,
    pub manifest_sha256: Option<String>,
    pub failure: Option<String>,
    /// Attempts the worker killed for making no progress (or running past its budget).
    #[serde(default)]
    pub stalls: u32,
    /// STAT or routine, from the submission; every attempt is queued with it.
    #[serde(default)]
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobCommand {
    /// A spec this build cannot read ([`JobSpec::Unknown`]) is refused.
    Submit {
        slide_id: SlideId,
        spec: JobSpec,
        max_attempts: u32,
        priority: Priority,
    },
    /// By the handlers: the slide is verified (from `submitted`), or a retry is due.
    Queue {
        now: DateTime<Utc>,
    },
    /// By the handlers: the slide was rejected while the job waited.
    FailForSlide {
        reason: String,
    },
    Start {
        attempt: u32,
        worker_id: String,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    Heartbeat {
        attempt: u32,
        lease_until: DateTime<Utc>,
    },
    Progress {
        attempt: u32,
        done: u64,
        total: u64,
    },
    Succeed {
        attempt: u32,
        manifest_key: String,
        manifest_sha256: String,
        usage: Usage,
    },
    Fail {
        attempt: u32,
        reason: String,
        retryable: bool,
        /// The worker killed the attempt for making no progress: retryable once per job.
        stalled: bool,
        now: DateTime<Utc>,
    },
    ExpireLease {
        attempt: u32,
        now: DateTime<Utc>,
    },
    Cancel {
        reason: Option<String>,
    },
    ConfirmCancelled {
        attempt: u32,
    },
    Retry,
}

impl JobCommand {
    /// The command's name in `/metrics` (`mira_command_seconds{command}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Submit { .. } => "job.submit",
            Self::Queue { .. } => "job.queue",
            Self::FailForSlide { .. } => "job.fail_for_slide",
            Self::Start { .. } => "job.start",
            Self::Heartbeat { .. } => "job.heartbeat",
            Self::Progress { .. } => "job.progress",
            Self::Succeed { .. } => "job.succeed",
            Self::Fail { .. } => "job.fail",
            Self::ExpireLease { .. } => "job.expire_lease",
            Self::Cancel { .. } => "job.cancel",
            Self::ConfirmCancelled { .. } => "job.confirm_cancelled",
            Self::Retry => "job.retry",
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Submit { .. } => "submit",
            Self::Queue { .. } => "queue",
            Self::FailForSlide { .. } => "fail",
            Self::Start { .. } => "start",
            Self::Heartbeat { .. } => "extend the lease of",
            Self::Progress { .. } => "report progress on",
            Self::Succeed { .. } => "succeed",
            Self::Fail { .. } => "fail",
            Self::ExpireLease { .. } => "expire the lease of",
            Self::Cancel { .. } => "cancel",
            Self::ConfirmCancelled { .. } => "confirm cancellation of",
            Self::Retry => "retry",
        }
    }

    /// The attempt a worker's command is fenced on.
    fn attempt(&self) -> Option<u32> {
        match self {
            Self::Start { attempt, .. }
            | Self::Heartbeat { attempt, .. }
            | Self::Progress { attempt, .. }
            | Self::Succeed { attempt, .. }
            | Self::Fail { attempt, .. }
            | Self::ExpireLease { attempt, .. }
            | Self::ConfirmCancelled { attempt } => Some(*attempt),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    #[error("job already exists")]
    AlreadyExists,
    #[error("job does not exist")]
    NotFound,
    #[error("cannot {command} a job that is {status}")]
    InvalidTransition {
        command: &'static str,
        status: &'static str,
    },
    #[error("attempt {got} is stale: the job is on attempt {current}")]
    StaleAttempt { current: u32, got: u32 },
    #[error("the retry is not due before {0}")]
    NotDue(DateTime<Utc>),
    #[error("the lease of attempt {attempt} runs until {until}")]
    LeaseNotExpired { attempt: u32, until: DateTime<Utc> },
    #[error("cancellation was requested; the attempt must stop")]
    CancelRequested,
    #[error("invalid job command: {0}")]
    Invalid(String),
}

/// Maximum attempts a submission may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

/// The wait before attempt `failed_attempt + 1`: 10 s, doubling, at most 15 minutes.
pub fn retry_backoff(failed_attempt: u32) -> Duration {
    let secs = 10u64.saturating_mul(1u64 << failed_attempt.saturating_sub(1).min(16));
    Duration::seconds(secs.min(900) as i64)
}

/// Where attempt `attempt` of a job stores its results (DESIGN §8), with a trailing `/`.
pub fn results_prefix(tenant: &TenantId, job: JobId, attempt: u32) -> String {
    format!("results/{}/{job}/attempt-{attempt}/", tenant.as_str())
}

/// The one key an attempt's manifest may have: `manifest.json` under its results prefix.
pub fn manifest_key(tenant: &TenantId, job: JobId, attempt: u32) -> String {
    format!("{}manifest.json", results_prefix(tenant, job, attempt))
}

impl JobCommand {
    /// Checks what the command names against the job it is for and the caller's tenant, which
    /// the aggregate does not hold. A success may only name its own attempt's manifest: a
    /// manifest key elsewhere (another tenant's objects, another attempt's) is refused, so the
    /// results endpoint can never be pointed outside the job.
    pub fn check_scope(&self, tenant: &TenantId, job: JobId) -> Result<(), JobError> {
        if let JobCommand::Succeed {
            attempt,
            manifest_key: key,
            ..
        } = self
        {
            let expected = manifest_key(tenant, job, *attempt);
            if *key != expected {
                return Err(JobError::Invalid(format!(
                    "the manifest of attempt {attempt} must be {expected}"
                )));
            }
        }
        Ok(())
    }
}

impl Job {
    fn refuse(&self, command: &JobCommand) -> JobError {
        if self.status == JobStatus::New {
            JobError::NotFound
        } else {
            JobError::InvalidTransition {
                command: command.name(),
                status: self.status.as_str(),
            }
        }
    }

    /// What follows a failed or timed-out attempt.
    fn after_attempt(&self, retryable: bool, reason: &str, now: DateTime<Utc>) -> JobEvent {
        if self.status == JobStatus::CancelRequested {
            JobEvent::JobCancelled {}
        } else if retryable && self.attempt < self.max_attempts {
            JobEvent::JobRetryScheduled {
                next_attempt: self.attempt + 1,
                not_before: now + retry_backoff(self.attempt),
            }
        } else {
            JobEvent::JobFailed {
                reason: if retryable {
                    format!("{reason} (after {} attempts)", self.attempt)
                } else {
                    reason.to_owned()
                },
            }
        }
    }

    /// A worker's command names the current attempt, and the attempt is in a state that takes
    /// it; anything else is refused (a stale worker, a cancelled attempt).
    fn fence(&self, command: &JobCommand) -> Result<(), JobError> {
        use JobStatus as S;
        let Some(attempt) = command.attempt() else {
            return Ok(());
        };
        if attempt != self.attempt {
            return Err(JobError::StaleAttempt {
                current: self.attempt,
                got: attempt,
            });
        }
        // A cancellation stops the attempt: its heartbeats and progress are refused, so the
        // worker stops at once instead of renewing a lease nobody wants.
        if self.status == S::CancelRequested
            && matches!(command, JobCommand::Heartbeat { .. } | JobCommand::Progress { .. })
        {
            return Err(JobError::CancelRequested);
        }
        let allowed = match command {
            JobCommand::Start { .. } => self.status == S::Queued,
            JobCommand::Succeed { .. } => self.status == S::Running,
            JobCommand::ConfirmCancelled { .. } => self.status == S::CancelRequested,
            _ => matches!(self.status, S::Running | S::CancelRequested),
        };
        if allowed {
            Ok(())
        } else {
            Err(self.refuse(command))
        }
    }

    /// `Submit`: a new job, its spec and budget checked.
    fn submit(
        &self,
        slide_id: SlideId,
        spec: &JobSpec,
        max_attempts: u32,
        priority: Priority,
    ) -> Result<Vec<JobEvent>, JobError> {
        if self.status != JobStatus::New {
            return Err(JobError::AlreadyExists);
        }
        if let JobSpec::Unknown { kind, .. } = spec {
            return Err(JobError::Invalid(format!(
                "{kind:?} with these parameters is not a job this version of Mira runs"
            )));
        }
        spec.validate().map_err(|e| JobError::Invalid(e.to_string()))?;
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&max_attempts) {
            return Err(JobError::Invalid(format!(
                "max_attempts must be 1 to {MAX_ATTEMPTS_LIMIT}"
            )));
        }
        Ok(vec![JobEvent::JobSubmitted {
            slide_id,
            spec: spec.clone(),
            max_attempts,
            priority,
        }])
    }

    /// `Fail`: the attempt's failure, and what follows it.
    fn fail(
        &self,
        attempt: u32,
        reason: &str,
        retryable: bool,
        stalled: bool,
        now: DateTime<Utc>,
    ) -> Result<Vec<JobEvent>, JobError> {
        if reason.trim().is_empty() {
            return Err(JobError::Invalid("a failure needs a reason".into()));
        }
        // Work that hung once on this slide and these parameters is tried again; work that
        // hangs a second time would hang every time, holding a worker each.
        let (retryable, reason) = if stalled && self.stalls >= 1 {
            (false, format!("{reason}; it stalled before too, so it is not retried"))
        } else {
            (retryable, reason.to_owned())
        };
        Ok(vec![
            JobEvent::JobAttemptFailed {
                attempt,
                reason: reason.clone(),
                retryable,
                stalled,
            },
            self.after_attempt(retryable, &reason, now),
        ])
    }

    /// Decides the events for `command`, or refuses it. Writes nothing.
    pub fn decide(&self, command: &JobCommand) -> Result<Vec<JobEvent>, JobError> {
        use JobStatus as S;
        if self.status == S::New && !matches!(command, JobCommand::Submit { .. }) {
            return Err(JobError::NotFound);
        }
        self.fence(command)?;
        let events = match command {
            JobCommand::Submit {
                slide_id,
                spec,
                max_attempts,
                priority,
            } => return self.submit(*slide_id, spec, *max_attempts, *priority),
            JobCommand::Queue { now } => match self.status {
                S::Submitted => vec![JobEvent::JobQueued {
                    attempt: self.attempt + 1,
                    priority: self.priority,
                }],
                S::RetryScheduled => {
                    let due = self.retry_not_before.unwrap_or(*now);
                    if *now < due {
                        return Err(JobError::NotDue(due));
                    }
                    vec![JobEvent::JobQueued {
                        attempt: self.attempt + 1,
                        priority: self.priority,
                    }]
                }
                _ => return Err(self.refuse(command)),
            },
            JobCommand::FailForSlide { reason } => {
                if self.status != S::Submitted {
                    return Err(self.refuse(command));
                }
                vec![JobEvent::JobFailed { reason: reason.clone() }]
            }
            JobCommand::Start {
                attempt,
                worker_id,
                lease_until,
                now,
            } => {
                if worker_id.is_empty() {
                    return Err(JobError::Invalid("worker_id must not be empty".into()));
                }
                if lease_until <= now {
                    return Err(JobError::Invalid("lease_until must be in the future".into()));
                }
                vec![JobEvent::JobStarted {
                    attempt: *attempt,
                    worker_id: worker_id.clone(),
                    lease_until: *lease_until,
                }]
            }
            JobCommand::Heartbeat { attempt, lease_until } => {
                vec![JobEvent::JobLeaseExtended {
                    attempt: *attempt,
                    lease_until: *lease_until,
                }]
            }
            JobCommand::Progress { attempt, done, total } => {
                if done > total {
                    return Err(JobError::Invalid("progress done exceeds total".into()));
                }
                vec![JobEvent::JobProgressed {
                    attempt: *attempt,
                    done: *done,
                    total: *total,
                }]
            }
            JobCommand::Succeed {
                attempt,
                manifest_key,
                manifest_sha256,
                usage,
            } => {
                if manifest_key.is_empty() || manifest_sha256.len() != 64 {
                    return Err(JobError::Invalid("success needs a manifest key and its SHA-256".into()));
                }
                vec![JobEvent::JobSucceeded {
                    attempt: *attempt,
                    manifest_key: manifest_key.clone(),
                    manifest_sha256: manifest_sha256.clone(),
                    usage: usage.clone(),
                }]
            }
            JobCommand::Fail {
                attempt,
                reason,
                retryable,
                stalled,
                now,
            } => return self.fail(*attempt, reason, *retryable, *stalled, *now),
            JobCommand::ExpireLease { attempt, now } => {
                if let Some(until) = self.lease_until {
                    if *now < until {
                        return Err(JobError::LeaseNotExpired {
                            attempt: *attempt,
                            until,
                        });
                    }
                }
                vec![
                    JobEvent::JobTimedOut { attempt: *attempt },
                    self.after_attempt(true, "the worker's lease expired", *now),
                ]
            }
            JobCommand::Cancel { reason } => match self.status {
                S::Submitted | S::Queued | S::RetryScheduled => vec![
                    JobEvent::JobCancelRequested { reason: reason.clone() },
                    JobEvent::JobCancelled {},
                ],
                S::Running => vec![JobEvent::JobCancelRequested { reason: reason.clone() }],
                _ => return Err(self.refuse(command)),
            },
            JobCommand::ConfirmCancelled { .. } => vec![JobEvent::JobCancelled {}],
            JobCommand::Retry => {
                if !matches!(self.status, S::Failed | S::Cancelled) {
                    return Err(self.refuse(command));
                }
                vec![JobEvent::JobRetryRequested {
                    next_attempt: self.attempt + 1,
                    max_attempts: self.attempt + self.attempt_budget,
                }]
            }
        };
        Ok(events)
    }
}

impl Aggregate for Job {
    const TYPE: &'static str = "Job";
    type Command = JobCommand;
    type Event = JobEvent;
    type Error = JobError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(&command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            JobEvent::JobSubmitted {
                slide_id,
                spec,
                max_attempts,
                priority,
            } => {
                self.status = JobStatus::Submitted;
                self.priority = priority;
                self.slide_id = Some(slide_id);
                self.spec = Some(spec);
                self.attempt_budget = max_attempts;
                self.max_attempts = max_attempts;
            }
            JobEvent::JobQueued { attempt, .. } => {
                self.status = JobStatus::Queued;
                self.attempt = attempt;
                self.retry_not_before = None;
                self.worker_id = None;
                self.lease_until = None;
                self.progress = None;
            }
            JobEvent::JobStarted {
                worker_id, lease_until, ..
            } => {
                self.status = JobStatus::Running;
                self.worker_id = Some(worker_id);
                self.lease_until = Some(lease_until);
            }
            JobEvent::JobLeaseExtended { lease_until, .. } => self.lease_until = Some(lease_until),
            JobEvent::JobProgressed { done, total, .. } => self.progress = Some((done, total)),
            JobEvent::JobSucceeded {
                manifest_key,
                manifest_sha256,
                ..
            } => {
                self.status = JobStatus::Succeeded;
                self.manifest_key = Some(manifest_key);
                self.manifest_sha256 = Some(manifest_sha256);
                self.lease_until = None;
            }
            JobEvent::JobAttemptFailed { reason, stalled, .. } => {
                self.stalls += u32::from(stalled);
                self.failure = Some(reason);
                self.lease_until = None;
            }
            JobEvent::JobTimedOut { .. } => {
                self.failure = Some("the worker's lease expired".into());
                self.lease_until = None;
            }
            JobEvent::JobRetryScheduled { not_before, .. } => {
                self.status = JobStatus::RetryScheduled;
                self.retry_not_before = Some(not_before);
            }
            JobEvent::JobFailed { reason } => {
                self.status = JobStatus::Failed;
                self.failure = Some(reason);
            }
            JobEvent::JobCancelRequested { .. } => self.status = JobStatus::CancelRequested,
            JobEvent::JobCancelled {} => {
                self.status = JobStatus::Cancelled;
                self.lease_until = None;
            }
            JobEvent::JobRetryRequested { max_attempts, .. } => {
                self.status = JobStatus::Submitted;
                self.max_attempts = max_attempts;
                self.failure = None;
            }
        }
    }
}

#[cfg(test)]
mod tests;
