//! `mira-handlers` will own the lifecycle handlers: queueing jobs when their slide is
//! verified, retries with backoff, lease expiry and cancellation (DESIGN §3, §5.3), driven by
//! the durable due-time table.
//!
//! Its work arrives with the gateway issue; until then it holds only this charter.
