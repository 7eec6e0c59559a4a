//! What verification finds: the first thing wrong ([`Violation`]) and why a verification
//! could not finish ([`VerifyError`]). Shared by the full sweep (`verify`) and the witness
//! checks (`witness_check`); `verify` re-exports both.

use uuid::Uuid;

use crate::witness::WitnessError;

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Global position of the first bad event (for a checkpoint fault: the last position it
    /// covers).
    pub position: i64,
    pub event_id: Option<Uuid>,
    pub reason: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.event_id {
            Some(id) => write!(
                f,
                "first bad event at position {} (id {id}): {}",
                self.position, self.reason
            ),
            None => write!(f, "at position {}: {}", self.position, self.reason),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Violation(Violation),
    #[error("database error while verifying: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Witness(#[from] WitnessError),
}

pub(crate) fn violation(position: i64, event_id: Option<Uuid>, reason: String) -> Violation {
    Violation {
        position,
        event_id,
        reason,
    }
}
