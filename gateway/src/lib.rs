//! `mira-gateway` is Mira's front door and its operator tooling, the library behind the `mira`
//! binary: the HTTP API and WebSocket ([`api`], [`server`]), each background role started one
//! way ([`roles`]), `mira dev` ([`dev`]), the blob stores ([`blob`]), the database roles
//! ([`database`]), audit replay ([`audit`]) and the benchmarks. The binary's own `src/main.rs`
//! parses arguments; `src/cli/` dispatches each subcommand and prints its tables.

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
