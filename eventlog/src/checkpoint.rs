//! Signed checkpoints (DESIGN §4.3).
//!
//! A checkpoint commits to every event up to a cursor: it stores the leaves (position, id,
//! hash) of the events since the previous checkpoint and the chained digest over all leaves
//! so far, and signs that digest with an Ed25519 key the database never holds. Someone who
//! rewrites events *and* recomputes their hashes still cannot produce a matching signature.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use mira_events::canonical::{fold_leaves, leaf, CanonicalCheckpoint, Hash32, ZERO_HASH};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::store::{now_micros, read_below, watermark, Cursor};

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
    /// Loads the key, creating it (and its `.pub`) on first use.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let seed = match read_hex32(path)? {
            Some(seed) => seed,
            None => {
                let mut seed = [0u8; 32];
                getrandom::getrandom(&mut seed).map_err(|e| key_err(path, e))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| key_err(path, e))?;
                }
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                use std::io::Write;
                let mut f = opts.open(path).map_err(|e| key_err(path, e))?;
                f.write_all(hex::encode(seed).as_bytes())
                    .map_err(|e| key_err(path, e))?;
                f.sync_all().map_err(|e| key_err(path, e))?;
                seed
            }
        };
        let key = Self {
            signing: SigningKey::from_bytes(&seed),
        };
        let pub_path = public_key_path(path);
        if read_hex32(&pub_path)?.is_none() {
            std::fs::write(&pub_path, hex::encode(key.verifying_key().as_bytes()))
                .map_err(|e| key_err(&pub_path, e))?;
        }
        Ok(key)
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

/// One checkpoint row.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub seq: i64,
    pub epoch: Uuid,
    pub created_at: DateTime<Utc>,
    pub upto: Cursor,
    pub event_count: i64,
    pub prev_digest: Hash32,
    pub digest: Hash32,
    pub leaves: Vec<u8>,
    pub key_id: String,
    pub signature: [u8; 64],
}

impl Checkpoint {
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

/// What a new checkpoint covers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointInfo {
    pub seq: i64,
    pub upto_position: i64,
    pub event_count: i64,
    pub new_events: i64,
    pub digest: String,
    pub key_id: String,
}

fn to32<const N: usize>(v: Vec<u8>, what: &str) -> Result<[u8; N], sqlx::Error> {
    v.try_into()
        .map_err(|_| sqlx::Error::Decode(format!("checkpoint {what} has the wrong length").into()))
}

/// Every checkpoint, in order.
pub async fn load_all(pool: &PgPool) -> Result<Vec<Checkpoint>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, epoch, created_at, upto_tx::text::bigint AS upto_tx, upto_position, \
         event_count, prev_digest, digest, leaves, key_id, signature FROM checkpoints ORDER BY seq",
    )
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
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
                leaves: r.try_get("leaves")?,
                key_id: r.try_get("key_id")?,
                signature: to32(r.try_get("signature")?, "signature")?,
            })
        })
        .collect()
}

/// Writes a checkpoint covering every settled event now. Concurrent writers serialise on an
/// advisory lock; each checkpoint continues the previous one's digest.
pub async fn write(pool: &PgPool, key: &AuditKey) -> Result<CheckpointInfo, sqlx::Error> {
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
    loop {
        let batch = read_below(&mut *tx, cursor, wm, 10_000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.cursor();
        for e in &batch {
            leaves.extend_from_slice(&leaf(e.global_position, e.event_id, &e.hash));
        }
    }
    let new_events = (leaves.len() / mira_events::canonical::LEAF_LEN) as i64;
    let digest = fold_leaves(prev_digest, &leaves);
    let ck = Checkpoint {
        seq,
        epoch,
        created_at: now_micros(),
        upto: cursor,
        event_count: count + new_events,
        prev_digest,
        digest,
        leaves,
        key_id: key_id(&key.verifying_key()),
        signature: [0; 64],
    };
    let signature = key.signing.sign(&ck.canonical().bytes()).to_bytes();
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
    .bind(&ck.leaves)
    .bind(&ck.key_id)
    .bind(&signature[..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(CheckpointInfo {
        seq,
        upto_position: ck.upto.position,
        event_count: ck.event_count,
        new_events,
        digest: hex::encode(digest),
        key_id: ck.key_id,
    })
}
