//! `mira audit verify`: re-derives every hash, follows every aggregate's chain, and checks
//! every checkpoint's signature, digest and leaves against the log. It reports the first bad
//! event by position and id.
//!
//! What each attack looks like here:
//! * a changed byte: the recomputed hash differs from the stored one;
//! * a deleted event in a stream: the checkpoint that covers it names it as missing (and
//!   without a checkpoint, the next event's sequence and `prev_hash` no longer chain);
//! * a change with every later hash recomputed: the chain holds, but the hash differs from the
//!   signed checkpoint's leaf;
//! * a deleted tail: the last checkpoint's leaves name events that are no longer there.
//!
//! Events after the last checkpoint are protected by their chains alone until the next
//! checkpoint covers them; the relay writes one every N events or T seconds.

use std::collections::HashMap;
use std::time::Instant;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use mira_events::canonical::{fold_leaves, Hash32, LEAF_LEN, ZERO_HASH};
use sqlx::PgPool;
use uuid::Uuid;

use crate::checkpoint::{self, Checkpoint};
use crate::store::{read_below, watermark, Cursor};

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

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub checkpoints: u64,
    /// Events after the last checkpoint, protected by their chains only.
    pub uncheckpointed: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Violation(Violation),
    #[error("database error while verifying: {0}")]
    Db(#[from] sqlx::Error),
}

struct Leaf {
    position: i64,
    event_id: Uuid,
    hash: Hash32,
    checkpoint: i64,
}

fn leaves_of(c: &Checkpoint) -> impl Iterator<Item = Leaf> + '_ {
    c.leaves.chunks_exact(LEAF_LEN).map(move |l| Leaf {
        position: i64::from_be_bytes(l[..8].try_into().expect("8 bytes")),
        event_id: Uuid::from_slice(&l[8..24]).expect("16 bytes"),
        hash: l[24..].try_into().expect("32 bytes"),
        checkpoint: c.seq,
    })
}

/// Checks the checkpoints among themselves: sequence, signature, digest chain, counts.
fn check_checkpoints(cks: &[Checkpoint], key: &VerifyingKey) -> Result<(), Violation> {
    let mut prev_digest = ZERO_HASH;
    let mut prev_count = 0i64;
    let mut prev_upto = Cursor::START;
    for (i, c) in cks.iter().enumerate() {
        let bad = |reason: String| Violation {
            position: c.upto.position,
            event_id: None,
            reason,
        };
        if c.seq != i as i64 + 1 {
            return Err(bad(format!(
                "checkpoint {} follows checkpoint {}: checkpoints are missing",
                c.seq, i
            )));
        }
        let sig = Signature::from_bytes(&c.signature);
        if key.verify(&c.canonical().bytes(), &sig).is_err() {
            return Err(bad(format!(
                "checkpoint {} has a signature that the audit key did not make",
                c.seq
            )));
        }
        if c.prev_digest != prev_digest {
            return Err(bad(format!("checkpoint {} does not continue checkpoint {}", c.seq, i)));
        }
        if c.leaves.len() % LEAF_LEN != 0
            || c.event_count != prev_count + (c.leaves.len() / LEAF_LEN) as i64
            || fold_leaves(prev_digest, &c.leaves) != c.digest
            || c.upto < prev_upto
        {
            return Err(bad(format!(
                "checkpoint {}'s leaves do not match its signed digest",
                c.seq
            )));
        }
        prev_digest = c.digest;
        prev_count = c.event_count;
        prev_upto = c.upto;
    }
    Ok(())
}

/// Verifies the whole log against `key`, the trusted public audit key.
pub async fn verify(pool: &PgPool, key: &VerifyingKey) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let cks = checkpoint::load_all(pool).await?;
    check_checkpoints(&cks, key).map_err(VerifyError::Violation)?;
    let mut leaves = cks.iter().flat_map(leaves_of).peekable();
    let violation = |position, id, reason: String| {
        VerifyError::Violation(Violation {
            position,
            event_id: Some(id),
            reason,
        })
    };

    let wm = watermark(pool).await?;
    let mut heads: HashMap<(String, String), (i64, Hash32)> = HashMap::new();
    let mut cursor = Cursor::START;
    let mut events = 0u64;
    let mut uncheckpointed = 0u64;
    loop {
        let batch = read_below(pool, cursor, wm, 5_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        for e in batch {
            events += 1;
            let (pos, id) = (e.global_position, e.event_id);
            if let Some(l) = leaves.peek() {
                if l.position != pos || l.event_id != id {
                    return Err(violation(
                        l.position,
                        l.event_id,
                        format!(
                            "event is missing or moved: checkpoint {} recorded it here, the log has position {pos} (id {id})",
                            l.checkpoint
                        ),
                    ));
                }
            }
            if e.recompute_hash() != e.hash {
                return Err(violation(
                    pos,
                    id,
                    "stored fields do not match the event's hash (altered)".into(),
                ));
            }
            let key = (e.aggregate_type.clone(), e.aggregate_id.clone());
            let (last_seq, last_hash) = heads.get(&key).copied().unwrap_or((0, ZERO_HASH));
            if e.sequence != last_seq + 1 {
                return Err(violation(
                    pos,
                    id,
                    format!(
                        "{} {} jumps from sequence {last_seq} to {}: events are missing",
                        e.aggregate_type, e.aggregate_id, e.sequence
                    ),
                ));
            }
            if e.prev_hash != last_hash {
                return Err(violation(
                    pos,
                    id,
                    "prev_hash does not match the previous event of its aggregate".into(),
                ));
            }
            match leaves.next() {
                Some(l) if l.hash != e.hash => {
                    return Err(violation(
                        pos,
                        id,
                        format!(
                            "hash differs from the one signed in checkpoint {} (altered and re-hashed)",
                            l.checkpoint
                        ),
                    ));
                }
                Some(_) => {}
                None => uncheckpointed += 1,
            }
            heads.insert(key, (e.sequence, e.hash));
        }
    }
    if let Some(l) = leaves.next() {
        return Err(violation(
            l.position,
            l.event_id,
            format!(
                "event is missing: checkpoint {} covers it, the log ends before it",
                l.checkpoint
            ),
        ));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(VerifyReport {
        events,
        checkpoints: cks.len() as u64,
        uncheckpointed,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
    })
}
