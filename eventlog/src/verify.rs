//! `mira audit verify`: re-derives every hash, follows every aggregate's chain, checks every
//! checkpoint's signature, digest and leaves against the log, and checks the newest checkpoint
//! against the copy outside the database (the witness). It reports the first bad event by
//! position and id.
//!
//! What each attack looks like here:
//! * a changed byte: the recomputed hash differs from the stored one;
//! * a deleted event in a stream: the checkpoint that covers it names it as missing (and
//!   without a checkpoint, the next event's sequence and `prev_hash` no longer chain);
//! * a change with every later hash recomputed: the chain holds, but the hash differs from the
//!   signed checkpoint's leaf;
//! * a deleted tail: the last checkpoint's leaves name events that are no longer there;
//! * deleted checkpoints (all, or the newest ones with the events after them), then re-hashed
//!   events: the newest witnessed checkpoint is missing from the database;
//! * an event slipped in below a checkpoint's end: no checkpoint covers it.
//!
//! Memory does not grow with the log: checkpoints are read one at a time (each covers at most
//! [`checkpoint::MAX_SPAN`] events), the checkpoint pass reads only positions, ids and hashes
//! in follow order, and the chain pass walks the stream index one aggregate after another,
//! holding only the current aggregate's head.
//!
//! Events after the last checkpoint are protected by their chains alone until the next
//! checkpoint covers them; the relay writes one every N events or T seconds.

use std::time::Instant;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use mira_events::canonical::{fold_leaves, CanonicalCheckpoint, Hash32, LEAF_LEN, ZERO_HASH};
use sqlx::PgPool;
use uuid::Uuid;

use crate::checkpoint::{self, Checkpoint};
use crate::store::{from_row, read_leaves_below, watermark, Cursor, COLUMNS};
use crate::witness::{Witness, WitnessError, WitnessRecord};

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
    /// The newest checkpoint the witness holds, matched in the database.
    pub witnessed_checkpoint: Option<i64>,
    pub witness: String,
    pub seconds: f64,
    pub events_per_second: f64,
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

fn violation(position: i64, event_id: Option<Uuid>, reason: String) -> Violation {
    Violation {
        position,
        event_id,
        reason,
    }
}

/// Checks the checkpoints among themselves, without their leaves: sequence, signature, digest
/// chain, counts.
fn check_headers(cks: &[Checkpoint], key: &VerifyingKey) -> Result<(), Violation> {
    let mut prev_digest = ZERO_HASH;
    let mut prev_count = 0i64;
    let mut prev_upto = Cursor::START;
    for (i, c) in cks.iter().enumerate() {
        let bad = |reason: String| violation(c.upto.position, None, reason);
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
        if c.leaves_len % LEAF_LEN as i64 != 0
            || c.event_count != prev_count + c.leaves_len / LEAF_LEN as i64
            || c.upto < prev_upto
        {
            return Err(bad(format!(
                "checkpoint {}'s leaves do not match its signed count",
                c.seq
            )));
        }
        prev_digest = c.digest;
        prev_count = c.event_count;
        prev_upto = c.upto;
    }
    Ok(())
}

/// The newest witnessed checkpoint must be in the database, unchanged.
fn check_witness(
    cks: &[Checkpoint],
    newest: Option<&WitnessRecord>,
    witness: &str,
    key: &VerifyingKey,
) -> Result<(), Violation> {
    let Some(w) = newest else {
        return match cks.last() {
            None => Ok(()),
            Some(last) => Err(violation(
                last.upto.position,
                None,
                format!(
                    "the witness ({witness}) holds no checkpoint but the database has {}: it is not the witness the relay writes to, or it was emptied",
                    cks.len()
                ),
            )),
        };
    };
    let witnessed = CanonicalCheckpoint {
        epoch: w.epoch,
        seq: w.seq,
        created_at_micros: w.created_at_micros,
        upto_tx: w.upto_tx,
        upto_position: w.upto_position,
        event_count: w.event_count,
        prev_digest: hex::decode(&w.prev_digest)
            .ok()
            .and_then(|v| v.try_into().ok())
            .unwrap_or([0xff; 32]),
        digest: w.digest_bytes().unwrap_or([0xff; 32]),
    };
    let signed = w
        .signature_bytes()
        .is_some_and(|s| key.verify(&witnessed.bytes(), &Signature::from_bytes(&s)).is_ok());
    if !signed {
        return Err(violation(
            w.upto_position,
            None,
            format!(
                "the witnessed checkpoint {} ({witness}) has a signature that the audit key did not make",
                w.seq
            ),
        ));
    }
    match cks.iter().find(|c| c.seq == w.seq) {
        None => Err(violation(
            w.upto_position,
            None,
            format!(
                "checkpoint {} is in the witness ({witness}) but missing from the database: checkpoints were deleted (the database has {})",
                w.seq,
                cks.len()
            ),
        )),
        Some(c) if c.witness_record() != *w => Err(violation(
            w.upto_position,
            None,
            format!(
                "checkpoint {} in the database differs from its witnessed copy ({witness})",
                w.seq
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// One checkpoint's leaves, checked against its signed digest.
struct Leaves {
    seq: i64,
    bytes: Vec<u8>,
    next: usize,
}

impl Leaves {
    fn peek(&self) -> Option<(i64, Uuid, Hash32)> {
        let l = self.bytes.get(self.next..self.next + LEAF_LEN)?;
        Some((
            i64::from_be_bytes(l[..8].try_into().expect("8 bytes")),
            Uuid::from_slice(&l[8..24]).expect("16 bytes"),
            l[24..].try_into().expect("32 bytes"),
        ))
    }
}

/// Walks the log in follow order against the checkpoints' leaves. Returns the events seen and
/// how many no checkpoint covers yet.
async fn checkpoint_pass(pool: &PgPool, cks: &[Checkpoint]) -> Result<Result<(u64, u64), Violation>, sqlx::Error> {
    let last_upto = cks.last().map(|c| c.upto);
    let mut next_ck = 0usize;
    let mut current: Option<Leaves> = None;
    let wm = watermark(pool).await?;
    let mut cursor = Cursor::START;
    let (mut events, mut uncheckpointed) = (0u64, 0u64);
    loop {
        let batch = read_leaves_below(pool, cursor, wm, 10_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor;
        for e in batch {
            events += 1;
            // The checkpoint that should cover this event, loading the next when one is done.
            while current.as_ref().is_none_or(|l| l.next >= l.bytes.len()) && next_ck < cks.len() {
                let c = &cks[next_ck];
                next_ck += 1;
                let bytes = checkpoint::load_leaves(pool, c.seq).await?;
                if bytes.len() as i64 != c.leaves_len || fold_leaves(c.prev_digest, &bytes) != c.digest {
                    return Ok(Err(violation(
                        c.upto.position,
                        None,
                        format!("checkpoint {}'s leaves do not match its signed digest", c.seq),
                    )));
                }
                current = Some(Leaves {
                    seq: c.seq,
                    bytes,
                    next: 0,
                });
            }
            let pos = e.cursor.position;
            match current.as_mut().and_then(|l| l.peek().map(|p| (l.seq, p))) {
                Some((seq, (lpos, lid, lhash))) => {
                    if lpos != pos || lid != e.event_id {
                        return Ok(Err(misplaced(pool, seq, (lpos, lid), (pos, e.event_id)).await?));
                    }
                    if lhash != e.hash {
                        return Ok(Err(violation(
                            pos,
                            Some(e.event_id),
                            format!("hash differs from the one signed in checkpoint {seq} (altered and re-hashed)"),
                        )));
                    }
                    if let Some(l) = current.as_mut() {
                        l.next += LEAF_LEN;
                    }
                }
                None => {
                    if last_upto.is_some_and(|u| e.cursor <= u) {
                        return Ok(Err(violation(
                            pos,
                            Some(e.event_id),
                            format!(
                                "event is older than the end of checkpoint {} but no checkpoint covers it (inserted)",
                                cks.len()
                            ),
                        )));
                    }
                    uncheckpointed += 1;
                }
            }
        }
    }
    // Leaves left over name events the log no longer has.
    loop {
        if let Some((seq, (lpos, lid, _))) = current.as_ref().and_then(|l| l.peek().map(|p| (l.seq, p))) {
            return Ok(Err(violation(
                lpos,
                Some(lid),
                format!("event is missing: checkpoint {seq} covers it, the log ends before it"),
            )));
        }
        let Some(c) = cks.get(next_ck) else { break };
        next_ck += 1;
        let bytes = checkpoint::load_leaves(pool, c.seq).await?;
        current = Some(Leaves {
            seq: c.seq,
            bytes,
            next: 0,
        });
    }
    Ok(Ok((events, uncheckpointed)))
}

/// The log and a checkpoint disagree about what comes next: either the recorded event is gone,
/// or the log's event is not where the checkpoint put it (slipped in, or moved).
async fn misplaced(pool: &PgPool, seq: i64, leaf: (i64, Uuid), log: (i64, Uuid)) -> Result<Violation, sqlx::Error> {
    let recorded_exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM events WHERE event_id = $1)")
        .bind(leaf.1)
        .fetch_one(pool)
        .await?;
    Ok(if recorded_exists {
        violation(
            log.0,
            Some(log.1),
            format!(
                "event is not covered by checkpoint {seq} at this point of the log (inserted or moved): the checkpoint recorded position {} (id {}) here",
                leaf.0, leaf.1
            ),
        )
    } else {
        violation(
            leaf.0,
            Some(leaf.1),
            format!(
                "event is missing: checkpoint {seq} recorded it here, the log has position {} (id {})",
                log.0, log.1
            ),
        )
    })
}

/// What is wrong with `e` as the event after (`last_seq`, `last_hash`) of its stream, if
/// anything: its hash re-derived, its sequence, its `prev_hash`.
fn chain_fault(e: &crate::store::StoredEvent, last_seq: i64, last_hash: Hash32) -> Option<String> {
    if e.recompute_hash() != e.hash {
        Some("stored fields do not match the event's hash (altered)".to_owned())
    } else if e.sequence != last_seq + 1 {
        Some(format!(
            "{} {} jumps from sequence {last_seq} to {}: events are missing",
            e.aggregate_type, e.aggregate_id, e.sequence
        ))
    } else if e.prev_hash != last_hash {
        Some("prev_hash does not match the previous event of its aggregate".to_owned())
    } else {
        None
    }
}

/// Walks every aggregate's stream in order: re-derives each hash and checks sequence and
/// `prev_hash`. Returns the violation with the lowest position, if any.
async fn chain_pass(pool: &PgPool) -> Result<Option<Violation>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events WHERE (aggregate_type, aggregate_id, sequence) > ($1, $2, $3) \
         ORDER BY aggregate_type, aggregate_id, sequence LIMIT $4"
    );
    let mut after = (String::new(), String::new(), 0i64);
    let mut head: Option<(String, String, i64, Hash32)> = None;
    let mut skip: Option<(String, String)> = None;
    let mut first: Option<Violation> = None;
    loop {
        let rows = sqlx::query(&sql)
            .bind(&after.0)
            .bind(&after.1)
            .bind(after.2)
            .bind(5_000i64)
            .fetch_all(pool)
            .await?;
        if rows.is_empty() {
            break;
        }
        for row in &rows {
            let e = from_row(row)?;
            after = (e.aggregate_type.clone(), e.aggregate_id.clone(), e.sequence);
            if skip
                .as_ref()
                .is_some_and(|(t, id)| *t == e.aggregate_type && *id == e.aggregate_id)
            {
                continue;
            }
            let (last_seq, last_hash) = match &head {
                Some((t, id, s, h)) if *t == e.aggregate_type && *id == e.aggregate_id => (*s, *h),
                _ => (0, ZERO_HASH),
            };
            if let Some(reason) = chain_fault(&e, last_seq, last_hash) {
                if first.as_ref().is_none_or(|v| e.global_position < v.position) {
                    first = Some(violation(e.global_position, Some(e.event_id), reason));
                }
                // The rest of this stream follows from this fault.
                skip = Some((e.aggregate_type.clone(), e.aggregate_id.clone()));
                continue;
            }
            head = Some((e.aggregate_type, e.aggregate_id, e.sequence, e.hash));
        }
    }
    Ok(first)
}

/// Verifies the whole log against `key`, the trusted public audit key, and `witness`.
pub async fn verify(pool: &PgPool, key: &VerifyingKey, witness: &dyn Witness) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let cks = checkpoint::load_headers(pool).await?;
    check_headers(&cks, key).map_err(VerifyError::Violation)?;
    let newest = witness.newest().await?;
    check_witness(&cks, newest.as_ref(), &witness.describe(), key).map_err(VerifyError::Violation)?;
    let by_checkpoint = checkpoint_pass(pool, &cks).await?;
    let by_chain = chain_pass(pool).await?;
    let (events, uncheckpointed) = match (by_checkpoint, by_chain) {
        (Err(a), Some(b)) => return Err(VerifyError::Violation(if b.position < a.position { b } else { a })),
        (Err(a), None) => return Err(VerifyError::Violation(a)),
        (Ok(_), Some(b)) => return Err(VerifyError::Violation(b)),
        (Ok(counts), None) => counts,
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(VerifyReport {
        events,
        checkpoints: cks.len() as u64,
        uncheckpointed,
        witnessed_checkpoint: newest.map(|w| w.seq),
        witness: witness.describe(),
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
    })
}

/// What [`verify_stream`] found for one aggregate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamReport {
    pub events: u64,
    /// Of them, those under a signed checkpoint, matched to its leaves.
    pub checkpointed: u64,
    pub checkpoints: u64,
    /// The newest checkpoint the witness holds, matched in the database.
    pub witnessed_checkpoint: Option<i64>,
    pub seconds: f64,
}

/// Verifies one aggregate's events with the checks of [`verify`] that they alone can answer:
/// every checkpoint's signature and chain, the newest witnessed checkpoint, each event's hash
/// re-derived, the stream's sequence and `prev_hash` from its first event, and each event under
/// a checkpoint matched to that checkpoint's signed leaves (whose digest is re-folded). What
/// only the whole log shows (an event slipped into another stream, leaves naming events that
/// are gone) is `mira audit verify`'s. `tenant` confines the read to one tenant's stream.
pub async fn verify_stream(
    pool: &PgPool,
    key: &VerifyingKey,
    witness: &dyn Witness,
    tenant: Option<&mira_events::TenantId>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<StreamReport, VerifyError> {
    let started = Instant::now();
    let cks = checkpoint::load_headers(pool).await?;
    check_headers(&cks, key).map_err(VerifyError::Violation)?;
    let newest = witness.newest().await?;
    check_witness(&cks, newest.as_ref(), &witness.describe(), key).map_err(VerifyError::Violation)?;
    let events = crate::store::EventLog::new(pool.clone())
        .read_stream(tenant, aggregate_type, aggregate_id, 0)
        .await?;
    let (mut last_seq, mut last_hash) = (0, ZERO_HASH);
    let mut leaves: std::collections::HashMap<i64, Vec<u8>> = std::collections::HashMap::new();
    let mut checkpointed = 0u64;
    for e in &events {
        if let Some(reason) = chain_fault(e, last_seq, last_hash) {
            return Err(VerifyError::Violation(violation(
                e.global_position,
                Some(e.event_id),
                reason,
            )));
        }
        (last_seq, last_hash) = (e.sequence, e.hash);
        // The checkpoint whose range holds this event, if one does yet.
        let Some(c) = cks.get(cks.partition_point(|c| c.upto < e.cursor())) else {
            continue;
        };
        if let std::collections::hash_map::Entry::Vacant(slot) = leaves.entry(c.seq) {
            let bytes = checkpoint::load_leaves(pool, c.seq).await?;
            if bytes.len() as i64 != c.leaves_len || fold_leaves(c.prev_digest, &bytes) != c.digest {
                return Err(VerifyError::Violation(violation(
                    c.upto.position,
                    None,
                    format!("checkpoint {}'s leaves do not match its signed digest", c.seq),
                )));
            }
            slot.insert(bytes);
        }
        let leaf = leaves[&c.seq].chunks_exact(LEAF_LEN).find(|l| {
            i64::from_be_bytes(l[..8].try_into().expect("8 bytes")) == e.global_position
                && l[8..24] == *e.event_id.as_bytes()
        });
        match leaf {
            None => {
                return Err(VerifyError::Violation(violation(
                    e.global_position,
                    Some(e.event_id),
                    format!("event is not covered by checkpoint {} (inserted or moved)", c.seq),
                )))
            }
            Some(l) if l[24..] != e.hash => {
                return Err(VerifyError::Violation(violation(
                    e.global_position,
                    Some(e.event_id),
                    format!(
                        "hash differs from the one signed in checkpoint {} (altered and re-hashed)",
                        c.seq
                    ),
                )))
            }
            Some(_) => checkpointed += 1,
        }
    }
    Ok(StreamReport {
        events: events.len() as u64,
        checkpointed,
        checkpoints: cks.len() as u64,
        witnessed_checkpoint: newest.map(|w| w.seq),
        seconds: started.elapsed().as_secs_f64(),
    })
}
