//! `mira-gateway` is Mira's front door and the library behind the `mira` binary (crate
//! `cli/`): the HTTP API and WebSocket ([`api`], [`server`]), each background role started one
//! way ([`roles`]), `mira dev` ([`dev`]), the blob stores (re-exported from `mira-blobs` as
//! [`blob`]), the database roles ([`database`]), audit replay ([`audit`]) and the benchmarks.

// The OpenAPI document is one `json!` literal, deeper than the default limit.
#![recursion_limit = "512"]

pub mod api;
pub mod audit;
pub mod bench;
pub mod bench_e2e;
pub use mira_blobs as blob;
pub mod database;
pub use database::{grant_runtime_roles, warn_if_owner};
pub use mira_config as config;
pub use mira_eventlog::commands;
pub mod dev;
pub mod roles;
pub mod server;
pub mod telemetry;
