//! Job events (DESIGN §3):
//! submitted → queued → started (attempt n, by worker w, lease until t) → progressed →
//! succeeded | failed, with retries, time-outs and cancellation.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};

use crate::ids::SlideId;
use crate::params::JobSpec;

/// What a finished attempt consumed, for per-tenant usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// `cpu` or `gpu`.
    pub device: String,
    pub device_seconds: f64,
    pub bytes_written: u64,
}

/// How soon a job should run. A STAT job (a frozen section during surgery) is taken before
/// every routine one waiting; nothing running is stopped for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Routine,
    Stat,
}

impl Priority {
    /// The API's and the message attribute's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Routine => "routine",
            Self::Stat => "stat",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "routine" => Ok(Self::Routine),
            "stat" => Ok(Self::Stat),
            other => Err(format!("unknown priority {other:?}: stat or routine")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum JobEvent {
    /// Version 3. Version 1 had no `max_attempts`, version 2 no `priority`; their upcasters
    /// supply the old default and `routine`. The spec is stored as the two fields `kind` and
    /// `params` it always had; one this build cannot read is [`JobSpec::Unknown`].
    JobSubmitted {
        slide_id: SlideId,
        #[serde(flatten)]
        spec: JobSpec,
        max_attempts: u32,
        priority: Priority,
    },
    /// The job may now be taken by a worker, as attempt `attempt`. Version 2: it carries the
    /// job's priority, which the relay publishes as the `priority` message attribute (version
    /// 1 reads as routine).
    JobQueued {
        attempt: u32,
        priority: Priority,
    },
    JobStarted {
        attempt: u32,
        worker_id: String,
        lease_until: DateTime<Utc>,
    },
    JobLeaseExtended {
        attempt: u32,
        lease_until: DateTime<Utc>,
    },
    JobProgressed {
        attempt: u32,
        done: u64,
        total: u64,
    },
    JobSucceeded {
        attempt: u32,
        manifest_key: String,
        manifest_sha256: String,
        usage: Usage,
    },
    /// One attempt failed; a `JobRetryScheduled` or a final `JobFailed` follows it.
    JobAttemptFailed {
        attempt: u32,
        reason: String,
        retryable: bool,
        /// The worker killed the attempt: no progress for `Worker__StallSeconds`, or past
        /// `Worker__MaxAttemptSeconds`. A second such attempt of the job is not retried.
        /// Absent (false) in events recorded before it existed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stalled: bool,
    },
    /// The attempt's lease expired without a result.
    JobTimedOut {
        attempt: u32,
    },
    JobRetryScheduled {
        next_attempt: u32,
        not_before: DateTime<Utc>,
    },
    /// Final: no further automatic transitions.
    JobFailed {
        reason: String,
    },
    JobCancelRequested {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    JobCancelled {},
    /// A user asked to run a failed or cancelled job again, with a fresh attempt budget.
    JobRetryRequested {
        next_attempt: u32,
        max_attempts: u32,
    },
}

impl JobEvent {
    /// Every event type a job's stream may hold, in the order a job meets them: the auditor's
    /// list of types to filter by. `name` of each variant is one of them (a test checks it).
    pub const NAMES: &'static [&'static str] = &[
        "JobSubmitted",
        "JobQueued",
        "JobStarted",
        "JobLeaseExtended",
        "JobProgressed",
        "JobSucceeded",
        "JobAttemptFailed",
        "JobTimedOut",
        "JobRetryScheduled",
        "JobFailed",
        "JobCancelRequested",
        "JobCancelled",
        "JobRetryRequested",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Self::JobSubmitted { .. } => "JobSubmitted",
            Self::JobQueued { .. } => "JobQueued",
            Self::JobStarted { .. } => "JobStarted",
            Self::JobLeaseExtended { .. } => "JobLeaseExtended",
            Self::JobProgressed { .. } => "JobProgressed",
            Self::JobSucceeded { .. } => "JobSucceeded",
            Self::JobAttemptFailed { .. } => "JobAttemptFailed",
            Self::JobTimedOut { .. } => "JobTimedOut",
            Self::JobRetryScheduled { .. } => "JobRetryScheduled",
            Self::JobFailed { .. } => "JobFailed",
            Self::JobCancelRequested { .. } => "JobCancelRequested",
            Self::JobCancelled { .. } => "JobCancelled",
            Self::JobRetryRequested { .. } => "JobRetryRequested",
        }
    }
}

impl DomainEvent for JobEvent {
    fn event_type(&self) -> String {
        self.name().to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            Self::JobSubmitted { .. } => "3",
            Self::JobQueued { .. } => "2",
            _ => "1",
        }
        .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{JobSpec, PreprocessParams};

    /// A `JobSubmitted` is written with the bytes it had while its spec was two loose fields
    /// (`kind`, and `params` as a JSON value, so with its keys sorted), whether serialised
    /// directly or through a JSON value (as the store does), and reads back to the same event.
    #[test]
    fn job_submitted_keeps_its_bytes() {
        let e = JobEvent::JobSubmitted {
            slide_id: SlideId::parse("0190d5a4-0000-7000-8000-000000000002").unwrap(),
            spec: JobSpec::Preprocess(PreprocessParams::default()),
            max_attempts: 3,
            priority: Priority::Routine,
        };
        let direct = r#"{"type":"JobSubmitted","slide_id":"0190d5a4-0000-7000-8000-000000000002","kind":"wsi.preprocess","params":{"format":"jpeg","normalize":"none","overlap":1,"quality":80,"tile_size":254,"tissue":true},"max_attempts":3,"priority":"routine"}"#;
        assert_eq!(serde_json::to_string(&e).unwrap(), direct);
        let sorted = r#"{"kind":"wsi.preprocess","max_attempts":3,"params":{"format":"jpeg","normalize":"none","overlap":1,"quality":80,"tile_size":254,"tissue":true},"priority":"routine","slide_id":"0190d5a4-0000-7000-8000-000000000002","type":"JobSubmitted"}"#;
        assert_eq!(serde_json::to_value(&e).unwrap().to_string(), sorted);
        assert_eq!(serde_json::from_str::<JobEvent>(direct).unwrap(), e);
        // A kind from another version reads, and writes back as stored.
        let other = r#"{"type":"JobSubmitted","slide_id":"0190d5a4-0000-7000-8000-000000000002","kind":"wsi.later","params":{"x":1},"max_attempts":3,"priority":"stat"}"#;
        let read: JobEvent = serde_json::from_str(other).unwrap();
        assert!(
            matches!(&read, JobEvent::JobSubmitted { spec: JobSpec::Unknown { kind, .. }, .. } if kind == "wsi.later")
        );
        assert_eq!(serde_json::to_string(&read).unwrap(), other);
    }

    /// `NAMES` is every variant: serde's "unknown variant" error lists them all.
    #[test]
    fn names_are_every_event_type() {
        let err = serde_json::from_str::<JobEvent>(r#"{"type":"NoSuchEvent"}"#)
            .unwrap_err()
            .to_string();
        let listed: Vec<&str> = err.split('`').skip(3).step_by(2).collect();
        assert_eq!(listed, JobEvent::NAMES, "{err}");
    }
}
