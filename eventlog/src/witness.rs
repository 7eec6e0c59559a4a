//! The witness: every signed checkpoint is also written outside the database (DESIGN §4.3).
//!
//! A superuser can delete checkpoint rows and re-hash the events they covered; the signatures
//! that remain then agree with the rewritten log. The witness keeps a copy of each checkpoint
//! where the database's superuser cannot reach: an S3 bucket with Object Lock in production, a
//! directory in `mira dev` and the tests. `mira audit verify` fails when the newest witnessed
//! checkpoint is missing from the database or differs from it; since every checkpoint continues
//! the previous one's digest, the newest witnessed one pins all before it.
//!
//! One object per checkpoint, `checkpoint-<seq, 20 digits>.json`, written once: a second write
//! of the same checkpoint is a no-op, a different checkpoint under the same number is refused
//! (it means the log was restored or rewritten; see ADR 0012).

use std::path::{Path, PathBuf};

use mira_events::canonical::Hash32;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A checkpoint's signed fields and signature, as the witness keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessRecord {
    pub seq: i64,
    pub epoch: Uuid,
    pub created_at_micros: i64,
    pub upto_tx: i64,
    pub upto_position: i64,
    pub event_count: i64,
    /// Hex.
    pub prev_digest: String,
    /// Hex.
    pub digest: String,
    pub key_id: String,
    /// Hex of the Ed25519 signature over the canonical checkpoint bytes.
    pub signature: String,
}

impl WitnessRecord {
    /// The object name: numbers sort as text, so the last name is the newest checkpoint.
    pub fn name(seq: i64) -> String {
        format!("checkpoint-{seq:020}.json")
    }

    pub fn parse_name(name: &str) -> Option<i64> {
        let digits = name.strip_prefix("checkpoint-")?.strip_suffix(".json")?;
        (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().ok())
            .flatten()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a witness record serialises");
        v.push(b'\n');
        v
    }

    pub fn from_bytes(where_: &str, bytes: &[u8]) -> Result<Self, WitnessError> {
        serde_json::from_slice(bytes).map_err(|e| WitnessError::Corrupt(format!("{where_}: {e}")))
    }

    pub fn signature_bytes(&self) -> Option<[u8; 64]> {
        hex::decode(&self.signature).ok()?.try_into().ok()
    }

    /// A second write of a witnessed checkpoint: fine when it is the same record, refused when
    /// it is another under the same number.
    pub fn same_as(&self, existing: &WitnessRecord, witness: &str) -> Result<(), WitnessError> {
        if existing == self {
            Ok(())
        } else {
            Err(WitnessError::Conflict {
                witness: witness.to_owned(),
                seq: self.seq,
            })
        }
    }

    pub fn digest_bytes(&self) -> Option<Hash32> {
        hex::decode(&self.digest).ok()?.try_into().ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("the witness {witness} already holds a different checkpoint {seq}: the log was restored or rewritten (see docs/runbooks/verify.md)")]
    Conflict { witness: String, seq: i64 },
    #[error("a witnessed checkpoint is unreadable: {0}")]
    Corrupt(String),
    #[error("the witness {witness} failed: {reason}")]
    Io { witness: String, reason: String },
}

/// Where checkpoints are copied out of the database.
#[async_trait::async_trait]
pub trait Witness: Send + Sync + std::fmt::Debug {
    /// For messages: `directory /var/lib/mira/witness`, `s3://bucket/prefix`.
    fn describe(&self) -> String;
    /// Writes `record` once; the same record again is a no-op, a different one an error.
    async fn put(&self, record: &WitnessRecord) -> Result<(), WitnessError>;
    /// The witnessed checkpoint with the highest number.
    async fn newest(&self) -> Result<Option<WitnessRecord>, WitnessError>;
}

/// A directory as the witness (`Audit__WitnessDir`): for `mira dev`, the tests, and
/// installations that mount write-once storage.
#[derive(Debug, Clone)]
pub struct DirWitness {
    dir: PathBuf,
}

impl DirWitness {
    /// The directory must exist (`mira keys init` creates it): a typo in the setting must not
    /// start an empty witness that makes every checkpoint look deleted.
    pub fn open(dir: &Path) -> Result<Self, WitnessError> {
        if !dir.is_dir() {
            return Err(WitnessError::Io {
                witness: format!("directory {}", dir.display()),
                reason: "does not exist (run `mira keys init`)".into(),
            });
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Creates the directory (`mira keys init`).
    pub fn create(dir: &Path) -> Result<Self, WitnessError> {
        std::fs::create_dir_all(dir).map_err(|e| WitnessError::Io {
            witness: format!("directory {}", dir.display()),
            reason: e.to_string(),
        })?;
        Self::open(dir)
    }

    fn io(&self, e: impl ToString) -> WitnessError {
        WitnessError::Io {
            witness: self.describe(),
            reason: e.to_string(),
        }
    }

    fn read(&self, seq: i64) -> Result<Option<WitnessRecord>, WitnessError> {
        let path = self.dir.join(WitnessRecord::name(seq));
        match std::fs::read(&path) {
            Ok(b) => WitnessRecord::from_bytes(&path.display().to_string(), &b).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }
}

#[async_trait::async_trait]
impl Witness for DirWitness {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    async fn put(&self, record: &WitnessRecord) -> Result<(), WitnessError> {
        if let Some(existing) = self.read(record.seq)? {
            return record.same_as(&existing, &self.describe());
        }
        use std::io::Write;
        let path = self.dir.join(WitnessRecord::name(record.seq));
        // Written under a temporary name, then linked into place: a reader never sees half a
        // record, and a concurrent writer of the same number loses instead of overwriting.
        let tmp = self.dir.join(format!(".tmp-{}", Uuid::new_v4()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        f.write_all(&record.to_bytes()).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match self.read(record.seq)? {
                Some(existing) => record.same_as(&existing, &self.describe()),
                None => Err(WitnessError::Conflict {
                    witness: self.describe(),
                    seq: record.seq,
                }),
            },
            Err(e) => Err(self.io(e)),
        }
    }

    async fn newest(&self) -> Result<Option<WitnessRecord>, WitnessError> {
        let mut best = None;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let entry = entry.map_err(|e| self.io(e))?;
            if let Some(seq) = entry.file_name().to_str().and_then(WitnessRecord::parse_name) {
                best = best.max(Some(seq));
            }
        }
        match best {
            Some(seq) => self.read(seq),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, digest: &str) -> WitnessRecord {
        WitnessRecord {
            seq,
            epoch: Uuid::nil(),
            created_at_micros: 1,
            upto_tx: 2,
            upto_position: 3,
            event_count: 4,
            prev_digest: "00".repeat(32),
            digest: digest.repeat(32),
            key_id: "k".into(),
            signature: "00".repeat(64),
        }
    }

    #[tokio::test]
    async fn a_directory_keeps_each_checkpoint_once_and_finds_the_newest() {
        let dir = std::env::temp_dir().join(format!("mira-witness-{}", Uuid::new_v4()));
        assert!(DirWitness::open(&dir).is_err(), "a missing directory is an error");
        let w = DirWitness::create(&dir).unwrap();
        assert_eq!(w.newest().await.unwrap(), None);
        for seq in [9, 10, 2] {
            w.put(&record(seq, "aa")).await.unwrap();
        }
        w.put(&record(10, "aa")).await.unwrap();
        assert_eq!(w.newest().await.unwrap().unwrap().seq, 10);
        let err = w.put(&record(10, "bb")).await.unwrap_err();
        assert!(matches!(err, WitnessError::Conflict { seq: 10, .. }), "{err}");
        assert_eq!(w.newest().await.unwrap().unwrap().digest, "aa".repeat(32));
        assert_eq!(WitnessRecord::parse_name(&WitnessRecord::name(42)), Some(42));
        assert_eq!(WitnessRecord::parse_name("checkpoint-1.json"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
