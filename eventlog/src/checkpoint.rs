//! Signed checkpoints (DESIGN §4.3).
//!
//! A checkpoint commits to every event up to a cursor: it stores the leaves (position, id,
//! hash) of the events since the previous checkpoint and the chained digest over all leaves
//! so far, and signs that digest with an Ed25519 key the database never holds. Someone who
//! rewrites events *and* recomputes their hashes still cannot produce a matching signature.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use mira_events::canonical::{fold_leaves, leaf, CanonicalCheckpoint, Hash32, LEAF_LEN, ZERO_HASH};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::store::{now_micros, read_leaves_below, watermark, Cursor};
use crate::witness::{Created, EpochRecord, Witness, WitnessError, WitnessRecord};

const LOCK_KEY: i64 = 0x6d69_7261_636b_7074; // "mirackpt"

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("audit key file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// The checkpoint signing key: 32 secret bytes as hex in a file (mode 0600). Its public half
/// is written next to it as `<file>.pub`, which is all a verifier needs.
pub struct AuditKey {
    signing: SigningKey,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey({})", key_id(&self.verifying_key()))
    }
}

fn key_err(path: &Path, reason: impl ToString) -> KeyError {
    KeyError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_hex32(path: &Path) -> Result<Option<[u8; 32]>, KeyError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let bytes = hex::decode(s.trim()).map_err(|_| key_err(path, "is not hex"))?;
            let arr: [u8; 32] = bytes.try_into().map_err(|_| key_err(path, "is not 32 bytes"))?;
            Ok(Some(arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(key_err(path, e)),
    }
}

pub fn public_key_path(signing_key_path: &Path) -> PathBuf {
    let mut s = signing_key_path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl AuditKey {
    /// Loads the key. A missing file is an error, never a new key: checkpoints signed by a key
    /// nobody kept would later look like tampering (`mira keys init` creates it).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let seed = read_hex32(path)?.ok_or_else(|| key_err(path, "does not exist (run `mira keys init`)"))?;
        Ok(Self::from_seed(seed))
    }

    /// The key from its 32 secret bytes.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The key from 64 hex digits (a Secrets Manager secret).
    pub fn from_hex(what: &str, hex_seed: &str) -> Result<Self, KeyError> {
        let bytes = hex::decode(hex_seed.trim()).map_err(|_| key_err(Path::new(what), "is not hex"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| key_err(Path::new(what), "is not 32 bytes"))?;
        Ok(Self::from_seed(seed))
    }

    /// A new random key, not yet stored anywhere.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| key_err(Path::new("random source"), e))?;
        Ok(Self::from_seed(seed))
    }

    /// 64 hex digits of the secret half, for storing it (Secrets Manager).
    pub fn secret_hex(&self) -> String {
        hex::encode(self.signing.to_bytes())
    }

    /// `mira keys init`: loads the key at `path`, creating it (mode 0600) and its `.pub` when
    /// the file does not exist. Returns the key and whether it was created now.
    pub fn init(path: &Path) -> Result<(Self, bool), KeyError> {
        let (key, created) = match read_hex32(path)? {
            Some(seed) => (Self::from_seed(seed), false),
            None => {
                let key = Self::generate()?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| key_err(path, e))?;
                }
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                use std::io::Write;
                let mut f = opts.open(path).map_err(|e| key_err(path, e))?;
                f.write_all(key.secret_hex().as_bytes()).map_err(|e| key_err(path, e))?;
                f.sync_all().map_err(|e| key_err(path, e))?;
                (key, true)
            }
        };
        let pub_path = public_key_path(path);
        if read_hex32(&pub_path)?.is_none() {
            std::fs::write(&pub_path, hex::encode(key.verifying_key().as_bytes()))
                .map_err(|e| key_err(&pub_path, e))?;
        }
        Ok((key, created))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// An Ed25519 signature over `bytes`.
    pub fn sign(&self, bytes: &[u8]) -> [u8; 64] {
        self.signing.sign(bytes).to_bytes()
    }
}

/// Reads a public key: hex in a file, or the `.pub` beside a signing key file.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let bytes = read_hex32(path)?.ok_or_else(|| key_err(path, "does not exist"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| key_err(path, e))
}

/// A short, stable id for a public key.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The most events one checkpoint covers: its leaves (56 bytes each) are one `bytea`, read and
/// written whole, so a long log is covered by a series of checkpoints of bounded size.
pub const MAX_SPAN: i64 = 20_000;

/// One checkpoint row, without its leaves (see [`load_leaves`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub epoch: Uuid,
    pub created_at: DateTime<Utc>,
    pub upto: Cursor,
    pub event_count: i64,
    pub prev_digest: Hash32,
    pub digest: Hash32,
    /// Bytes of leaves (`LEAF_LEN` per event).
    pub leaves_len: i64,
    pub key_id: String,
    pub signature: [u8; 64],
}

impl Checkpoint {
    /// The copy of this checkpoint a witness keeps.
    pub fn witness_record(&self) -> WitnessRecord {
        WitnessRecord {
            seq: self.seq,
            epoch: self.epoch,
            created_at_micros: self.created_at.timestamp_micros(),
            upto_tx: self.upto.tx_id,
            upto_position: self.upto.position,
            event_count: self.event_count,
            prev_digest: hex::encode(self.prev_digest),
            digest: hex::encode(self.digest),
            key_id: self.key_id.clone(),
            signature: hex::encode(self.signature),
        }
    }

    pub fn canonical(&self) -> CanonicalCheckpoint {
        CanonicalCheckpoint {
            epoch: self.epoch,
            seq: self.seq,
            created_at_micros: self.created_at.timestamp_micros(),
            upto_tx: self.upto.tx_id,
            upto_position: self.upto.position,
            event_count: self.event_count,
            prev_digest: self.prev_digest,
            digest: self.digest,
        }
    }
}

fn to32<const N: usize>(v: Vec<u8>, what: &str) -> Result<[u8; N], sqlx::Error> {
    v.try_into()
        .map_err(|_| sqlx::Error::Decode(format!("checkpoint {what} has the wrong length").into()))
}

const HEADER_COLUMNS: &str = "seq, epoch, created_at, upto_tx::text::bigint AS upto_tx, upto_position, \
     event_count, prev_digest, digest, length(leaves)::bigint AS leaves_len, key_id, signature";

fn header_of(r: &sqlx::postgres::PgRow) -> Result<Checkpoint, sqlx::Error> {
    Ok(Checkpoint {
        seq: r.try_get("seq")?,
        epoch: r.try_get("epoch")?,
        created_at: r.try_get("created_at")?,
        upto: Cursor {
            tx_id: r.try_get("upto_tx")?,
            position: r.try_get("upto_position")?,
        },
        event_count: r.try_get("event_count")?,
        prev_digest: to32(r.try_get("prev_digest")?, "prev_digest")?,
        digest: to32(r.try_get("digest")?, "digest")?,
        leaves_len: r.try_get("leaves_len")?,
        key_id: r.try_get("key_id")?,
        signature: to32(r.try_get("signature")?, "signature")?,
    })
}

/// One checkpoint's leaves (at most [`MAX_SPAN`] × 56 bytes for checkpoints Mira wrote).
pub async fn load_leaves(pool: &PgPool, seq: i64) -> Result<Vec<u8>, sqlx::Error> {
    sqlx::query_scalar("SELECT leaves FROM checkpoints WHERE seq = $1")
        .bind(seq)
        .fetch_one(pool)
        .await
}

/// The newest checkpoint's number (0 before the first).
pub async fn last_seq(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM checkpoints")
        .fetch_one(pool)
        .await
}

/// One checkpoint's header.
pub async fn load_header(pool: &PgPool, seq: i64) -> Result<Option<Checkpoint>, sqlx::Error> {
    sqlx::query(&format!("SELECT {HEADER_COLUMNS} FROM checkpoints WHERE seq = $1"))
        .bind(seq)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(header_of)
        .transpose()
}

/// The first checkpoint whose range ends at or after `cursor`: the one covering an event there,
/// if any covers it yet.
pub async fn covering(pool: &PgPool, cursor: Cursor) -> Result<Option<Checkpoint>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {HEADER_COLUMNS} FROM checkpoints WHERE (upto_tx, upto_position) >= ($1::text::xid8, $2) \
         ORDER BY upto_tx, upto_position, seq LIMIT 1"
    ))
    .bind(cursor.tx_id.to_string())
    .bind(cursor.position)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(header_of)
    .transpose()
}

/// Checkpoint headers in order, a page at a time: memory stays flat however many there are.
#[derive(Debug)]
pub struct Headers {
    pool: PgPool,
    after: i64,
    upto: i64,
    page: std::collections::VecDeque<Checkpoint>,
    done: bool,
}

impl Headers {
    /// Headers numbered `from..=upto`.
    pub fn range(pool: &PgPool, from: i64, upto: i64) -> Self {
        Self {
            pool: pool.clone(),
            after: from - 1,
            upto,
            page: Default::default(),
            done: false,
        }
    }

    pub fn all(pool: &PgPool) -> Self {
        Self::range(pool, 1, i64::MAX)
    }

    pub async fn peek(&mut self) -> Result<Option<&Checkpoint>, sqlx::Error> {
        if self.page.is_empty() && !self.done {
            let rows = sqlx::query(&format!(
                "SELECT {HEADER_COLUMNS} FROM checkpoints WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT 1000"
            ))
            .bind(self.after)
            .bind(self.upto)
            .fetch_all(&self.pool)
            .await?;
            self.done = rows.len() < 1000;
            for r in &rows {
                self.page.push_back(header_of(r)?);
            }
            if let Some(last) = self.page.back() {
                self.after = last.seq;
            }
        }
        Ok(self.page.front())
    }

    pub async fn next(&mut self) -> Result<Option<Checkpoint>, sqlx::Error> {
        self.peek().await?;
        Ok(self.page.pop_front())
    }
}

/// Checkpoints in order with their leaves, fetched several at a time (up to about 4 MB of
/// leaves per query): a log of many small checkpoints costs a query per batch, not per
/// checkpoint.
#[derive(Debug)]
pub struct WithLeaves {
    headers: Headers,
    ready: std::collections::VecDeque<(Checkpoint, Vec<u8>)>,
}

impl WithLeaves {
    pub fn all(pool: &PgPool) -> Self {
        Self {
            headers: Headers::all(pool),
            ready: Default::default(),
        }
    }

    pub async fn next(&mut self) -> Result<Option<(Checkpoint, Vec<u8>)>, sqlx::Error> {
        if self.ready.is_empty() {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(h) = self.headers.peek().await? {
                if !batch.is_empty() && (bytes + h.leaves_len > 4 << 20 || batch.len() >= 1000) {
                    break;
                }
                bytes += h.leaves_len;
                batch.push(self.headers.next().await?.expect("peeked"));
            }
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                return Ok(None);
            };
            let rows: Vec<(i64, Vec<u8>)> =
                sqlx::query_as("SELECT seq, leaves FROM checkpoints WHERE seq BETWEEN $1 AND $2 ORDER BY seq")
                    .bind(first.seq)
                    .bind(last.seq)
                    .fetch_all(&self.headers.pool)
                    .await?;
            let mut rows = rows.into_iter().peekable();
            for h in batch {
                // A row gone between the two reads reads as no leaves: the digest check fails.
                let leaves = match rows.peek() {
                    Some((seq, _)) if *seq == h.seq => rows.next().expect("peeked").1,
                    _ => Vec::new(),
                };
                self.ready.push_back((h, leaves));
            }
        }
        Ok(self.ready.pop_front())
    }
}

/// An epoch of the log as the database records it: the first (`log_epoch`) or one started by
/// `mira audit new-epoch` (`log_epochs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbEpoch {
    pub epoch: Uuid,
    /// For a started epoch, its record as written to the witness.
    pub record: Option<EpochRecord>,
}

impl DbEpoch {
    /// The first checkpoint number of this epoch.
    pub fn first_seq(&self) -> i64 {
        self.record.as_ref().map_or(1, |r| r.after_seq + 1)
    }
}

/// The log's epochs, oldest first; the last is the current one.
pub async fn db_epochs(pool: &PgPool) -> Result<Vec<DbEpoch>, sqlx::Error> {
    db_epochs_on(&mut *pool.acquire().await?).await
}

/// [`db_epochs`] on a connection (inside a transaction).
pub async fn db_epochs_on(e: &mut sqlx::PgConnection) -> Result<Vec<DbEpoch>, sqlx::Error> {
    let first: Uuid = sqlx::query_scalar("SELECT epoch FROM log_epoch")
        .fetch_one(&mut *e)
        .await?;
    let mut out = vec![DbEpoch {
        epoch: first,
        record: None,
    }];
    let rows = sqlx::query(
        "SELECT epoch, previous, after_seq, after_digest, witness_from, created_at, reason, key_id, signature \
         FROM log_epochs ORDER BY n",
    )
    .fetch_all(&mut *e)
    .await?;
    for r in rows {
        let epoch: Uuid = r.try_get("epoch")?;
        out.push(DbEpoch {
            epoch,
            record: Some(EpochRecord {
                epoch,
                previous: Some(r.try_get("previous")?),
                after_seq: r.try_get("after_seq")?,
                after_digest: hex::encode(r.try_get::<Vec<u8>, _>("after_digest")?),
                witness_from: r.try_get("witness_from")?,
                created_at_micros: r.try_get::<DateTime<Utc>, _>("created_at")?.timestamp_micros(),
                reason: r.try_get("reason")?,
                key_id: r.try_get("key_id")?,
                signature: hex::encode(r.try_get::<Vec<u8>, _>("signature")?),
            }),
        });
    }
    Ok(out)
}

/// How the witness has fared, for `/metrics` of the process that writes checkpoints.
#[derive(Debug, Default)]
pub struct WitnessHealth {
    conflicts: AtomicU64,
    /// Unix seconds of the last checkpoint the witness took; 0 before the first.
    last_success: AtomicI64,
}

impl WitnessHealth {
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    pub fn last_success_unix(&self) -> i64 {
        self.last_success.load(Ordering::Relaxed)
    }

    fn record<T>(&self, r: &Result<T, CheckpointError>) {
        match r {
            Ok(_) => self.last_success.store(Utc::now().timestamp(), Ordering::Relaxed),
            Err(CheckpointError::Conflict { .. }) => {
                self.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
}

/// What a call to [`write`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointInfo {
    /// The newest checkpoint's number.
    pub seq: i64,
    pub epoch: Uuid,
    pub upto_position: i64,
    pub event_count: i64,
    /// Events covered by the checkpoints written now.
    pub new_events: i64,
    /// Checkpoints written now (more than one when more than [`MAX_SPAN`] events were due).
    pub written: i64,
    /// Of them, checkpoints found in the witness and not in the database (a writer stopped
    /// between the two writes) and written to the database as they were witnessed.
    pub rolled_forward: i64,
    pub digest: String,
    pub key_id: String,
    /// Where every checkpoint was copied.
    pub witness: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("database error while writing a checkpoint: {0}")]
    Db(#[from] sqlx::Error),
    /// The witness did not take checkpoint `seq` (unreachable, slow, failing): nothing was
    /// written to the database, and the next attempt tries again.
    #[error("checkpoint {seq} was not written: the witness did not take it: {source}")]
    Witness {
        seq: i64,
        #[source]
        source: WitnessError,
    },
    /// The witness holds something under checkpoint `seq` that is not this log's next
    /// checkpoint: the tamper signal (or a restore nobody recorded). Nothing was written;
    /// checkpointing stops until an operator resolves it (docs/runbooks/verify.md).
    #[error("WITNESS CONFLICT at checkpoint {seq}: {reason}; no checkpoint was written (see docs/runbooks/verify.md)")]
    Conflict { seq: i64, reason: String },
}

impl CheckpointError {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

/// Test hooks: where a writer can be made to stop as if the process died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CrashAt {
    #[default]
    Never,
    /// After the witness took checkpoint record N, before the database's INSERT.
    AfterWitness,
}

/// What writes checkpoints: the signing key, the witness, and how the witness has fared.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    pub key: std::sync::Arc<AuditKey>,
    pub witness: std::sync::Arc<dyn Witness>,
    pub health: std::sync::Arc<WitnessHealth>,
}

impl Checkpointer {
    pub fn new(key: std::sync::Arc<AuditKey>, witness: std::sync::Arc<dyn Witness>) -> Self {
        Self {
            key,
            witness,
            health: Default::default(),
        }
    }

    pub async fn write(&self, pool: &PgPool) -> Result<CheckpointInfo, CheckpointError> {
        let r = write(pool, &self.key, self.witness.as_ref()).await;
        self.health.record(&r);
        r
    }

    /// [`write_due`]: for the relay, which never writes an empty checkpoint.
    pub async fn write_due(&self, pool: &PgPool) -> Result<CheckpointInfo, CheckpointError> {
        let r = write_due(pool, &self.key, self.witness.as_ref()).await;
        self.health.record(&r);
        r
    }

    /// Asks the witness for the current epoch's record, so that an idle log's relay still
    /// shows the witness answering (`mira_witness_last_success_timestamp_seconds`).
    pub async fn probe(&self, pool: &PgPool) -> Result<(), CheckpointError> {
        let epoch = db_epochs(pool).await?.pop().expect("a first epoch").epoch;
        let r = self
            .witness
            .get(&EpochRecord::name(epoch))
            .await
            .map(|_| ())
            .map_err(|source| CheckpointError::Witness { seq: 0, source });
        self.health.record(&r);
        r
    }
}

/// Writes checkpoints covering every settled event now, each witnessed before it is inserted.
/// Concurrent writers serialise on an advisory lock; each checkpoint continues the previous
/// one's digest and covers at most [`MAX_SPAN`] events.
pub async fn write(pool: &PgPool, key: &AuditKey, witness: &dyn Witness) -> Result<CheckpointInfo, CheckpointError> {
    write_spans(pool, key, witness, MAX_SPAN, CrashAt::Never).await
}

/// [`write`] with another span limit and a crash point (tests, `mira bench seed`).
pub async fn write_spans(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
    max_span: i64,
    crash: CrashAt,
) -> Result<CheckpointInfo, CheckpointError> {
    write_inner(pool, key, witness, max_span, crash, true).await
}

/// What the relay writes: checkpoints covering the settled events no checkpoint covers yet
/// (or a record a stopped writer left in the witness), and none when there are none
/// (`written` 0).
pub async fn write_due(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
) -> Result<CheckpointInfo, CheckpointError> {
    write_inner(pool, key, witness, MAX_SPAN, CrashAt::Never, false).await
}

async fn write_inner(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
    max_span: i64,
    crash: CrashAt,
    even_if_empty: bool,
) -> Result<CheckpointInfo, CheckpointError> {
    let mut info = CheckpointInfo {
        seq: 0,
        epoch: Uuid::nil(),
        upto_position: 0,
        event_count: 0,
        new_events: 0,
        written: 0,
        rolled_forward: 0,
        digest: String::new(),
        key_id: key_id(&key.verifying_key()),
        witness: witness.describe(),
    };
    loop {
        let first = even_if_empty && info.written == 0;
        let Some((ck, rolled)) = write_one(pool, key, witness, max_span, first, crash).await? else {
            break;
        };
        let n = ck.leaves_len / LEAF_LEN as i64;
        info.written += 1;
        info.rolled_forward += rolled as i64;
        info.new_events += n;
        info.seq = ck.seq;
        info.epoch = ck.epoch;
        info.upto_position = ck.upto.position;
        info.event_count = ck.event_count;
        info.digest = hex::encode(ck.digest);
        // A rolled-forward checkpoint may be shorter than a span: go on until one comes out short.
        if n < max_span && !rolled {
            break;
        }
    }
    Ok(info)
}

fn conflict(seq: i64, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Conflict {
        seq,
        reason: reason.into(),
    }
}

/// The current epoch's record in the witness, validated. For the log's first epoch without
/// one, writes it: checkpoints from the next one on are all witnessed (`witness_from`); the
/// ones before were written when only the newest of each write was copied (ADR 0012).
async fn epoch_record(
    key: &AuditKey,
    witness: &dyn Witness,
    epoch: &DbEpoch,
    next_seq: i64,
) -> Result<EpochRecord, CheckpointError> {
    let io = |source| CheckpointError::Witness { seq: next_seq, source };
    let name = EpochRecord::name(epoch.epoch);
    let valid = |bytes: &[u8]| -> Result<EpochRecord, CheckpointError> {
        let r = EpochRecord::from_bytes(&name, bytes).map_err(|e| conflict(next_seq, e.to_string()))?;
        if r.epoch != epoch.epoch || !r.signed_by(&key.verifying_key()) {
            return Err(conflict(
                next_seq,
                format!(
                    "the witness's record of epoch {} is not one this audit key signed",
                    epoch.epoch
                ),
            ));
        }
        if epoch.record.as_ref().is_some_and(|db| *db != r) {
            return Err(conflict(
                next_seq,
                format!(
                    "epoch {} in the database differs from its record in the witness",
                    epoch.epoch
                ),
            ));
        }
        Ok(r)
    };
    if let Some(bytes) = witness.get(&name).await.map_err(io)? {
        return valid(&bytes);
    }
    if epoch.record.is_some() {
        return Err(conflict(
            next_seq,
            format!(
                "epoch {} was started in the database but the witness has no record of it",
                epoch.epoch
            ),
        ));
    }
    // The log's first epoch, first written to under this rule: records at the top of the
    // witness (one per checkpoint write before) must all be below the database's newest.
    let legacy = crate::witness::list_all(witness, None).await.map_err(io)?;
    if let Some(max) = legacy
        .iter()
        .filter_map(|l| crate::witness::parse_checkpoint_file(&l.name))
        .max()
        .filter(|m| *m >= next_seq)
    {
        return Err(conflict(
            next_seq,
            format!(
                "the witness holds checkpoint {max} but the database's newest is {}: checkpoints were deleted or the database restored",
                next_seq - 1
            ),
        ));
    }
    let mut r = EpochRecord {
        epoch: epoch.epoch,
        previous: None,
        after_seq: 0,
        after_digest: hex::encode(ZERO_HASH),
        witness_from: next_seq,
        created_at_micros: now_micros().timestamp_micros(),
        reason: if next_seq == 1 {
            "the log's first epoch".to_owned()
        } else {
            format!(
                "every checkpoint witnessed from checkpoint {next_seq} on; before it, only the newest of each write was"
            )
        },
        key_id: key_id(&key.verifying_key()),
        signature: String::new(),
    };
    r.signature = hex::encode(key.signing.sign(&r.canonical().bytes()).to_bytes());
    match witness.create(&name, &r.to_bytes()).await.map_err(io)? {
        Created::New => Ok(r),
        Created::Exists(bytes) => valid(&bytes),
    }
}

/// The last checkpoint: its number, end, count and digest (zeros before the first).
async fn last_checkpoint(tx: &mut sqlx::PgConnection) -> Result<(i64, Cursor, i64, Hash32), sqlx::Error> {
    let last = sqlx::query(
        "SELECT seq, upto_tx::text::bigint AS upto_tx, upto_position, event_count, digest \
         FROM checkpoints ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    Ok(match last {
        Some(r) => (
            r.try_get("seq")?,
            Cursor {
                tx_id: r.try_get("upto_tx")?,
                position: r.try_get("upto_position")?,
            },
            r.try_get("event_count")?,
            to32(r.try_get("digest")?, "digest")?,
        ),
        None => (0, Cursor::START, 0, ZERO_HASH),
    })
}

/// Leaves after `from` up to and including `upto`, in follow order.
async fn leaves_between(tx: &mut sqlx::PgConnection, from: Cursor, upto: Cursor) -> Result<Vec<u8>, sqlx::Error> {
    let wm = watermark(&mut *tx).await?;
    let mut cursor = from;
    let mut leaves = Vec::new();
    loop {
        let batch = read_leaves_below(&mut *tx, cursor, wm, 10_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor;
        let mut past = false;
        for l in &batch {
            if l.cursor > upto {
                past = true;
                break;
            }
            leaves.extend_from_slice(&leaf(l.cursor.position, l.event_id, &l.hash));
        }
        if past || cursor >= upto {
            break;
        }
    }
    Ok(leaves)
}

/// One checkpoint of up to `max_span` events; with `even_if_empty` false, none when no event is
/// due. The record goes to the witness first, create-only, while this transaction holds the
/// writers' lock but no transaction id; only then the row is inserted. Returns the checkpoint
/// and whether it was rolled forward from the witness.
async fn write_one(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
    max_span: i64,
    even_if_empty: bool,
    crash: CrashAt,
) -> Result<Option<(Checkpoint, bool)>, CheckpointError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let (last_seq, mut cursor, count, prev_digest) = last_checkpoint(&mut tx).await?;
    let from = cursor;
    let seq = last_seq + 1;
    let epochs = db_epochs_on(&mut tx).await?;
    let epoch = epochs.last().expect("the log has a first epoch").clone();
    let wm = watermark(&mut *tx).await?;
    let mut leaves = Vec::new();
    let mut remaining = max_span;
    while remaining > 0 {
        let batch = read_leaves_below(&mut *tx, cursor, wm, remaining.min(10_000)).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor;
        remaining -= batch.len() as i64;
        for l in &batch {
            leaves.extend_from_slice(&leaf(l.cursor.position, l.event_id, &l.hash));
        }
    }
    // Nothing new, and no record from a stopped writer waiting in the witness.
    let pending_in_witness = || async {
        witness
            .get(&WitnessRecord::name(epoch.epoch, seq))
            .await
            .map(|b| b.is_some())
            .map_err(|source| CheckpointError::Witness { seq, source })
    };
    if leaves.is_empty() && !even_if_empty && !pending_in_witness().await? {
        return Ok(None);
    }
    let record = epoch_record(key, witness, &epoch, seq).await?;
    if seq < record.witness_from {
        return Err(conflict(
            seq,
            format!(
                "the witness has seen checkpoints of epoch {} up to {} but the database's newest is {last_seq}: checkpoints were deleted or the database restored",
                epoch.epoch,
                record.witness_from - 1
            ),
        ));
    }
    let new_events = (leaves.len() / LEAF_LEN) as i64;
    let mut ck = Checkpoint {
        seq,
        epoch: epoch.epoch,
        created_at: now_micros(),
        upto: cursor,
        event_count: count + new_events,
        prev_digest,
        digest: fold_leaves(prev_digest, &leaves),
        leaves_len: leaves.len() as i64,
        key_id: key_id(&key.verifying_key()),
        signature: [0; 64],
    };
    ck.signature = key.signing.sign(&ck.canonical().bytes()).to_bytes();
    let name = WitnessRecord::name(epoch.epoch, seq);
    let mine = ck.witness_record();
    let created = witness
        .create(&name, &mine.to_bytes())
        .await
        .map_err(|source| CheckpointError::Witness { seq, source })?;
    if crash == CrashAt::AfterWitness {
        return Err(CheckpointError::Witness {
            seq,
            source: WitnessError::Io {
                witness: witness.describe(),
                reason: "test hook: stopped after the witness write, before the insert".into(),
            },
        });
    }
    let mut rolled = false;
    if let Created::Exists(bytes) = created {
        let theirs = WitnessRecord::from_bytes(&name, &bytes).map_err(|e| conflict(seq, e.to_string()))?;
        if theirs != mine {
            let (their_ck, their_leaves) =
                roll_forward(&mut tx, key, &theirs, (epoch.epoch, seq), (from, count, prev_digest))
                    .await?
                    .map_err(|why| {
                        conflict(
                            seq,
                            format!(
                                "the witness already holds a different checkpoint {seq} of epoch {}: {why}",
                                epoch.epoch
                            ),
                        )
                    })?;
            tracing::warn!(
                seq,
                epoch = %epoch.epoch,
                "checkpoint rolled forward: the witness held it and the database did not (a writer stopped between the two writes)"
            );
            ck = their_ck;
            leaves = their_leaves;
            rolled = true;
        }
    }
    sqlx::query(
        "INSERT INTO checkpoints (seq, epoch, created_at, upto_tx, upto_position, event_count, \
         prev_digest, digest, leaves, key_id, signature) \
         VALUES ($1, $2, $3, $4::text::xid8, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(ck.seq)
    .bind(ck.epoch)
    .bind(ck.created_at)
    .bind(ck.upto.tx_id.to_string())
    .bind(ck.upto.position)
    .bind(ck.event_count)
    .bind(&ck.prev_digest[..])
    .bind(&ck.digest[..])
    .bind(&leaves)
    .bind(&ck.key_id)
    .bind(&ck.signature[..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((ck, rolled)))
}

/// A record the witness holds for the next checkpoint, when it is this writer's own orphan:
/// signed by this key, of this epoch, continuing the database's last digest, and equal to a
/// re-fold of the log's leaves up to its end. Anything else is `Err(why not)`.
async fn roll_forward(
    tx: &mut sqlx::PgConnection,
    key: &AuditKey,
    theirs: &WitnessRecord,
    (epoch, seq): (Uuid, i64),
    (from, count, prev_digest): (Cursor, i64, Hash32),
) -> Result<Result<(Checkpoint, Vec<u8>), String>, sqlx::Error> {
    if theirs.epoch != epoch || theirs.seq != seq {
        return Ok(Err(format!(
            "it names checkpoint {} of epoch {}",
            theirs.seq, theirs.epoch
        )));
    }
    if !theirs.signed_by(&key.verifying_key()) || theirs.key_id != key_id(&key.verifying_key()) {
        return Ok(Err("it is not signed by this audit key".into()));
    }
    if theirs.prev_digest_bytes() != Some(prev_digest) {
        return Ok(Err(format!(
            "it does not continue the database's checkpoint {}",
            theirs.seq - 1
        )));
    }
    let upto = Cursor {
        tx_id: theirs.upto_tx,
        position: theirs.upto_position,
    };
    if upto < from {
        return Ok(Err("it ends before the database's last checkpoint".into()));
    }
    let leaves = leaves_between(&mut *tx, from, upto).await?;
    let n = (leaves.len() / LEAF_LEN) as i64;
    if theirs.event_count != count + n || theirs.digest_bytes() != Some(fold_leaves(prev_digest, &leaves)) {
        return Ok(Err("the log's events up to its end do not fold to its digest".into()));
    }
    let Some(created_at) = DateTime::<Utc>::from_timestamp_micros(theirs.created_at_micros) else {
        return Ok(Err("its time is out of range".into()));
    };
    let signature: [u8; 64] = hex::decode(&theirs.signature)
        .ok()
        .and_then(|s| s.try_into().ok())
        .expect("a record signed by this key has a 64-byte signature");
    Ok(Ok((
        Checkpoint {
            seq: theirs.seq,
            epoch: theirs.epoch,
            created_at,
            upto,
            event_count: theirs.event_count,
            prev_digest,
            digest: fold_leaves(prev_digest, &leaves),
            leaves_len: leaves.len() as i64,
            key_id: theirs.key_id.clone(),
            signature,
        },
        leaves,
    )))
}

/// What `mira audit new-epoch` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NewEpoch {
    pub epoch: Uuid,
    pub previous: Uuid,
    pub after_seq: i64,
    pub witness: String,
}

/// Starts a new epoch of the log after its last checkpoint (`mira audit new-epoch`): for a
/// legitimate point-in-time restore, whose repeated checkpoint numbers the witness refuses.
/// The signed epoch record goes to the witness first, then to the database.
pub async fn new_epoch(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
    reason: &str,
) -> Result<NewEpoch, CheckpointError> {
    let reason = reason.trim();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let (after_seq, _, _, after_digest) = last_checkpoint(&mut tx).await?;
    let previous = db_epochs_on(&mut tx).await?.last().expect("a first epoch").epoch;
    let mut r = EpochRecord {
        epoch: Uuid::now_v7(),
        previous: Some(previous),
        after_seq,
        after_digest: hex::encode(after_digest),
        witness_from: after_seq + 1,
        created_at_micros: now_micros().timestamp_micros(),
        reason: reason.to_owned(),
        key_id: key_id(&key.verifying_key()),
        signature: String::new(),
    };
    r.signature = hex::encode(key.signing.sign(&r.canonical().bytes()).to_bytes());
    let seq = after_seq + 1;
    match witness
        .create(&EpochRecord::name(r.epoch), &r.to_bytes())
        .await
        .map_err(|source| CheckpointError::Witness { seq, source })?
    {
        Created::New => {}
        Created::Exists(_) => return Err(conflict(seq, format!("the witness already holds epoch {}", r.epoch))),
    }
    sqlx::query(
        "INSERT INTO log_epochs (epoch, previous, after_seq, after_digest, witness_from, created_at, reason, key_id, signature) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(r.epoch)
    .bind(previous)
    .bind(after_seq)
    .bind(&after_digest[..])
    .bind(r.witness_from)
    .bind(DateTime::<Utc>::from_timestamp_micros(r.created_at_micros).expect("now is in range"))
    .bind(&r.reason)
    .bind(&r.key_id)
    .bind(hex::decode(&r.signature).expect("hex"))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(NewEpoch {
        epoch: r.epoch,
        previous,
        after_seq,
        witness: witness.describe(),
    })
}

/// For benchmarks and tests on scratch databases (`mira bench seed --checkpoint-span`): the
/// checkpoints [`write_spans`] would write after the last one, `span` events each, every one
/// witnessed first, but inserted a thousand rows per statement instead of one transaction
/// each. Returns how many were written. Not for a live log: it holds the writers' lock
/// throughout and reads below one watermark.
pub async fn seed_spans(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
    span: i64,
) -> Result<i64, CheckpointError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let (last_seq, mut cursor, mut count, mut digest) = last_checkpoint(&mut tx).await?;
    let epoch = db_epochs_on(&mut tx).await?.pop().expect("a first epoch");
    let record = epoch_record(key, witness, &epoch, last_seq + 1).await?;
    if last_seq + 1 < record.witness_from {
        return Err(conflict(last_seq + 1, "the witness is ahead of the database"));
    }
    let wm = watermark(&mut *tx).await?;
    let kid = key_id(&key.verifying_key());
    let mut seq = last_seq;
    let mut rows: Vec<(Checkpoint, Vec<u8>)> = Vec::new();
    let mut pending: std::collections::VecDeque<crate::store::LeafRow> = Default::default();
    let mut exhausted = false;
    loop {
        while pending.len() < span as usize && !exhausted {
            let batch = read_leaves_below(&mut *tx, cursor, wm, 10_000).await?;
            match batch.last() {
                Some(l) => cursor = l.cursor,
                None => exhausted = true,
            }
            pending.extend(batch);
        }
        if pending.is_empty() {
            break;
        }
        let take = pending.len().min(span as usize);
        let mut leaves = Vec::with_capacity(take * LEAF_LEN);
        let mut upto = Cursor::START;
        for l in pending.drain(..take) {
            leaves.extend_from_slice(&leaf(l.cursor.position, l.event_id, &l.hash));
            upto = l.cursor;
        }
        seq += 1;
        count += take as i64;
        let prev = digest;
        digest = fold_leaves(prev, &leaves);
        let mut ck = Checkpoint {
            seq,
            epoch: epoch.epoch,
            created_at: now_micros(),
            upto,
            event_count: count,
            prev_digest: prev,
            digest,
            leaves_len: leaves.len() as i64,
            key_id: kid.clone(),
            signature: [0; 64],
        };
        ck.signature = key.signing.sign(&ck.canonical().bytes()).to_bytes();
        match witness
            .create(&WitnessRecord::name(epoch.epoch, seq), &ck.witness_record().to_bytes())
            .await
            .map_err(|source| CheckpointError::Witness { seq, source })?
        {
            Created::New => {}
            Created::Exists(_) => return Err(conflict(seq, "the witness already holds it")),
        }
        rows.push((ck, leaves));
        if rows.len() == 1000 {
            insert_many(&mut tx, std::mem::take(&mut rows)).await?;
        }
    }
    insert_many(&mut tx, rows).await?;
    tx.commit().await?;
    Ok(seq - last_seq)
}

async fn insert_many(tx: &mut sqlx::PgConnection, rows: Vec<(Checkpoint, Vec<u8>)>) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let col = |f: &dyn Fn(&Checkpoint) -> Vec<u8>| rows.iter().map(|(c, _)| f(c)).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO checkpoints (seq, epoch, created_at, upto_tx, upto_position, event_count, \
         prev_digest, digest, leaves, key_id, signature) \
         SELECT s, e, c, t::xid8, p, n, pd, d, l, k, sig FROM UNNEST($1::bigint[], $2::uuid[], $3::timestamptz[], \
         $4::text[], $5::bigint[], $6::bigint[], $7::bytea[], $8::bytea[], $9::bytea[], $10::text[], $11::bytea[]) \
         AS x(s, e, c, t, p, n, pd, d, l, k, sig)",
    )
    .bind(rows.iter().map(|(c, _)| c.seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|(c, _)| c.epoch).collect::<Vec<_>>())
    .bind(rows.iter().map(|(c, _)| c.created_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|(c, _)| c.upto.tx_id.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(c, _)| c.upto.position).collect::<Vec<_>>())
    .bind(rows.iter().map(|(c, _)| c.event_count).collect::<Vec<_>>())
    .bind(col(&|c| c.prev_digest.to_vec()))
    .bind(col(&|c| c.digest.to_vec()))
    .bind(rows.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(c, _)| c.key_id.clone()).collect::<Vec<_>>())
    .bind(col(&|c| c.signature.to_vec()))
    .execute(&mut *tx)
    .await?;
    Ok(())
}
