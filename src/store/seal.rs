//! Private keys at rest: XChaCha20-Poly1305 under a master key.
//!
//! A sealed value is `nonce (24 bytes) || ciphertext+tag`; the associated data names
//! the row it belongs to (`router/acme/r1`), so a sealed key copied into another row
//! does not open. The master key itself never enters the store.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::RngCore;

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Too short to hold a nonce and a tag.
    #[error("sealed value is truncated")]
    Truncated,
    /// Authentication failed: wrong master key, or the value was altered or moved.
    #[error("sealed value does not open with this master key")]
    WrongKey,
    /// The plaintext is not a 32-byte key.
    #[error("sealed value does not hold a 32-byte key")]
    NotAKey,
}

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The master key. `Debug` is redacted.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// From raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The raw bytes (only to write the key file).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        // A 32-byte slice is always a valid key for this cipher.
        XChaCha20Poly1305::new_from_slice(&self.0).expect("32-byte key")
    }

    /// Encrypts `plain`, bound to `context`.
    pub fn seal(&self, plain: &[u8], context: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand_core::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher()
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: context.as_bytes(),
                },
            )
            // Encryption of an in-memory buffer cannot fail for this AEAD.
            .expect("XChaCha20-Poly1305 encryption");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a value sealed with `context`.
    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>, SealError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(SealError::Truncated);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| SealError::Truncated)?;
        self.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: body,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::WrongKey)
    }

    /// Decrypts a sealed 32-byte key.
    pub fn open_key(&self, sealed: &[u8], context: &str) -> Result<[u8; 32], SealError> {
        let plain = self.open(sealed, context)?;
        <[u8; 32]>::try_from(plain.as_slice()).map_err(|_| SealError::NotAKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let k = MasterKey::generate();
        let sealed = k.seal(&[7u8; 32], "router/a/r1");
        assert_eq!(k.open_key(&sealed, "router/a/r1"), Ok([7u8; 32]));
        assert!(
            !sealed.windows(32).any(|w| w == [7u8; 32]),
            "no plaintext in the blob"
        );
        assert_eq!(k.open(&sealed, "router/a/r2"), Err(SealError::WrongKey));
        assert_eq!(
            MasterKey::generate().open(&sealed, "router/a/r1"),
            Err(SealError::WrongKey)
        );
        assert_eq!(
            k.open(&sealed[..30], "router/a/r1"),
            Err(SealError::Truncated)
        );
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }
}
