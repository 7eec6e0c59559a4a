//! `mira-aggregates` decides what happens: the Slide and Job aggregates on cqrs-es 0.5.
//!
//! Aggregates are pure. They take a command, check it against their state, and write events;
//! they do no I/O. The one side effect a command needs, sealing patient data, goes through the
//! `Services` of the Slide aggregate. Time comes in with the command (`now`), so every
//! transition is reproducible in a test.
//!
//! Every refused transition returns a typed error and writes nothing. The errors map to HTTP
//! statuses in the gateway: `Invalid` and `SizeMismatch` → 422; `NotFound` → 404;
//! `AlreadyExists`, `InvalidTransition`, `StaleAttempt`, `NotDue`, `LeaseNotExpired` and
//! `CancelRequested` → 409.

pub mod job;
mod schema;
pub mod slide;

pub use job::{manifest_key, results_prefix, retry_backoff, Job, JobCommand, JobError, JobStatus};
pub use mira_events::Priority;
pub use slide::{copy_key, Slide, SlideCommand, SlideError, SlideServices, SlideStatus};
