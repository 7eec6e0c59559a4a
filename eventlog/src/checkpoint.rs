//! Signed checkpoints (DESIGN §4.3).
//!
//! A checkpoint commits to every event up to a cursor: it stores the leaves (position, id,
//! hash) of the events since the previous checkpoint and the chained digest over all leaves
//! so far, and signs that digest with an Ed25519 key the database never holds. Someone who
//! rewrites events *and* recomputes their hashes still cannot produce a matching signature.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use mira_events::canonical::{fold_leaves, leaf, CanonicalCheckpoint, Hash32, LEAF_LEN, ZERO_HASH};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::store::{now_micros, read_leaves_below, watermark, Cursor};
use crate::witness::{Witness, WitnessError, WitnessRecord};

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

/// What a call to [`write`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointInfo {
    /// The newest checkpoint's number.
    pub seq: i64,
    pub upto_position: i64,
    pub event_count: i64,
    /// Events covered by the checkpoints written now.
    pub new_events: i64,
    /// Checkpoints written now (more than one when more than [`MAX_SPAN`] events were due).
    pub written: i64,
    pub digest: String,
    pub key_id: String,
    /// Where the newest checkpoint was copied.
    pub witness: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("database error while writing a checkpoint: {0}")]
    Db(#[from] sqlx::Error),
    /// The checkpoints are in the database; the witness did not take the newest. The next
    /// checkpoint's copy covers them (each continues the previous digest).
    #[error("checkpoint {seq} was written to the database but not to the witness: {source}")]
    Witness {
        seq: i64,
        #[source]
        source: WitnessError,
    },
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

/// Every checkpoint's header, in order: about 200 bytes each, without the leaves.
pub async fn load_headers(pool: &PgPool) -> Result<Vec<Checkpoint>, sqlx::Error> {
    sqlx::query(&format!("SELECT {HEADER_COLUMNS} FROM checkpoints ORDER BY seq"))
        .fetch_all(pool)
        .await?
        .iter()
        .map(header_of)
        .collect()
}

/// One checkpoint's leaves (at most [`MAX_SPAN`] × 56 bytes for checkpoints Mira wrote).
pub async fn load_leaves(pool: &PgPool, seq: i64) -> Result<Vec<u8>, sqlx::Error> {
    sqlx::query_scalar("SELECT leaves FROM checkpoints WHERE seq = $1")
        .bind(seq)
        .fetch_one(pool)
        .await
}

/// What writes checkpoints: the signing key and the witness the newest checkpoint is copied to.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    pub key: std::sync::Arc<AuditKey>,
    pub witness: std::sync::Arc<dyn Witness>,
}

impl Checkpointer {
    pub async fn write(&self, pool: &PgPool) -> Result<CheckpointInfo, CheckpointError> {
        write(pool, &self.key, self.witness.as_ref()).await
    }
}

/// Writes checkpoints covering every settled event now, then copies the newest to `witness`.
/// Concurrent writers serialise on an advisory lock; each checkpoint continues the previous
/// one's digest and covers at most [`MAX_SPAN`] events.
pub async fn write(pool: &PgPool, key: &AuditKey, witness: &dyn Witness) -> Result<CheckpointInfo, CheckpointError> {
    write_spans(pool, key, witness, MAX_SPAN).await
}

/// [`write`] with another span limit (tests).
pub async fn write_spans(
    pool: &PgPool,
    key: &AuditKey,
    witness: &dyn Witness,
    max_span: i64,
) -> Result<CheckpointInfo, CheckpointError> {
    let mut new_events = 0;
    let mut written = 0;
    let mut newest = None;
    loop {
        let Some(ck) = write_one(pool, key, max_span, written == 0).await? else {
            break;
        };
        written += 1;
        let n = ck.leaves_len / LEAF_LEN as i64;
        new_events += n;
        newest = Some(ck);
        if n < max_span {
            break;
        }
    }
    let ck = newest.expect("the first round always writes a checkpoint");
    witness
        .put(&ck.witness_record())
        .await
        .map_err(|source| CheckpointError::Witness { seq: ck.seq, source })?;
    Ok(CheckpointInfo {
        seq: ck.seq,
        upto_position: ck.upto.position,
        event_count: ck.event_count,
        new_events,
        written,
        digest: hex::encode(ck.digest),
        key_id: ck.key_id,
        witness: witness.describe(),
    })
}

/// One checkpoint of up to `max_span` events; with `even_if_empty` false, none when no event is
/// due.
async fn write_one(
    pool: &PgPool,
    key: &AuditKey,
    max_span: i64,
    even_if_empty: bool,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let last = sqlx::query(
        "SELECT seq, upto_tx::text::bigint AS upto_tx, upto_position, event_count, digest \
         FROM checkpoints ORDER BY seq DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let (seq, mut cursor, count, prev_digest) = match last {
        Some(r) => (
            r.try_get::<i64, _>("seq")? + 1,
            Cursor {
                tx_id: r.try_get("upto_tx")?,
                position: r.try_get("upto_position")?,
            },
            r.try_get::<i64, _>("event_count")?,
            to32(r.try_get("digest")?, "digest")?,
        ),
        None => (1, Cursor::START, 0, ZERO_HASH),
    };
    let epoch: Uuid = sqlx::query_scalar("SELECT epoch FROM log_epoch")
        .fetch_one(&mut *tx)
        .await?;
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
    if leaves.is_empty() && !even_if_empty {
        return Ok(None);
    }
    let new_events = (leaves.len() / LEAF_LEN) as i64;
    let mut ck = Checkpoint {
        seq,
        epoch,
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
    Ok(Some(ck))
}
