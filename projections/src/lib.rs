//! `mira-projections` owns the read models (DESIGN §6): jobs, slides, the per-job timeline and
//! per-tenant usage, in PostgreSQL schema `rm`, and the projector that keeps them equal to a
//! replay of the log.
//!
//! * [`projector`]: a consumer [`Apply`](mira_bus::consumer::Apply). It folds each event
//!   into the row through the aggregate's own `apply` (the row keeps the aggregate state), so
//!   the read model can never disagree with the domain about a transition. It writes as
//!   `mira_projector` and sends `NOTIFY mira_read_models` with the tenant, the entity and the
//!   new position.
//! * [`query`]: the gateway's data-access layer. Every transaction runs as `mira_api` with
//!   `mira.tenant_id` set, so row-level security confines it to one tenant even when the
//!   connection is a superuser's, and a query with no tenant fails.

pub mod projector;
pub mod query;
pub mod rebuild;
pub mod views;

pub use projector::Projector;
pub use query::ReadModels;
