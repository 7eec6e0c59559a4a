//! `mira audit verify`: re-derives every hash, follows every aggregate's chain, checks every
//! checkpoint's signature, digest and leaves against the log, and compares every record of the
//! witness (every version of every object) with the database and every checkpoint of the
//! database with the witness (`witness_check`). It reports the first bad event by position and
//! id.
//!
//! What each attack looks like here:
//! * a changed byte: the recomputed hash differs from the stored one;
//! * a deleted event in a stream: the checkpoint that covers it names it as missing (and
//!   without a checkpoint, the next event's sequence and `prev_hash` no longer chain);
//! * a change with every later hash recomputed: the chain holds, but the hash differs from the
//!   signed checkpoint's leaf;
//! * a deleted tail: the last checkpoint's leaves name events that are no longer there;
//! * deleted checkpoints (all, some, or the newest ones with the events after them), then
//!   re-hashed events, then new checkpoints numbered past the deleted ones: a witnessed
//!   checkpoint is missing from the database or differs from it (every record counts, not only
//!   the newest);
//! * a checkpoint row slipped in without the witness: it is in the database, not the witness;
//! * a witness record replaced or hidden (S3): a second version or a delete marker;
//! * an event slipped in below a checkpoint's end: no checkpoint covers it.
//!
//! Memory does not grow with the log: checkpoint headers are read a page at a time and
//! leaves one checkpoint at a time (each covers at most [`checkpoint::MAX_SPAN`] events), the
//! witness is listed a page at a time beside them, the checkpoint pass reads only positions, ids and hashes
//! in follow order, and the chain pass walks the stream index one aggregate after another,
//! holding only the current aggregate's head.
//!
//! Events after the last checkpoint are protected by their chains alone until the next
//! checkpoint covers them; the relay writes one every N events or T seconds.

use std::time::Instant;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use mira_events::canonical::{fold_leaves, Hash32, LEAF_LEN, ZERO_HASH};
use sqlx::PgPool;
use uuid::Uuid;

use crate::checkpoint::{self, Checkpoint};
use crate::finding::violation;
pub use crate::finding::{VerifyError, Violation};
use crate::store::{from_row, read_leaves_below, watermark, Cursor, COLUMNS};
use crate::witness::Witness;

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub events: u64,
    pub checkpoints: u64,
    /// Events after the last checkpoint, protected by their chains only.
    pub uncheckpointed: u64,
    /// The newest checkpoint of the log's current epoch that the witness holds, matched in the
    /// database.
    pub witnessed_checkpoint: Option<i64>,
    /// Witness records compared with the database.
    pub witness_records: u64,
    /// Every epoch the database or the witness knows, oldest first.
    pub epochs: Vec<crate::witness_check::EpochSummary>,
    pub witness: String,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// What the header checks carry from one checkpoint to the next.
struct HeaderState {
    seq: i64,
    digest: Hash32,
    count: i64,
    upto: Cursor,
}

impl HeaderState {
    const START: Self = Self {
        seq: 0,
        digest: ZERO_HASH,
        count: 0,
        upto: Cursor::START,
    };

    /// Checks `c` as the checkpoint after the previous, without its leaves: number, signature,
    /// digest chain, count.
    fn check(&mut self, c: &Checkpoint, key: &VerifyingKey) -> Result<(), Violation> {
        let bad = |reason: String| violation(c.upto.position, None, reason);
        if c.seq != self.seq + 1 {
            return Err(bad(format!(
                "checkpoint {} follows checkpoint {}: checkpoints are missing",
                c.seq, self.seq
            )));
        }
        if key
            .verify(&c.canonical().bytes(), &Signature::from_bytes(&c.signature))
            .is_err()
        {
            return Err(bad(format!(
                "checkpoint {} has a signature that the audit key did not make",
                c.seq
            )));
        }
        if c.prev_digest != self.digest {
            return Err(bad(format!(
                "checkpoint {} does not continue checkpoint {}",
                c.seq, self.seq
            )));
        }
        if c.leaves_len % LEAF_LEN as i64 != 0
            || c.event_count != self.count + c.leaves_len / LEAF_LEN as i64
            || c.upto < self.upto
        {
            return Err(bad(format!(
                "checkpoint {}'s leaves do not match its signed count",
                c.seq
            )));
        }
        *self = Self {
            seq: c.seq,
            digest: c.digest,
            count: c.event_count,
            upto: c.upto,
        };
        Ok(())
    }
}

/// Every checkpoint's header in order, a page at a time. Returns how many there are.
async fn header_pass(pool: &PgPool, key: &VerifyingKey) -> Result<Result<u64, Violation>, sqlx::Error> {
    let mut headers = checkpoint::Headers::all(pool);
    let mut state = HeaderState::START;
    while let Some(c) = headers.next().await? {
        if let Err(v) = state.check(&c, key) {
            return Ok(Err(v));
        }
    }
    Ok(Ok(state.seq as u64))
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

/// Walks the log in follow order against the checkpoints' leaves, reading one checkpoint at a
/// time. Returns the events seen and how many no checkpoint covers yet.
async fn checkpoint_pass(pool: &PgPool) -> Result<Result<(u64, u64), Violation>, sqlx::Error> {
    let last_upto = checkpoint::load_header(pool, checkpoint::last_seq(pool).await?)
        .await?
        .map(|c| (c.seq, c.upto));
    let mut checkpoints = checkpoint::WithLeaves::all(pool);
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
            while current.as_ref().is_none_or(|l| l.next >= l.bytes.len()) {
                let Some((c, bytes)) = checkpoints.next().await? else {
                    break;
                };
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
                    if let Some((last_seq, upto)) = last_upto.filter(|(_, u)| e.cursor <= *u) {
                        let _ = upto;
                        return Ok(Err(violation(
                            pos,
                            Some(e.event_id),
                            format!(
                                "event is older than the end of checkpoint {last_seq} but no checkpoint covers it (inserted)"
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
        let Some((c, bytes)) = checkpoints.next().await? else {
            break;
        };
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

/// Verifies the whole log against `key`, the trusted public audit key, and `witness`: every
/// checkpoint's header, every record the witness holds (every version), every event against
/// the checkpoints' leaves, every aggregate's chain.
pub async fn verify(pool: &PgPool, key: &VerifyingKey, witness: &dyn Witness) -> Result<VerifyReport, VerifyError> {
    let started = Instant::now();
    let checkpoints = header_pass(pool, key).await?.map_err(VerifyError::Violation)?;
    let sweep = crate::witness_check::sweep(pool, key, witness)
        .await?
        .map_err(VerifyError::Violation)?;
    let by_checkpoint = checkpoint_pass(pool).await?;
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
        checkpoints,
        uncheckpointed,
        witnessed_checkpoint: sweep.newest_witnessed,
        witness_records: sweep.records,
        epochs: sweep.epochs,
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
    /// The checkpoints that cover them, each checked against the witness.
    pub checkpoints: u64,
    /// The log's newest checkpoint, matched in the witness (with nothing witnessed after it).
    pub witnessed_checkpoint: Option<i64>,
    pub seconds: f64,
}

/// Verifies one aggregate's events with the checks of [`verify`] that they alone can answer,
/// reading only the checkpoints that cover them and the newest: each event's hash re-derived,
/// the stream's sequence and `prev_hash` from its first event, each event under a checkpoint
/// matched to that checkpoint's signed leaves (whose digest is re-folded and whose signature
/// is checked), each such checkpoint and the newest compared with their witness records, and
/// nothing witnessed after the newest. What only the whole log shows (an event slipped into
/// another stream, a checkpoint deleted in the middle, every record of the witness) is `mira
/// audit verify`'s. `tenant` confines the read to one tenant's stream.
pub async fn verify_stream(
    pool: &PgPool,
    key: &VerifyingKey,
    witness: &dyn Witness,
    tenant: Option<&mira_events::TenantId>,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<StreamReport, VerifyError> {
    let started = Instant::now();
    let mut records = crate::witness_check::Records::new(key, witness);
    let events = crate::store::EventLog::new(pool.clone())
        .read_stream(tenant, aggregate_type, aggregate_id, 0)
        .await?;
    let (mut last_seq, mut last_hash) = (0, ZERO_HASH);
    let mut current: Option<(Checkpoint, Vec<u8>)> = None;
    let mut checkpointed = 0u64;
    let mut checkpoints = 0u64;
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
        if current.as_ref().is_none_or(|(c, _)| c.upto < e.cursor()) {
            let Some(c) = checkpoint::covering(pool, e.cursor()).await? else {
                current = None;
                continue;
            };
            if key
                .verify(&c.canonical().bytes(), &Signature::from_bytes(&c.signature))
                .is_err()
            {
                return Err(VerifyError::Violation(violation(
                    c.upto.position,
                    None,
                    format!("checkpoint {} has a signature that the audit key did not make", c.seq),
                )));
            }
            let bytes = checkpoint::load_leaves(pool, c.seq).await?;
            if bytes.len() as i64 != c.leaves_len || fold_leaves(c.prev_digest, &bytes) != c.digest {
                return Err(VerifyError::Violation(violation(
                    c.upto.position,
                    None,
                    format!("checkpoint {}'s leaves do not match its signed digest", c.seq),
                )));
            }
            records.check(&c).await?.map_err(VerifyError::Violation)?;
            checkpoints += 1;
            current = Some((c, bytes));
        }
        let (c, bytes) = current.as_ref().expect("set above");
        let leaf = bytes.chunks_exact(LEAF_LEN).find(|l| {
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
    let newest = records.newest(pool).await?.map_err(VerifyError::Violation)?;
    Ok(StreamReport {
        events: events.len() as u64,
        checkpointed,
        checkpoints,
        witnessed_checkpoint: newest,
        seconds: started.elapsed().as_secs_f64(),
    })
}
