//! `mira-gateway` is Mira's front door and its operator tooling: the `mira` binary.
//!
//! Today it holds the configuration, the `mira migrate`, `mira audit …` and
//! `mira bench append` commands, and the command path they share ([`commands`]). The HTTP API,
//! the WebSocket and `mira dev` arrive with the gateway issue. `main` only parses arguments
//! and calls into this library, so tests drive the same code.

// The OpenAPI document is one `json!` literal, deeper than the default limit.
#![recursion_limit = "512"]

pub mod api;
pub mod audit;
pub mod bench;
pub mod bench_e2e;
pub mod blob;
pub mod database;
pub use database::{grant_runtime_roles, warn_if_owner};
pub use mira_config as config;
pub use mira_eventlog::commands;
pub mod dev;
pub mod roles;
pub mod server;
pub mod telemetry;
