//! Secrets at rest: the store's rows that hold credentials (connections, pending flows,
//! profile settings, provider state) sealed with XChaCha20-Poly1305 under a 256-bit key the
//! user keeps outside the store. A sealed value is bound to its row's key, so rows cannot be
//! swapped between connections unnoticed.
//!
//! Layout: `[SEALED][key id: 8][nonce: 24][ciphertext + tag]`.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use std::fmt;

/// The first byte of a sealed value (never a record format byte, nor `{`).
pub const SEALED: u8 = 0xE5;
const NONCE: usize = 24;
const HEADER: usize = 1 + 8 + NONCE;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a secrets key is 32 bytes written as base64 (44 characters) or hex (64): this one is {0} characters")]
    Malformed(usize),
}

/// One 256-bit key and its id (the first 8 bytes of a SHA-256 of it: safe to show, and the
/// store keeps it to know which key sealed it).
#[derive(Clone)]
pub struct SecretsKey {
    key: [u8; 32],
    id: u64,
}

/// Only the id: the key itself is secret.
impl fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretsKey({})", self.id_hex())
    }
}

impl SecretsKey {
    pub fn from_bytes(key: [u8; 32]) -> Self {
        let digest = Sha256::new().chain_update(b"authkeeper secrets key id\0").chain_update(key).finalize();
        let id = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
        Self { key, id }
    }

    /// A key as written in a key file or an environment variable: base64 or hex, with
    /// surrounding whitespace ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        use base64::Engine;
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex digits")).collect()
        } else {
            base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| KeyError::Malformed(text.len()))?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Malformed(text.len()))?;
        Ok(Self::from_bytes(key))
    }

    /// A new random key.
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random source works");
        Self::from_bytes(key)
    }

    /// The key as base64, for a key file.
    pub fn to_text(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.key)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn id_hex(&self) -> String {
        format!("{:016x}", self.id)
    }
}

/// The key that seals, and earlier keys that may still have sealed the store (rotation).
#[derive(Clone, Debug)]
pub struct Sealer {
    pub current: SecretsKey,
    pub previous: Vec<SecretsKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed with key {found}, which was not given")]
    UnknownKey { found: String },
    #[error("cannot be decrypted with its key: the row was altered or moved")]
    Tampered,
    #[error("truncated sealed value")]
    Truncated,
}

impl Sealer {
    pub fn new(current: SecretsKey) -> Self {
        Self { current, previous: Vec::new() }
    }

    /// The key with this id, current or previous.
    pub fn key(&self, id: u64) -> Option<&SecretsKey> {
        std::iter::once(&self.current).chain(&self.previous).find(|k| k.id == id)
    }

    /// Seal `plain`, the value of row `row`, with the current key.
    pub fn seal(&self, row: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&self.current.key));
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: row.as_bytes() })
            .expect("sealing into memory cannot fail");
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.push(SEALED);
        out.extend_from_slice(&self.current.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Open a value sealed by [`Sealer::seal`] for row `row`, with whichever given key sealed it.
    pub fn open(&self, row: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < HEADER || sealed[0] != SEALED {
            return Err(SealError::Truncated);
        }
        let id = u64::from_be_bytes(sealed[1..9].try_into().expect("8 bytes"));
        let key = self.key(id).ok_or_else(|| SealError::UnknownKey { found: format!("{id:016x}") })?;
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&key.key));
        cipher
            .decrypt(XNonce::from_slice(&sealed[9..HEADER]), Payload { msg: &sealed[HEADER..], aad: row.as_bytes() })
            .map_err(|_| SealError::Tampered)
    }
}

/// True when `value` is sealed.
pub fn is_sealed(value: &[u8]) -> bool {
    value.first() == Some(&SEALED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_for_its_row() {
        let sealer = Sealer::new(SecretsKey::generate());
        let sealed = sealer.seal("trakt/default", b"refresh-token-123");
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(17).any(|w| w == b"refresh-token-123"), "no clear text");
        assert_eq!(sealer.open("trakt/default", &sealed).unwrap(), b"refresh-token-123");
        assert!(matches!(sealer.open("trakt/other", &sealed), Err(SealError::Tampered)), "bound to its row");
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(sealer.open("trakt/default", &flipped), Err(SealError::Tampered)));
        let other = Sealer::new(SecretsKey::generate());
        assert!(matches!(other.open("trakt/default", &sealed), Err(SealError::UnknownKey { .. })));
        assert!(matches!(sealer.open("trakt/default", &sealed[..20]), Err(SealError::Truncated)));
        // A rotated sealer still opens what the old key sealed.
        let rotated = Sealer { current: SecretsKey::generate(), previous: vec![sealer.current.clone()] };
        assert_eq!(rotated.open("trakt/default", &sealed).unwrap(), b"refresh-token-123");
    }

    #[test]
    fn keys_are_read_as_base64_or_hex_and_never_shown() {
        let key = SecretsKey::generate();
        let again = SecretsKey::parse(&format!("  {}\n", key.to_text())).unwrap();
        assert_eq!(again.id(), key.id());
        let hex: String = key.key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(SecretsKey::parse(&hex).unwrap().id(), key.id());
        assert!(matches!(SecretsKey::parse("too short"), Err(KeyError::Malformed(9))));
        assert!(!format!("{key:?}").contains(&key.to_text()));
        assert_eq!(format!("{key:?}"), format!("SecretsKey({})", key.id_hex()));
    }
}
