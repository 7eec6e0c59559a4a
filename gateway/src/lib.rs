//! `mira-gateway` is Mira's front door and the library behind the `mira` binary (crate
//! `cli/`): the HTTP API and WebSocket ([`api`], [`server`]), each background role started one
//! way ([`roles`]), `mira dev` ([`dev`]), the blob stores (re-exported from `mira-blobs` as
//! [`blob`]), the database roles ([`database`]), the aggregates' state as of an instant for
//! `mira audit replay` ([`replay`]) and the benchmarks.

pub mod api;
pub mod bench;
pub mod bench_e2e;
pub use mira_blobs as blob;
pub mod database;
pub use mira_config as config;
pub use mira_eventlog::commands;
pub mod dev;
pub mod replay;
pub mod roles;
pub mod server;
pub mod telemetry;
