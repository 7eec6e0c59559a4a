//! Values the gateway gives a client to hold and hand back unchanged (WebSocket resume cursors,
//! browser session cookies): `base64url(nonce ‖ ChaCha20-Poly1305(bytes))` under a keyring data
//! key, with associated data that binds each value to its use (the tenant, the cookie's name),
//! so that it opens nowhere else.

use base64::Engine;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::KeyInit;

const NONCE: usize = 12;
const TAG: usize = 16;

pub struct Sealing {
    cipher: chacha20poly1305::ChaCha20Poly1305,
}

impl std::fmt::Debug for Sealing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealing")
    }
}

impl Sealing {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            cipher: chacha20poly1305::ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(key)),
        }
    }

    /// `msg` sealed with `aad`; `None` only when the system gives no random nonce.
    pub fn seal(&self, aad: &[u8], msg: &[u8]) -> Option<String> {
        let mut nonce = [0u8; NONCE];
        getrandom::getrandom(&mut nonce).ok()?;
        let sealed = self
            .cipher
            .encrypt(chacha20poly1305::Nonce::from_slice(&nonce), Payload { msg, aad })
            .ok()?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out))
    }

    /// The bytes `text` holds when this key sealed it with `aad`; `None` for anything else.
    pub fn open(&self, aad: &[u8], text: &str) -> Option<Vec<u8>> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        if raw.len() < NONCE + TAG {
            return None;
        }
        let (nonce, sealed) = raw.split_at(NONCE);
        self.cipher
            .decrypt(chacha20poly1305::Nonce::from_slice(nonce), Payload { msg: sealed, aad })
            .ok()
    }
}
