//! `mira-projections` will own the read models (jobs, slides, the per-job timeline,
//! per-tenant usage) and the builders that keep them equal to a replay of the event log,
//! with row-level security per tenant and rebuild without downtime (DESIGN §6).
//!
//! Its work arrives with the read-model issue; until then it holds only this charter.
