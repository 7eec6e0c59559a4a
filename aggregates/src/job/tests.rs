//! Given/when/then for every transition of the Job aggregate, and property tests over
//! arbitrary command sequences.

use super::*;
use chrono::TimeZone;
use cqrs_es::test::TestFramework;
use proptest::prelude::*;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_767_225_600 + secs, 0).unwrap()
}

fn slide() -> SlideId {
    SlideId::parse("0190d5a4-0000-7000-8000-000000000002").unwrap()
}

fn spec() -> JobSpec {
    JobSpec::Preprocess(Default::default())
}

fn submitted(max_attempts: u32) -> JobEvent {
    JobEvent::JobSubmitted {
        slide_id: slide(),
        spec: spec(),
        max_attempts,
        priority: crate::Priority::Routine,
    }
}

fn started(attempt: u32) -> JobEvent {
    JobEvent::JobStarted {
        attempt,
        worker_id: "w1".into(),
        lease_until: t(60),
    }
}

fn usage() -> Usage {
    Usage {
        device: "cpu".into(),
        device_seconds: 1.5,
        bytes_written: 10,
    }
}

fn succeed(attempt: u32) -> JobCommand {
    JobCommand::Succeed {
        attempt,
        manifest_key: "results/j/1/manifest.json".into(),
        manifest_sha256: "a".repeat(64),
        usage: usage(),
    }
}

fn running(attempt: u32) -> Vec<JobEvent> {
    vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt,
            priority: crate::Priority::Routine,
        },
        started(attempt),
    ]
}

fn given(events: Vec<JobEvent>) -> cqrs_es::test::AggregateTestExecutor<Job> {
    TestFramework::<Job>::with(()).given(events)
}

#[test]
fn submit_creates_the_job() {
    TestFramework::<Job>::with(())
        .given_no_previous_events()
        .when(JobCommand::Submit {
            slide_id: slide(),
            spec: spec(),
            max_attempts: 3,
            priority: crate::Priority::Routine,
        })
        .then_expect_events(vec![submitted(3)]);
}

#[test]
fn submit_validates_and_refuses_duplicates() {
    let cmd = |max_attempts, spec| JobCommand::Submit {
        slide_id: slide(),
        spec,
        max_attempts,
        priority: crate::Priority::Routine,
    };
    given(vec![submitted(3)])
        .when(cmd(3, spec()))
        .then_expect_error(JobError::AlreadyExists);
    let r = TestFramework::<Job>::with(())
        .given_no_previous_events()
        .when(cmd(0, spec()))
        .inspect_result();
    assert!(matches!(r, Err(JobError::Invalid(_))));
    // A spec this build cannot read (from a stored event of another version) is never
    // submitted again.
    let r = TestFramework::<Job>::with(())
        .given_no_previous_events()
        .when(cmd(3, JobSpec::from_stored("wsi.preprocess", &serde_json::json!([1]))))
        .inspect_result();
    assert!(
        matches!(r, Err(JobError::Invalid(ref m)) if m.contains("not a job")),
        "{r:?}"
    );
    // Parameters out of range are refused here too, however the command was made.
    let p = mira_events::params::PreprocessParams {
        overlap: 200,
        ..Default::default()
    };
    let r = TestFramework::<Job>::with(())
        .given_no_previous_events()
        .when(cmd(3, JobSpec::Preprocess(p)))
        .inspect_result();
    assert!(
        matches!(r, Err(JobError::Invalid(ref m)) if m.starts_with("params.overlap")),
        "{r:?}"
    );
}

#[test]
fn commands_on_a_missing_job_are_not_found() {
    TestFramework::<Job>::with(())
        .given_no_previous_events()
        .when(JobCommand::Cancel { reason: None })
        .then_expect_error(JobError::NotFound);
    TestFramework::<Job>::with(())
        .given_no_previous_events()
        .when(succeed(1))
        .then_expect_error(JobError::NotFound);
}

#[test]
fn queue_waits_for_the_slide_then_queues_attempt_one() {
    given(vec![submitted(3)])
        .when(JobCommand::Queue { now: t(0) })
        .then_expect_events(vec![JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        }]);
    given(vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
    ])
    .when(JobCommand::Queue { now: t(0) })
    .then_expect_error(JobError::InvalidTransition {
        command: "queue",
        status: "queued",
    });
}

#[test]
fn rejected_slide_fails_a_waiting_job() {
    given(vec![submitted(3)])
        .when(JobCommand::FailForSlide {
            reason: "slide rejected: not a slide".into(),
        })
        .then_expect_events(vec![JobEvent::JobFailed {
            reason: "slide rejected: not a slide".into(),
        }]);
    given(vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
    ])
    .when(JobCommand::FailForSlide { reason: "x".into() })
    .then_expect_error(JobError::InvalidTransition {
        command: "fail",
        status: "queued",
    });
}

#[test]
fn start_takes_the_queued_attempt() {
    given(vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
    ])
    .when(JobCommand::Start {
        attempt: 1,
        worker_id: "w1".into(),
        lease_until: t(60),
        now: t(0),
    })
    .then_expect_events(vec![started(1)]);
}

#[test]
fn start_refuses_stale_attempts_and_double_starts() {
    given(vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
    ])
    .when(JobCommand::Start {
        attempt: 2,
        worker_id: "w".into(),
        lease_until: t(60),
        now: t(0),
    })
    .then_expect_error(JobError::StaleAttempt { current: 1, got: 2 });
    given(running(1))
        .when(JobCommand::Start {
            attempt: 1,
            worker_id: "w2".into(),
            lease_until: t(60),
            now: t(0),
        })
        .then_expect_error(JobError::InvalidTransition {
            command: "start",
            status: "running",
        });
    given(vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
    ])
    .when(JobCommand::Start {
        attempt: 1,
        worker_id: "w".into(),
        lease_until: t(0),
        now: t(0),
    })
    .then_expect_error(JobError::Invalid("lease_until must be in the future".into()));
}

#[test]
fn heartbeat_and_progress_while_running() {
    given(running(1))
        .when(JobCommand::Heartbeat {
            attempt: 1,
            lease_until: t(120),
        })
        .then_expect_events(vec![JobEvent::JobLeaseExtended {
            attempt: 1,
            lease_until: t(120),
        }]);
    given(running(1))
        .when(JobCommand::Progress {
            attempt: 1,
            done: 5,
            total: 10,
        })
        .then_expect_events(vec![JobEvent::JobProgressed {
            attempt: 1,
            done: 5,
            total: 10,
        }]);
    given(running(1))
        .when(JobCommand::Progress {
            attempt: 1,
            done: 11,
            total: 10,
        })
        .then_expect_error(JobError::Invalid("progress done exceeds total".into()));
    given(vec![
        submitted(3),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
    ])
    .when(JobCommand::Heartbeat {
        attempt: 1,
        lease_until: t(120),
    })
    .then_expect_error(JobError::InvalidTransition {
        command: "extend the lease of",
        status: "queued",
    });
}

#[test]
fn succeed_once() {
    given(running(1))
        .when(succeed(1))
        .then_expect_events(vec![JobEvent::JobSucceeded {
            attempt: 1,
            manifest_key: "results/j/1/manifest.json".into(),
            manifest_sha256: "a".repeat(64),
            usage: usage(),
        }]);
    let mut done = running(1);
    done.push(JobEvent::JobSucceeded {
        attempt: 1,
        manifest_key: "m".into(),
        manifest_sha256: "a".repeat(64),
        usage: usage(),
    });
    given(done)
        .when(succeed(1))
        .then_expect_error(JobError::InvalidTransition {
            command: "succeed",
            status: "succeeded",
        });
}

#[test]
fn a_stale_attempt_cannot_succeed() {
    let mut events = running(1);
    events.extend([
        JobEvent::JobTimedOut { attempt: 1 },
        JobEvent::JobRetryScheduled {
            next_attempt: 2,
            not_before: t(70),
        },
        JobEvent::JobQueued {
            attempt: 2,
            priority: crate::Priority::Routine,
        },
        started(2),
    ]);
    given(events)
        .when(succeed(1))
        .then_expect_error(JobError::StaleAttempt { current: 2, got: 1 });
}

#[test]
fn retryable_failure_schedules_a_retry_with_backoff() {
    given(running(1))
        .when(JobCommand::Fail {
            attempt: 1,
            reason: "oom".into(),
            retryable: true,
            stalled: false,
            now: t(10),
        })
        .then_expect_events(vec![
            JobEvent::JobAttemptFailed {
                attempt: 1,
                reason: "oom".into(),
                retryable: true,
                stalled: false,
            },
            JobEvent::JobRetryScheduled {
                next_attempt: 2,
                not_before: t(20),
            },
        ]);
}

#[test]
fn non_retryable_failure_is_final() {
    given(running(1))
        .when(JobCommand::Fail {
            attempt: 1,
            reason: "corrupt slide".into(),
            retryable: false,
            stalled: false,
            now: t(10),
        })
        .then_expect_events(vec![
            JobEvent::JobAttemptFailed {
                attempt: 1,
                reason: "corrupt slide".into(),
                retryable: false,
                stalled: false,
            },
            JobEvent::JobFailed {
                reason: "corrupt slide".into(),
            },
        ]);
}

#[test]
fn the_last_attempt_fails_for_good() {
    let events = vec![
        submitted(1),
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Routine,
        },
        started(1),
    ];
    given(events)
        .when(JobCommand::Fail {
            attempt: 1,
            reason: "oom".into(),
            retryable: true,
            stalled: false,
            now: t(10),
        })
        .then_expect_events(vec![
            JobEvent::JobAttemptFailed {
                attempt: 1,
                reason: "oom".into(),
                retryable: true,
                stalled: false,
            },
            JobEvent::JobFailed {
                reason: "oom (after 1 attempts)".into(),
            },
        ]);
}

#[test]
fn a_stalled_attempt_is_retried_once_and_a_second_stall_is_final() {
    let stall = |attempt| JobCommand::Fail {
        attempt,
        reason: "no progress for 300 s in stage pyramid".into(),
        retryable: true,
        stalled: true,
        now: t(10),
    };
    let first_stall = vec![
        JobEvent::JobAttemptFailed {
            attempt: 1,
            reason: "no progress for 300 s in stage pyramid".into(),
            retryable: true,
            stalled: true,
        },
        JobEvent::JobRetryScheduled {
            next_attempt: 2,
            not_before: t(20),
        },
    ];
    given(running(1)).when(stall(1)).then_expect_events(first_stall.clone());
    let mut once = running(1);
    once.extend(first_stall);
    once.extend([
        JobEvent::JobQueued {
            attempt: 2,
            priority: crate::Priority::Routine,
        },
        started(2),
    ]);
    let second = "no progress for 300 s in stage pyramid; it stalled before too, so it is not retried";
    given(once.clone()).when(stall(2)).then_expect_events(vec![
        JobEvent::JobAttemptFailed {
            attempt: 2,
            reason: second.into(),
            retryable: false,
            stalled: true,
        },
        JobEvent::JobFailed { reason: second.into() },
    ]);
    // Another kind of failure after a stall is retried as usual.
    given(once)
        .when(JobCommand::Fail {
            attempt: 2,
            reason: "S3 timed out".into(),
            retryable: true,
            stalled: false,
            now: t(10),
        })
        .then_expect_events(vec![
            JobEvent::JobAttemptFailed {
                attempt: 2,
                reason: "S3 timed out".into(),
                retryable: true,
                stalled: false,
            },
            JobEvent::JobRetryScheduled {
                next_attempt: 3,
                not_before: t(30),
            },
        ]);
}

#[test]
fn retry_is_queued_only_when_due() {
    let mut events = running(1);
    events.extend([
        JobEvent::JobAttemptFailed {
            attempt: 1,
            reason: "oom".into(),
            retryable: true,
            stalled: false,
        },
        JobEvent::JobRetryScheduled {
            next_attempt: 2,
            not_before: t(20),
        },
    ]);
    given(events.clone())
        .when(JobCommand::Queue { now: t(19) })
        .then_expect_error(JobError::NotDue(t(20)));
    given(events)
        .when(JobCommand::Queue { now: t(20) })
        .then_expect_events(vec![JobEvent::JobQueued {
            attempt: 2,
            priority: crate::Priority::Routine,
        }]);
}

#[test]
fn expired_lease_times_out_then_retries() {
    given(running(1))
        .when(JobCommand::ExpireLease { attempt: 1, now: t(59) })
        .then_expect_error(JobError::LeaseNotExpired {
            attempt: 1,
            until: t(60),
        });
    given(running(1))
        .when(JobCommand::ExpireLease { attempt: 1, now: t(60) })
        .then_expect_events(vec![
            JobEvent::JobTimedOut { attempt: 1 },
            JobEvent::JobRetryScheduled {
                next_attempt: 2,
                not_before: t(70),
            },
        ]);
}

#[test]
fn cancel_before_running_is_immediate() {
    for state in [
        vec![submitted(3)],
        vec![
            submitted(3),
            JobEvent::JobQueued {
                attempt: 1,
                priority: crate::Priority::Routine,
            },
        ],
    ] {
        given(state)
            .when(JobCommand::Cancel {
                reason: Some("wrong slide".into()),
            })
            .then_expect_events(vec![
                JobEvent::JobCancelRequested {
                    reason: Some("wrong slide".into()),
                },
                JobEvent::JobCancelled {},
            ]);
    }
}

#[test]
fn cancel_while_running_waits_for_the_worker() {
    given(running(1))
        .when(JobCommand::Cancel { reason: None })
        .then_expect_events(vec![JobEvent::JobCancelRequested { reason: None }]);
    let mut requested = running(1);
    requested.push(JobEvent::JobCancelRequested { reason: None });
    given(requested.clone())
        .when(JobCommand::ConfirmCancelled { attempt: 1 })
        .then_expect_events(vec![JobEvent::JobCancelled {}]);
    given(requested.clone())
        .when(succeed(1))
        .then_expect_error(JobError::InvalidTransition {
            command: "succeed",
            status: "cancel_requested",
        });
    given(requested.clone())
        .when(JobCommand::Cancel { reason: None })
        .then_expect_error(JobError::InvalidTransition {
            command: "cancel",
            status: "cancel_requested",
        });
    // The attempt's heartbeats and progress are refused with CancelRequested: the worker stops.
    given(requested.clone())
        .when(JobCommand::Heartbeat {
            attempt: 1,
            lease_until: t(90),
        })
        .then_expect_error(JobError::CancelRequested);
    given(requested.clone())
        .when(JobCommand::Progress {
            attempt: 1,
            done: 1,
            total: 2,
        })
        .then_expect_error(JobError::CancelRequested);
    // A lease that runs out while cancelling ends in cancellation, not a retry.
    given(requested)
        .when(JobCommand::ExpireLease { attempt: 1, now: t(60) })
        .then_expect_events(vec![JobEvent::JobTimedOut { attempt: 1 }, JobEvent::JobCancelled {}]);
}

#[test]
fn confirm_cancelled_needs_a_request() {
    given(running(1))
        .when(JobCommand::ConfirmCancelled { attempt: 1 })
        .then_expect_error(JobError::InvalidTransition {
            command: "confirm cancellation of",
            status: "running",
        });
}

#[test]
fn user_retry_after_failure_or_cancellation() {
    let mut failed = running(1);
    failed.extend([
        JobEvent::JobAttemptFailed {
            attempt: 1,
            reason: "x".into(),
            retryable: false,
            stalled: false,
        },
        JobEvent::JobFailed { reason: "x".into() },
    ]);
    given(failed.clone())
        .when(JobCommand::Retry)
        .then_expect_events(vec![JobEvent::JobRetryRequested {
            next_attempt: 2,
            max_attempts: 4,
        }]);
    failed.push(JobEvent::JobRetryRequested {
        next_attempt: 2,
        max_attempts: 4,
    });
    given(failed)
        .when(JobCommand::Queue { now: t(0) })
        .then_expect_events(vec![JobEvent::JobQueued {
            attempt: 2,
            priority: crate::Priority::Routine,
        }]);
    given(running(1))
        .when(JobCommand::Retry)
        .then_expect_error(JobError::InvalidTransition {
            command: "retry",
            status: "running",
        });
}

#[test]
fn nothing_follows_success() {
    let mut done = running(1);
    done.push(JobEvent::JobSucceeded {
        attempt: 1,
        manifest_key: "m".into(),
        manifest_sha256: "a".repeat(64),
        usage: usage(),
    });
    for cmd in [
        JobCommand::Cancel { reason: None },
        JobCommand::Retry,
        JobCommand::Queue { now: t(0) },
        JobCommand::Fail {
            attempt: 1,
            reason: "x".into(),
            retryable: true,
            stalled: false,
            now: t(0),
        },
    ] {
        let r = given(done.clone()).when(cmd.clone()).inspect_result();
        assert!(matches!(r, Err(JobError::InvalidTransition { .. })), "{cmd:?}: {r:?}");
    }
}

#[test]
fn backoff_doubles_and_caps() {
    assert_eq!(retry_backoff(1), Duration::seconds(10));
    assert_eq!(retry_backoff(2), Duration::seconds(20));
    assert_eq!(retry_backoff(3), Duration::seconds(40));
    assert_eq!(retry_backoff(30), Duration::seconds(900));
}

// ---- properties -------------------------------------------------------------------------

fn arb_command() -> impl Strategy<Value = JobCommand> {
    let attempt = 0u32..5;
    let now = (0i64..200).prop_map(t);
    prop_oneof![
        (1u32..4).prop_map(|m| JobCommand::Submit {
            slide_id: slide(),
            spec: spec(),
            max_attempts: m,
            priority: crate::Priority::Routine,
        }),
        now.clone().prop_map(|now| JobCommand::Queue { now }),
        Just(JobCommand::FailForSlide {
            reason: "rejected".into()
        }),
        (attempt.clone(), now.clone()).prop_map(|(attempt, now)| JobCommand::Start {
            attempt,
            worker_id: "w".into(),
            lease_until: now + Duration::seconds(30),
            now,
        }),
        (attempt.clone(), now.clone())
            .prop_map(|(attempt, lease_until)| JobCommand::Heartbeat { attempt, lease_until }),
        attempt.clone().prop_map(|attempt| JobCommand::Progress {
            attempt,
            done: 1,
            total: 2
        }),
        attempt.clone().prop_map(succeed),
        (attempt.clone(), any::<bool>(), now.clone()).prop_map(|(attempt, retryable, now)| {
            JobCommand::Fail {
                attempt,
                reason: "boom".into(),
                retryable,
                stalled: false,
                now,
            }
        }),
        (attempt.clone(), now).prop_map(|(attempt, now)| JobCommand::ExpireLease { attempt, now }),
        Just(JobCommand::Cancel { reason: None }),
        attempt.prop_map(|attempt| JobCommand::ConfirmCancelled { attempt }),
        Just(JobCommand::Retry),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_hold_over_any_command_sequence(
        commands in proptest::collection::vec(arb_command(), 1..60)
    ) {
        let mut job = Job::default();
        let mut log: Vec<JobEvent> = Vec::new();
        for cmd in commands {
            let before = job.clone();
            match job.decide(&cmd) {
                Ok(events) => {
                    // A worker's command for any attempt but the current one never passes.
                    if let Some(a) = cmd.attempt() {
                        prop_assert_eq!(a, before.attempt);
                    }
                    prop_assert!(!events.is_empty());
                    // Nothing follows a terminal state but a user's retry of a failure or
                    // cancellation.
                    if before.status.is_terminal() {
                        prop_assert!(matches!(cmd, JobCommand::Retry));
                        prop_assert!(before.status != JobStatus::Succeeded);
                    }
                    for e in events {
                        job.apply(e.clone());
                        log.push(e);
                    }
                }
                Err(err) => {
                    // A refusal changes nothing.
                    prop_assert_eq!(&job, &before);
                    if let (Some(a), false) = (cmd.attempt(), before.status == JobStatus::New) {
                        if a != before.attempt {
                            prop_assert_eq!(
                                err,
                                JobError::StaleAttempt { current: before.attempt, got: a }
                            );
                        }
                    }
                }
            }
        }
        let successes = log.iter().filter(|e| matches!(e, JobEvent::JobSucceeded { .. })).count();
        prop_assert!(successes <= 1, "two successes: {log:?}");
        // Attempts start in strictly increasing order, each at most once.
        let starts: Vec<u32> = log
            .iter()
            .filter_map(|e| match e { JobEvent::JobStarted { attempt, .. } => Some(*attempt), _ => None })
            .collect();
        prop_assert!(starts.windows(2).all(|w| w[0] < w[1]), "starts {starts:?}");
        // Never more attempts started than allowed.
        if let Some(&last) = starts.last() {
            prop_assert!(last <= job.max_attempts);
        }
        // Replaying the log gives the same state.
        let mut replayed = Job::default();
        for e in log { replayed.apply(e); }
        prop_assert_eq!(replayed, job);
    }
}

#[test]
fn a_success_may_name_only_its_own_attempts_manifest() {
    let lab = TenantId::parse("lab-a").unwrap();
    let job = JobId::parse("0190d5a4-0000-7000-8000-000000000009").unwrap();
    let other_job = JobId::parse("0190d5a4-0000-7000-8000-00000000000a").unwrap();
    let with_key = |attempt: u32, key: String| JobCommand::Succeed {
        attempt,
        manifest_key: key,
        manifest_sha256: "a".repeat(64),
        usage: usage(),
    };
    let own = manifest_key(&lab, job, 2);
    assert_eq!(own, format!("results/lab-a/{job}/attempt-2/manifest.json"));
    assert_eq!(with_key(2, own.clone()).check_scope(&lab, job), Ok(()));
    for key in [
        manifest_key(&TenantId::parse("lab-b").unwrap(), job, 2),
        manifest_key(&lab, other_job, 2),
        manifest_key(&lab, job, 1),
        format!("results/lab-a/{job}/attempt-2/../../../lab-b/x/manifest.json"),
        format!("{own}.bak"),
        "results/lab-a/manifest.json".into(),
    ] {
        assert!(
            matches!(
                with_key(2, key.clone()).check_scope(&lab, job),
                Err(JobError::Invalid(_))
            ),
            "{key} was accepted"
        );
    }
    // Other commands carry no keys to check.
    assert_eq!(JobCommand::Queue { now: t(0) }.check_scope(&lab, job), Ok(()));
}

/// A STAT job is queued STAT on its first attempt and on every retry; the priority comes from
/// the submission alone.
#[test]
fn a_stat_job_is_queued_stat_on_every_attempt() {
    let stat = JobEvent::JobSubmitted {
        slide_id: slide(),
        spec: spec(),
        max_attempts: 3,
        priority: crate::Priority::Stat,
    };
    given(vec![stat.clone()])
        .when(JobCommand::Queue { now: t(0) })
        .then_expect_events(vec![JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Stat,
        }]);
    given(vec![
        stat,
        JobEvent::JobQueued {
            attempt: 1,
            priority: crate::Priority::Stat,
        },
        started(1),
        JobEvent::JobTimedOut { attempt: 1 },
        JobEvent::JobRetryScheduled {
            next_attempt: 2,
            not_before: t(70),
        },
    ])
    .when(JobCommand::Queue { now: t(80) })
    .then_expect_events(vec![JobEvent::JobQueued {
        attempt: 2,
        priority: crate::Priority::Stat,
    }]);
}

/// The read models keep the job's state as JSON (`rm.jobs.state`): a row written while the spec
/// was two loose fields reads with its spec, and the state is written in that same shape.
#[test]
fn a_state_written_before_the_spec_was_typed_reads_with_its_spec() {
    let old = serde_json::json!({
        "status": "running", "slide_id": "0190d5a4-0000-7000-8000-000000000002",
        "kind": "wsi.preprocess", "params": {"format": "png", "normalize": "none", "overlap": 1,
        "quality": 80, "tile_size": 254, "tissue": true},
        "attempt_budget": 3, "max_attempts": 3, "attempt": 1, "worker_id": "w1",
        "lease_until": "2026-01-01T00:10:00Z", "retry_not_before": null, "progress": [2, 9],
        "manifest_key": null, "manifest_sha256": null, "failure": null, "stalls": 0,
        "priority": "routine"
    });
    let job: Job = serde_json::from_value(old.clone()).unwrap();
    match &job.spec {
        Some(JobSpec::Preprocess(p)) => assert_eq!(p.format, mira_events::params::TileFormat::Png),
        other => panic!("{other:?}"),
    }
    assert_eq!(job.progress, Some((2, 9)));
    assert_eq!(serde_json::to_value(&job).unwrap(), old, "written as it was read");
    // A job not yet submitted has no spec, and none is written.
    let new = serde_json::to_value(Job::default()).unwrap();
    assert!(new.get("kind").is_none() && new.get("spec").is_none(), "{new}");
    assert_eq!(serde_json::from_value::<Job>(new).unwrap(), Job::default());
}
