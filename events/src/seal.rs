//! Sealing of fields that can carry patient data (DESIGN §3).
//!
//! A sealed field is stored as ciphertext under a per-subject data key, so the hash chain
//! covers ciphertext only. Erasing a subject destroys its key: the events stay, verifiable,
//! and unreadable. `mira dev` and the tests use [`LocalKeyring`], a directory of key files;
//! production wraps the same trait around KMS.
//!
//! The cipher is ChaCha20-Poly1305 with a random 96-bit nonce. The associated data binds the
//! ciphertext to its subject and field, so a sealed value cannot be moved to another slide or
//! another field without failing to open.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A sealed field as it is stored inside an event payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The data subject whose key sealed this value (for example `slide:<uuid>`).
    pub subject: String,
    /// Base64 of the 12-byte nonce.
    pub nonce: String,
    /// Base64 of ciphertext ‖ tag.
    pub ct: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("the data key of subject {0} was erased")]
    Erased(String),
    #[error("sealed value for subject {0} does not open: wrong key, field or tampered bytes")]
    Corrupt(String),
    #[error("keyring storage failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} is not a Mira keyring (no KEYRING file there): run `mira keys init`")]
    NotInitialised(PathBuf),
    #[error("the key service failed: {0}")]
    Service(String),
}

/// Holds one data key per subject.
#[async_trait::async_trait]
pub trait Keyring: Send + Sync {
    /// The subject's key, created on first use.
    async fn key_for(&self, subject: &str) -> Result<[u8; 32], KeyringError>;
    /// The subject's key if it still exists.
    async fn existing_key(&self, subject: &str) -> Result<Option<[u8; 32]>, KeyringError>;
    /// Destroys the subject's key; everything sealed under it becomes unreadable.
    async fn erase(&self, subject: &str) -> Result<(), KeyringError>;
}

fn aad(subject: &str, field: &str) -> Vec<u8> {
    format!("mira.seal.v1|{subject}|{field}").into_bytes()
}

/// Seals `plaintext` as `field` of `subject`.
pub async fn seal(keyring: &dyn Keyring, subject: &str, field: &str, plaintext: &str) -> Result<Sealed, KeyringError> {
    let key = keyring.key_for(subject).await?;
    let mut nonce = [0u8; 12];
    getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext.as_bytes(),
                aad: &aad(subject, field),
            },
        )
        .map_err(|_| KeyringError::Corrupt(subject.to_owned()))?;
    Ok(Sealed {
        subject: subject.to_owned(),
        nonce: B64.encode(nonce),
        ct: B64.encode(ct),
    })
}

/// Opens a value sealed as `field`.
pub async fn open(keyring: &dyn Keyring, sealed: &Sealed, field: &str) -> Result<String, KeyringError> {
    let corrupt = || KeyringError::Corrupt(sealed.subject.clone());
    let key = keyring
        .existing_key(&sealed.subject)
        .await?
        .ok_or_else(|| KeyringError::Erased(sealed.subject.clone()))?;
    let nonce = B64.decode(&sealed.nonce).map_err(|_| corrupt())?;
    let ct = B64.decode(&sealed.ct).map_err(|_| corrupt())?;
    if nonce.len() != 12 {
        return Err(corrupt());
    }
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&key));
    let pt = cipher
        .decrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &ct,
                aad: &aad(&sealed.subject, field),
            },
        )
        .map_err(|_| corrupt())?;
    String::from_utf8(pt).map_err(|_| corrupt())
}

/// A keyring in a local directory: one file per subject, named by the SHA-256 of the
/// subject so that file names reveal nothing.
#[derive(Debug, Clone)]
pub struct LocalKeyring {
    dir: PathBuf,
}

/// The file that marks a directory as a keyring: a missing or mistyped directory is an error,
/// never a new, empty keyring whose keys open nothing sealed before.
pub const KEYRING_MARKER: &str = "KEYRING";

impl LocalKeyring {
    /// The keyring in `dir`, which `mira keys init` created.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, KeyringError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(KEYRING_MARKER).is_file() {
            return Err(KeyringError::NotInitialised(dir));
        }
        Ok(Self { dir })
    }

    /// `mira keys init`: creates the keyring in `dir` unless it is one already. Returns whether
    /// it was created now.
    pub fn init(dir: impl AsRef<Path>) -> Result<(Self, bool), KeyringError> {
        let dir = dir.as_ref().to_path_buf();
        let marker = dir.join(KEYRING_MARKER);
        if marker.is_file() {
            return Ok((Self { dir }, false));
        }
        fs::create_dir_all(&dir)?;
        #[cfg(unix)]
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        fs::write(&marker, format!("mira keyring {}\n", uuid::Uuid::new_v4()))?;
        Ok((Self { dir }, true))
    }

    fn path(&self, subject: &str) -> PathBuf {
        self.dir
            .join(format!("{}.key", hex::encode(Sha256::digest(subject.as_bytes()))))
    }

    fn read(path: &Path) -> Result<Option<[u8; 32]>, KeyringError> {
        match fs::read_to_string(path) {
            Ok(s) => {
                let bytes = hex::decode(s.trim()).map_err(|_| {
                    KeyringError::Io(std::io::Error::other(format!(
                        "key file {} is not 64 hex digits",
                        path.display()
                    )))
                })?;
                let key: [u8; 32] = bytes.try_into().map_err(|_| {
                    KeyringError::Io(std::io::Error::other(format!(
                        "key file {} is not 32 bytes",
                        path.display()
                    )))
                })?;
                Ok(Some(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[async_trait::async_trait]
impl Keyring for LocalKeyring {
    async fn key_for(&self, subject: &str) -> Result<[u8; 32], KeyringError> {
        let path = self.path(subject);
        if let Some(k) = Self::read(&path)? {
            return Ok(k);
        }
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        // Write under a unique temporary name, then link it into place: a concurrent creator
        // either wins (we read its key) or loses; nobody ever reads a half-written file.
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
        let mut f = opts.open(&tmp)?;
        f.write_all(hex::encode(key).as_bytes())?;
        f.sync_all()?;
        let linked = fs::hard_link(&tmp, &path);
        fs::remove_file(&tmp)?;
        match linked {
            Ok(()) => Ok(key),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::read(&path)?.ok_or_else(|| KeyringError::Erased(subject.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn existing_key(&self, subject: &str) -> Result<Option<[u8; 32]>, KeyringError> {
        Self::read(&self.path(subject))
    }

    async fn erase(&self, subject: &str) -> Result<(), KeyringError> {
        match fs::remove_file(self.path(subject)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        std::env::temp_dir().join(format!("mira-keyring-{}", uuid::Uuid::new_v4()))
    }

    #[tokio::test]
    async fn seal_open_erase() {
        let dir = temp_dir();
        assert!(matches!(LocalKeyring::open(&dir), Err(KeyringError::NotInitialised(_))));
        let (ring, created) = LocalKeyring::init(&dir).unwrap();
        assert!(created);
        assert!(!LocalKeyring::init(&dir).unwrap().1);
        let ring2 = LocalKeyring::open(&dir).unwrap();
        let s = seal(&ring, "slide:1", "name", "Patient 42 biopsy").await.unwrap();
        assert!(!s.ct.contains("Patient"));
        assert_eq!(open(&ring, &s, "name").await.unwrap(), "Patient 42 biopsy");
        assert_eq!(open(&ring2, &s, "name").await.unwrap(), "Patient 42 biopsy");
        // Bound to its field and subject.
        assert!(matches!(
            open(&ring, &s, "file_name").await,
            Err(KeyringError::Corrupt(_))
        ));
        let moved = Sealed {
            subject: "slide:2".into(),
            ..s.clone()
        };
        ring.key_for("slide:2").await.unwrap();
        assert!(open(&ring, &moved, "name").await.is_err());
        // Same key on reuse, a fresh nonce each time.
        let s2 = seal(&ring, "slide:1", "name", "Patient 42 biopsy").await.unwrap();
        assert_ne!(s.nonce, s2.nonce);
        assert_eq!(open(&ring, &s2, "name").await.unwrap(), "Patient 42 biopsy");
        ring.erase("slide:1").await.unwrap();
        assert!(matches!(open(&ring, &s, "name").await, Err(KeyringError::Erased(_))));
        fs::remove_dir_all(dir).unwrap();
    }
}
