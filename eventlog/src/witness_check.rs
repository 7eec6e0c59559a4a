//! The witness against the database (DESIGN §4.3, ADR 0019): every record counts.
//!
//! [`sweep`] (`mira audit verify`) walks the database's epochs and, for each, the witness's
//! folder of that epoch beside the database's checkpoints of it, both in number order and a
//! page at a time, so memory stays flat however many checkpoints there are:
//! * every record the witness holds must be in the database, identical; a record numbered past
//!   where the log left an epoch is *abandoned* by a restore that a signed epoch record
//!   accounts for, and is reported, not an error;
//! * every checkpoint of the database numbered from the epoch's `witness_from` on must be in
//!   the witness (it was witnessed before it was inserted);
//! * on S3, every object has exactly one version and no delete marker;
//! * each epoch the database started must have its record in the witness, identical, and an
//!   epoch of the witness outside the database's line must be a signed branch (a restore that
//!   was rolled back), never an unknown one.
//!
//! [`Records`] is the per-job check (`GET /api/jobs/{id}/verify`): only the records of the
//! checkpoints it is given, and the newest, with a probe that nothing is witnessed after it.

use std::collections::{BTreeSet, HashMap};

use ed25519_dalek::VerifyingKey;
use sqlx::PgPool;
use uuid::Uuid;

use crate::checkpoint::{self, Checkpoint, Headers};
use crate::finding::{violation, VerifyError, Violation};
use crate::witness::{checkpoint_file, parse_checkpoint_file, EpochRecord, Witness, WitnessRecord};

/// One epoch as `verify` found it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EpochSummary {
    pub epoch: Uuid,
    pub previous: Option<Uuid>,
    /// On the database's line of epochs (false: a branch the witness alone remembers).
    pub in_log: bool,
    pub current: bool,
    /// The first checkpoint number of the epoch.
    pub first_seq: i64,
    /// The last checkpoint of an epoch the log has left.
    pub last_seq: Option<i64>,
    /// Every checkpoint from here on is witnessed; `None` before the epoch's record exists.
    pub witness_from: Option<i64>,
    /// Checkpoint records of the epoch in the witness.
    pub records: u64,
    /// Of them, those numbered past where the log left the epoch.
    pub abandoned: u64,
    pub reason: Option<String>,
    pub started_at_micros: Option<i64>,
}

/// What [`sweep`] found.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub records: u64,
    /// The newest checkpoint of the current epoch the witness holds, matched in the database.
    pub newest_witnessed: Option<i64>,
    pub epochs: Vec<EpochSummary>,
}

type Checked<T> = Result<Result<T, Violation>, VerifyError>;

fn bad<T>(position: i64, reason: String) -> Checked<T> {
    Ok(Err(violation(position, None, reason)))
}

/// The epoch's record in the witness, if any, checked: readable and signed by `key`.
async fn epoch_record(witness: &dyn Witness, key: &VerifyingKey, epoch: Uuid) -> Checked<Option<EpochRecord>> {
    let name = EpochRecord::name(epoch);
    let Some(bytes) = witness.get(&name).await? else {
        return Ok(Ok(None));
    };
    let r = match EpochRecord::from_bytes(&name, &bytes) {
        Ok(r) => r,
        Err(e) => return bad(0, format!("the witness's record of epoch {epoch} is unreadable: {e}")),
    };
    if r.epoch != epoch || !r.signed_by(key) {
        return bad(
            0,
            format!("the witness's record of epoch {epoch} has a signature that the audit key did not make"),
        );
    }
    Ok(Ok(Some(r)))
}

/// A folder of the witness beside the database's checkpoints `first..=end`.
struct Folder<'a> {
    witness: &'a dyn Witness,
    key: &'a VerifyingKey,
    /// The epoch's folder, or `None` for the records from before folders (the first epoch's).
    folder: Option<Uuid>,
    epoch: Uuid,
    first: i64,
    /// The last checkpoint of an epoch the log has left.
    end: Option<i64>,
    /// Database checkpoints numbered from here on must be in the witness.
    witness_from: i64,
}

#[derive(Debug, Default)]
struct FolderStats {
    records: u64,
    abandoned: u64,
    newest: Option<i64>,
}

impl Folder<'_> {
    fn describe(&self, seq: i64) -> String {
        match self.folder {
            Some(e) => format!("checkpoint {seq} of epoch {e}"),
            None => format!("checkpoint {seq} (at the top of the witness, from before epoch folders)"),
        }
    }

    /// A database checkpoint with no record in the witness.
    fn unwitnessed(&self, h: &Checkpoint) -> Result<(), Violation> {
        if self.folder.is_some() && h.epoch != self.epoch {
            return Err(violation(
                h.upto.position,
                None,
                format!(
                    "checkpoint {} is signed for epoch {} but the log was in epoch {} there",
                    h.seq, h.epoch, self.epoch
                ),
            ));
        }
        if h.seq >= self.witness_from {
            return Err(violation(
                h.upto.position,
                None,
                format!(
                    "checkpoint {} is in the database but not in the witness ({}): every checkpoint from {} on is witnessed before it is written, so this one was not written by Mira",
                    h.seq,
                    self.witness.describe(),
                    self.witness_from
                ),
            ));
        }
        Ok(())
    }

    async fn compare(&self, pool: &PgPool) -> Checked<FolderStats> {
        let mut headers = Headers::range(pool, self.first, self.end.unwrap_or(i64::MAX));
        let mut stats = FolderStats::default();
        // The end of the last database checkpoint passed: where missing events would start.
        let mut last_end = match self.first {
            1 => 0,
            n => checkpoint::load_header(pool, n - 1)
                .await?
                .map_or(0, |h| h.upto.position),
        };
        let mut after = String::new();
        loop {
            let page = self.witness.list(self.folder, &after, 1000).await?;
            for l in &page {
                let seq = parse_checkpoint_file(&l.name);
                if l.versions > 1 || l.delete_markers > 0 {
                    let what = match seq {
                        Some(s) => self.describe(s),
                        None => format!("{} of epoch {}", l.name, self.epoch),
                    };
                    return bad(
                        last_end,
                        format!(
                            "{what} has {} versions and {} delete markers in the witness ({}): a witnessed record was replaced or hidden",
                            l.versions,
                            l.delete_markers,
                            self.witness.describe()
                        ),
                    );
                }
                let Some(seq) = seq else { continue };
                while let Some(h) = headers.peek().await? {
                    if h.seq >= seq {
                        break;
                    }
                    let h = headers.next().await?.expect("peeked");
                    if let Err(v) = self.unwitnessed(&h) {
                        return Ok(Err(v));
                    }
                    last_end = h.upto.position;
                }
                stats.records += 1;
                if self.end.is_some_and(|end| seq > end) {
                    stats.abandoned += 1;
                    continue;
                }
                if seq < self.first {
                    return bad(
                        last_end,
                        format!(
                            "{} is in the witness but the epoch begins at checkpoint {}",
                            self.describe(seq),
                            self.first
                        ),
                    );
                }
                let name = match self.folder {
                    Some(e) => WitnessRecord::name(e, seq),
                    None => checkpoint_file(seq),
                };
                let rec = match self.witness.get(&name).await? {
                    Some(bytes) => match WitnessRecord::from_bytes(&name, &bytes) {
                        Ok(r) => r,
                        Err(e) => {
                            return bad(
                                last_end,
                                format!("{} is unreadable in the witness: {e}", self.describe(seq)),
                            )
                        }
                    },
                    None => {
                        return bad(
                            last_end,
                            format!("{} was listed by the witness but cannot be read", self.describe(seq)),
                        )
                    }
                };
                match headers.peek().await? {
                    Some(h) if h.seq == seq => {
                        if h.witness_record() != rec {
                            return bad(
                                rec.upto_position,
                                format!(
                                    "{} in the database differs from its witnessed copy ({})",
                                    self.describe(seq),
                                    self.witness.describe()
                                ),
                            );
                        }
                        last_end = h.upto.position;
                        stats.newest = Some(seq);
                        headers.next().await?;
                    }
                    _ => {
                        let unsigned = if rec.signed_by(self.key) {
                            ""
                        } else {
                            " (the record is not signed by the audit key)"
                        };
                        return bad(
                            last_end + 1,
                            format!(
                                "{} (events after position {last_end} through position {}, {} in all) is in the witness ({}) but missing from the database: checkpoints and the events they covered were deleted{unsigned}",
                                self.describe(seq),
                                rec.upto_position,
                                rec.event_count,
                                self.witness.describe()
                            ),
                        );
                    }
                }
            }
            match page.last() {
                Some(l) if page.len() == 1000 => after = l.name.clone(),
                _ => break,
            }
        }
        while let Some(h) = headers.next().await? {
            if let Err(v) = self.unwitnessed(&h) {
                return Ok(Err(v));
            }
        }
        Ok(Ok(stats))
    }
}

/// Every record of the witness against the database, and the database against the witness.
pub async fn sweep(pool: &PgPool, key: &VerifyingKey, witness: &dyn Witness) -> Checked<Sweep> {
    let lineage = checkpoint::db_epochs(pool).await?;
    let db_last = checkpoint::last_seq(pool).await?;
    let mut others: BTreeSet<Uuid> = witness.epochs().await?.into_iter().collect();
    let mut out = Sweep::default();
    for (i, e) in lineage.iter().enumerate() {
        others.remove(&e.epoch);
        let end = lineage
            .get(i + 1)
            .map(|next| next.record.as_ref().expect("a started epoch has a record").after_seq);
        let current = end.is_none();
        let rec = match epoch_record(witness, key, e.epoch).await? {
            Ok(r) => r,
            Err(v) => return Ok(Err(v)),
        };
        match (&e.record, &rec) {
            (Some(_), None) => {
                return bad(
                    0,
                    format!(
                        "epoch {} was started in the database but the witness ({}) has no record of it",
                        e.epoch,
                        witness.describe()
                    ),
                )
            }
            (Some(db), Some(w)) if db != w => {
                return bad(
                    0,
                    format!(
                        "epoch {} in the database differs from its record in the witness",
                        e.epoch
                    ),
                )
            }
            (None, Some(w)) if w.previous.is_some() || w.after_seq != 0 => {
                return bad(
                    0,
                    format!(
                        "the witness's record of the log's first epoch {} says it continues another",
                        e.epoch
                    ),
                )
            }
            _ => {}
        }
        let witness_from = rec.as_ref().map(|r| r.witness_from);
        let folder = Folder {
            witness,
            key,
            folder: Some(e.epoch),
            epoch: e.epoch,
            first: e.first_seq(),
            end,
            witness_from: witness_from.unwrap_or(i64::MAX),
        };
        // Records from before epoch folders (all of the first epoch's) are older: first.
        let legacy = if i == 0 {
            let legacy = Folder {
                folder: None,
                witness_from: i64::MAX,
                ..folder
            };
            match legacy.compare(pool).await? {
                Ok(s) => s,
                Err(v) => return Ok(Err(v)),
            }
        } else {
            FolderStats::default()
        };
        let stats = match folder.compare(pool).await? {
            Ok(s) => s,
            Err(v) => return Ok(Err(v)),
        };
        let mut summary = EpochSummary {
            epoch: e.epoch,
            previous: rec.as_ref().and_then(|r| r.previous),
            in_log: true,
            current,
            first_seq: e.first_seq(),
            last_seq: end,
            witness_from,
            records: stats.records,
            abandoned: stats.abandoned,
            reason: rec.as_ref().map(|r| r.reason.clone()),
            started_at_micros: rec.as_ref().map(|r| r.created_at_micros),
        };
        summary.records += legacy.records;
        summary.abandoned += legacy.abandoned;
        let newest = stats.newest.max(legacy.newest);
        if i == 0 && rec.is_none() && summary.records == 0 && db_last > 0 && lineage.len() == 1 {
            return bad(
                0,
                format!(
                    "the witness ({}) holds no checkpoint but the database has {db_last}: it is not the witness the relay writes to, or it was emptied",
                    witness.describe()
                ),
            );
        }
        out.records += summary.records;
        if current {
            out.newest_witnessed = newest;
        }
        out.epochs.push(summary);
    }
    // Epochs the witness holds and the database's line does not: branches left by a restore
    // that was itself undone. Each must be one this key started.
    for epoch in others {
        let rec = match epoch_record(witness, key, epoch).await? {
            Ok(Some(r)) if r.previous.is_some() => r,
            Ok(_) => {
                return bad(
                    0,
                    format!(
                        "the witness ({}) holds epoch {epoch}, which this log never had and no signed epoch record starts: it is another log's witness, or was written to by hand",
                        witness.describe()
                    ),
                )
            }
            Err(v) => return Ok(Err(v)),
        };
        let branch = Folder {
            witness,
            key,
            folder: Some(epoch),
            epoch,
            first: rec.after_seq + 1,
            end: Some(rec.after_seq),
            witness_from: i64::MAX,
        };
        let stats = match branch.compare(pool).await? {
            Ok(s) => s,
            Err(v) => return Ok(Err(v)),
        };
        out.records += stats.records;
        out.epochs.push(EpochSummary {
            epoch,
            previous: rec.previous,
            in_log: false,
            current: false,
            first_seq: rec.after_seq + 1,
            last_seq: None,
            witness_from: Some(rec.witness_from),
            records: stats.records,
            abandoned: stats.abandoned,
            reason: Some(rec.reason.clone()),
            started_at_micros: Some(rec.created_at_micros),
        });
    }
    Ok(Ok(out))
}

/// The per-job check's view of the witness: single records, fetched by name.
#[derive(Debug)]
pub struct Records<'a> {
    key: &'a VerifyingKey,
    witness: &'a dyn Witness,
    witness_from: HashMap<Uuid, i64>,
}

impl<'a> Records<'a> {
    pub fn new(key: &'a VerifyingKey, witness: &'a dyn Witness) -> Self {
        Self {
            key,
            witness,
            witness_from: HashMap::new(),
        }
    }

    async fn witness_from(&mut self, epoch: Uuid) -> Checked<i64> {
        if let Some(w) = self.witness_from.get(&epoch) {
            return Ok(Ok(*w));
        }
        let w = match epoch_record(self.witness, self.key, epoch).await? {
            Ok(r) => r.map_or(i64::MAX, |r| r.witness_from),
            Err(v) => return Ok(Err(v)),
        };
        self.witness_from.insert(epoch, w);
        Ok(Ok(w))
    }

    /// Checkpoint `c` (already checked against the key) against its witness record.
    pub async fn check(&mut self, c: &Checkpoint) -> Checked<bool> {
        let from = match self.witness_from(c.epoch).await? {
            Ok(w) => w,
            Err(v) => return Ok(Err(v)),
        };
        let mut bytes = self.witness.get(&WitnessRecord::name(c.epoch, c.seq)).await?;
        if bytes.is_none() && c.seq < from {
            bytes = self.witness.get(&checkpoint_file(c.seq)).await?;
        }
        let Some(bytes) = bytes else {
            if c.seq >= from {
                return bad(
                    c.upto.position,
                    format!(
                        "checkpoint {} is in the database but not in the witness ({})",
                        c.seq,
                        self.witness.describe()
                    ),
                );
            }
            return Ok(Ok(false));
        };
        match WitnessRecord::from_bytes("witness", &bytes) {
            Ok(r) if r == c.witness_record() => Ok(Ok(true)),
            _ => bad(
                c.upto.position,
                format!(
                    "checkpoint {} in the database differs from its witnessed copy ({})",
                    c.seq,
                    self.witness.describe()
                ),
            ),
        }
    }

    /// The log's newest checkpoint against the witness, and nothing witnessed after it in the
    /// current epoch. Returns the newest checkpoint's number when the witness holds it.
    pub async fn newest(&mut self, pool: &PgPool) -> Checked<Option<i64>> {
        let last = checkpoint::last_seq(pool).await?;
        let current = checkpoint::db_epochs(pool).await?.pop().expect("a first epoch").epoch;
        let mut witnessed = None;
        let mut end = 0;
        if let Some(h) = checkpoint::load_header(pool, last).await? {
            let sig = ed25519_dalek::Signature::from_bytes(&h.signature);
            if ed25519_dalek::Verifier::verify(self.key, &h.canonical().bytes(), &sig).is_err() {
                return bad(
                    h.upto.position,
                    format!("checkpoint {} has a signature that the audit key did not make", h.seq),
                );
            }
            match self.check(&h).await? {
                Ok(true) => witnessed = Some(h.seq),
                Ok(false) => {}
                Err(v) => return Ok(Err(v)),
            }
            end = h.upto.position;
        }
        let next = last + 1;
        if let Some(bytes) = self.witness.get(&WitnessRecord::name(current, next)).await? {
            let through = WitnessRecord::from_bytes("witness", &bytes).map_or(0, |r| r.upto_position);
            return bad(
                end + 1,
                format!(
                    "checkpoint {next} of epoch {current} (events after position {end} through position {through}) is in the witness ({}) but missing from the database: checkpoints and the events they covered were deleted",
                    self.witness.describe()
                ),
            );
        }
        Ok(Ok(witnessed))
    }
}
