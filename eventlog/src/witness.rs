//! The witness: every signed checkpoint is also written outside the database (DESIGN §4.3,
//! ADR 0019).
//!
//! A superuser can delete checkpoint rows and re-hash the events they covered; the signatures
//! that remain then agree with the rewritten log. The witness keeps a copy of every checkpoint
//! where the database's superuser cannot reach: an S3 bucket with Object Lock in production, a
//! directory in `mira dev` and the tests. `mira audit verify` compares every record the witness
//! holds with the database, and every checkpoint the database holds with the witness.
//!
//! Layout, one object each, written once with a create-only write:
//! * `<epoch>/epoch.json`: the signed [`EpochRecord`] of one epoch of the log: where it starts,
//!   and from which checkpoint on every checkpoint of it is witnessed;
//! * `<epoch>/checkpoint-<seq, 20 digits>.json`: a [`WitnessRecord`];
//! * `checkpoint-<seq>.json` at the top: records written before epochs had folders (ADR 0012),
//!   all of the log's first epoch. They are still read and still count.
//!
//! The trait is the store alone (create-only put, get, ordered listing with every version):
//! what a conflict means is decided by the checkpoint writer and by `verify`.

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use mira_events::canonical::{CanonicalCheckpoint, CanonicalEpoch, Hash32};
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

/// The file name of checkpoint `seq` inside its folder: numbers sort as text.
pub fn checkpoint_file(seq: i64) -> String {
    format!("checkpoint-{seq:020}.json")
}

/// The checkpoint number of a file name made by [`checkpoint_file`].
pub fn parse_checkpoint_file(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("checkpoint-")?.strip_suffix(".json")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The epoch record's file name inside its folder.
pub const EPOCH_FILE: &str = "epoch.json";

fn hex32(s: &str) -> Option<Hash32> {
    hex::decode(s).ok()?.try_into().ok()
}

fn signed(key: &VerifyingKey, bytes: &[u8], signature_hex: &str) -> bool {
    hex::decode(signature_hex)
        .ok()
        .and_then(|s| <[u8; 64]>::try_from(s).ok())
        .is_some_and(|s| key.verify(bytes, &Signature::from_bytes(&s)).is_ok())
}

impl WitnessRecord {
    /// Where checkpoint `seq` of `epoch` is kept.
    pub fn name(epoch: Uuid, seq: i64) -> String {
        format!("{epoch}/{}", checkpoint_file(seq))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a witness record serialises");
        v.push(b'\n');
        v
    }

    pub fn from_bytes(where_: &str, bytes: &[u8]) -> Result<Self, WitnessError> {
        serde_json::from_slice(bytes).map_err(|e| WitnessError::Corrupt(format!("{where_}: {e}")))
    }

    pub fn digest_bytes(&self) -> Option<Hash32> {
        hex32(&self.digest)
    }

    pub fn prev_digest_bytes(&self) -> Option<Hash32> {
        hex32(&self.prev_digest)
    }

    /// The bytes its signature covers (unparseable digests become bytes no key signed).
    pub fn canonical(&self) -> CanonicalCheckpoint {
        CanonicalCheckpoint {
            epoch: self.epoch,
            seq: self.seq,
            created_at_micros: self.created_at_micros,
            upto_tx: self.upto_tx,
            upto_position: self.upto_position,
            event_count: self.event_count,
            prev_digest: self.prev_digest_bytes().unwrap_or([0xff; 32]),
            digest: self.digest_bytes().unwrap_or([0xff; 32]),
        }
    }

    /// Signed by `key`.
    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        signed(key, &self.canonical().bytes(), &self.signature)
    }
}

/// One epoch of the log, as the witness keeps it (`<epoch>/epoch.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: Uuid,
    /// The epoch this one continues; `None` for the log's first.
    pub previous: Option<Uuid>,
    /// The last checkpoint of `previous` that this epoch continues (0: none).
    pub after_seq: i64,
    /// Hex of that checkpoint's digest.
    pub after_digest: String,
    /// Every checkpoint of this epoch numbered from here on is in the witness; below it (the
    /// log's first epoch only) are checkpoints written before every checkpoint was witnessed.
    pub witness_from: i64,
    pub created_at_micros: i64,
    /// Why the epoch started: an operator's words for a restore, or Mira's for the first.
    pub reason: String,
    pub key_id: String,
    /// Hex of the Ed25519 signature over the canonical epoch bytes.
    pub signature: String,
}

impl EpochRecord {
    /// Where `epoch`'s record is kept.
    pub fn name(epoch: Uuid) -> String {
        format!("{epoch}/{EPOCH_FILE}")
    }

    pub fn canonical(&self) -> CanonicalEpoch<'_> {
        CanonicalEpoch {
            epoch: self.epoch,
            previous: self.previous,
            after_seq: self.after_seq,
            after_digest: hex32(&self.after_digest).unwrap_or([0xff; 32]),
            witness_from: self.witness_from,
            created_at_micros: self.created_at_micros,
            reason: &self.reason,
        }
    }

    pub fn signed_by(&self, key: &VerifyingKey) -> bool {
        signed(key, &self.canonical().bytes(), &self.signature)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("an epoch record serialises");
        v.push(b'\n');
        v
    }

    pub fn from_bytes(where_: &str, bytes: &[u8]) -> Result<Self, WitnessError> {
        serde_json::from_slice(bytes).map_err(|e| WitnessError::Corrupt(format!("{where_}: {e}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("a witness record is unreadable: {0}")]
    Corrupt(String),
    #[error("the witness {witness} failed: {reason}")]
    Io { witness: String, reason: String },
}

/// What a create-only write found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist and now holds the bytes.
    New,
    /// Something was there already: these bytes, left as they were.
    Exists(Vec<u8>),
}

/// One name in a listing, with everything the store keeps under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The name inside its folder (`epoch.json`, `checkpoint-….json`).
    pub name: String,
    /// Object versions kept under the name (1 for a directory).
    pub versions: u32,
    /// Delete markers over it (S3 only): a record hidden from a plain listing.
    pub delete_markers: u32,
}

/// Where checkpoints are copied out of the database: a store of write-once objects.
#[async_trait::async_trait]
pub trait Witness: Send + Sync + std::fmt::Debug {
    /// For messages: `directory /var/lib/mira/witness`, `s3://bucket/prefix`.
    fn describe(&self) -> String;
    /// Writes `bytes` under `name` only if nothing is there; otherwise returns what is.
    async fn create(&self, name: &str, bytes: &[u8]) -> Result<Created, WitnessError>;
    /// The current bytes under `name`, if any.
    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, WitnessError>;
    /// The epoch folders, in any order.
    async fn epochs(&self) -> Result<Vec<Uuid>, WitnessError>;
    /// Names in `folder` (an epoch, or `None` for the top) that sort after `after`, in order,
    /// at most `limit`: called again with the last name until it returns fewer.
    async fn list(&self, folder: Option<Uuid>, after: &str, limit: usize) -> Result<Vec<Listed>, WitnessError>;
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
    pub fn create_dir(dir: &Path) -> Result<Self, WitnessError> {
        std::fs::create_dir_all(dir).map_err(|e| WitnessError::Io {
            witness: format!("directory {}", dir.display()),
            reason: e.to_string(),
        })?;
        Self::open(dir)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn io(&self, e: impl ToString) -> WitnessError {
        WitnessError::Io {
            witness: self.describe(),
            reason: e.to_string(),
        }
    }

    /// `name` inside the directory; names are Mira's own (a UUID folder and a file).
    fn at(&self, name: &str) -> Result<PathBuf, WitnessError> {
        if name.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
            return Err(self.io(format!("not a witness name: {name:?}")));
        }
        Ok(self.dir.join(name))
    }

    fn read(&self, path: &Path) -> Result<Option<Vec<u8>>, WitnessError> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(b)),
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

    async fn create(&self, name: &str, bytes: &[u8]) -> Result<Created, WitnessError> {
        use std::io::Write;
        let path = self.at(name)?;
        let folder = path.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&folder).map_err(|e| self.io(e))?;
        // Written under a temporary name, then linked into place: `link` fails when the name
        // exists, so a reader never sees half a record and nothing is ever replaced.
        let tmp = folder.join(format!(".tmp-{}", Uuid::new_v4()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| self.io(e))?;
        f.write_all(bytes).map_err(|e| self.io(e))?;
        f.sync_all().map_err(|e| self.io(e))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                // The new name itself must survive a crash.
                if let Ok(d) = std::fs::File::open(&folder) {
                    let _ = d.sync_all();
                }
                Ok(Created::New)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Ok(Created::Exists(self.read(&path)?.unwrap_or_default()))
            }
            Err(e) => Err(self.io(e)),
        }
    }

    async fn get(&self, name: &str) -> Result<Option<Vec<u8>>, WitnessError> {
        self.read(&self.at(name)?)
    }

    async fn epochs(&self) -> Result<Vec<Uuid>, WitnessError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| self.io(e))? {
            let entry = entry.map_err(|e| self.io(e))?;
            if entry.file_type().map_err(|e| self.io(e))?.is_dir() {
                if let Some(epoch) = entry.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) {
                    out.push(epoch);
                }
            }
        }
        Ok(out)
    }

    async fn list(&self, folder: Option<Uuid>, after: &str, limit: usize) -> Result<Vec<Listed>, WitnessError> {
        let dir = match folder {
            Some(e) => self.dir.join(e.to_string()),
            None => self.dir.clone(),
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(it) => it,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        // The `limit` smallest names after `after`: one pass, holding at most `limit` names.
        let mut keep = std::collections::BinaryHeap::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io(e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with('.') || name.as_str() <= after || entry.file_type().map_err(|e| self.io(e))?.is_dir() {
                continue;
            }
            keep.push(name);
            if keep.len() > limit {
                keep.pop();
            }
        }
        Ok(keep
            .into_sorted_vec()
            .into_iter()
            .map(|name| Listed {
                name,
                versions: 1,
                delete_markers: 0,
            })
            .collect())
    }
}

/// Every name in `folder`, page after page.
pub async fn list_all(witness: &dyn Witness, folder: Option<Uuid>) -> Result<Vec<Listed>, WitnessError> {
    let mut out: Vec<Listed> = Vec::new();
    loop {
        let after = out.last().map(|l| l.name.clone()).unwrap_or_default();
        let page = witness.list(folder, &after, 1000).await?;
        let n = page.len();
        out.extend(page);
        if n < 1000 {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_creates_each_name_once_and_lists_in_order() {
        let dir = std::env::temp_dir().join(format!("mira-witness-{}", Uuid::new_v4()));
        assert!(DirWitness::open(&dir).is_err(), "a missing directory is an error");
        let w = DirWitness::create_dir(&dir).unwrap();
        let epoch = Uuid::new_v4();
        for seq in [9, 10, 2] {
            let name = WitnessRecord::name(epoch, seq);
            assert_eq!(w.create(&name, b"a").await.unwrap(), Created::New);
        }
        let name = WitnessRecord::name(epoch, 10);
        assert_eq!(w.create(&name, b"b").await.unwrap(), Created::Exists(b"a".to_vec()));
        assert_eq!(w.get(&name).await.unwrap().unwrap(), b"a");
        assert_eq!(w.epochs().await.unwrap(), [epoch]);
        let names = |v: Vec<Listed>| v.into_iter().map(|l| l.name).collect::<Vec<_>>();
        assert_eq!(
            names(w.list(Some(epoch), "", 2).await.unwrap()),
            [checkpoint_file(2), checkpoint_file(9)]
        );
        assert_eq!(
            names(w.list(Some(epoch), &checkpoint_file(9), 2).await.unwrap()),
            [checkpoint_file(10)]
        );
        assert!(w.list(None, "", 10).await.unwrap().is_empty());
        assert!(w.get("../outside").await.is_err());
        assert_eq!(parse_checkpoint_file(&checkpoint_file(42)), Some(42));
        assert_eq!(parse_checkpoint_file("checkpoint-1.json"), None);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
