//! `mira-eventlog` owns Mira's event log in PostgreSQL (DESIGN §4): appending with a
//! per-aggregate SHA-256 chain and optimistic concurrency, the follow cursor that never skips
//! a late commit, signed checkpoints, verification and export. It also implements cqrs-es's
//! `PersistedEventRepository`, so aggregates run on the same path.
//!
//! Layout:
//! * [`db`]: connecting, and SQLSTATE classification.
//! * [`migrate`]: the schema in `migrations/`, applied idempotently.
//! * [`store`]: [`EventLog`]: append, read a stream, follow by cursor.
//! * [`repo`]: the cqrs-es repository, one per tenant.
//! * [`commands`]: the command path every process shares: Job and Slide commands through
//!   cqrs-es into the log, and loading an aggregate's current state.
//! * [`checkpoint`]: signing keys and signed checkpoints.
//! * [`verify`]: re-derives every hash and checks every checkpoint.
//! * [`witness`]: copies of the checkpoints outside the database.
//! * [`export`]: JSON Lines for outside verifiers.
//! * [`testing`]: fresh databases for tests.

pub mod checkpoint;
pub mod commands;
pub mod db;
pub mod export;
pub mod finding;
pub mod migrate;
pub mod repo;
pub mod store;
pub mod testing;
pub mod verify;
pub mod witness;
pub mod witness_check;

pub use checkpoint::{AuditKey, CheckpointInfo};
pub use db::DbError;
pub use repo::PgEventRepository;
pub use store::{AppendError, Cursor, EventFilter, EventLog, NewEvent, StoredEvent};
pub use verify::{VerifyReport, Violation};
