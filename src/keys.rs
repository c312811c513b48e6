//! WireGuard keys as text: generation and the base64 form `wg` prints.
//!
//! Private keys are wrapped in [`SecretKey`], preshared keys in [`PresharedKey`],
//! whose `Debug` never shows the key, so a stray `{:?}` cannot leak one into a log.
//!
//! Left out: keeping keys at rest (sealed by [`crate::store::seal`]) and using them:
//! the handshakes are boringtun's (see [`crate::core::peer`]).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use rand_core::OsRng;

/// Why a key string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not standard base64.
    #[error("not valid base64")]
    Base64,
    /// Decodes, but not to 32 bytes.
    #[error("a key is 32 bytes, this is {0}")]
    Length(usize),
}

/// Parses a 32-byte key in standard base64.
///
/// ```
/// let key = wgplane::keys::decode("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=").unwrap();
/// assert_eq!(wgplane::keys::encode(&key), "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=");
/// assert!(wgplane::keys::decode("too short").is_err());
/// ```
pub fn decode(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// Formats a 32-byte key in standard base64.
pub fn encode(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// A private key. Cloning is explicit and `Debug` is redacted.
#[derive(Clone)]
pub struct SecretKey(StaticSecret);

impl SecretKey {
    /// A fresh random key, clamped as `wg genkey` prints it (x25519 clamps on
    /// use anyway; the bytes are the same as `wg`'s tools expect).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut bytes);
        bytes[0] &= 248;
        bytes[31] = (bytes[31] & 127) | 64;
        Self(StaticSecret::from(bytes))
    }

    /// From raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// Parses base64 text.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode(text).map(Self::from_bytes)
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey::from(&self.0)
    }

    /// The x25519 secret, for the data plane.
    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }

    /// The key as `wg genkey` prints it. Only for the config a device receives.
    pub fn to_base64(&self) -> String {
        encode(&self.0.to_bytes())
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A peer's preshared key (`wg genpsk`): 32 symmetric bytes mixed into every
/// handshake with that peer. `Debug` is redacted, comparison constant-time.
/// Boxed: most peers have none, and `Option<PresharedKey>` is then one
/// pointer in every peer's state, not 33 bytes.
#[derive(Clone)]
pub struct PresharedKey(Box<[u8; 32]>);

impl PresharedKey {
    /// A fresh random key, as `wg genpsk` makes one.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut OsRng, &mut bytes);
        Self::from_bytes(bytes)
    }

    /// From raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Box::new(bytes))
    }

    /// Parses base64 text.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        decode(text).map(Self::from_bytes)
    }

    /// The key, for the handshake.
    pub fn to_bytes(&self) -> [u8; 32] {
        *self.0
    }

    /// The key as `wg genpsk` prints it. Only for what a device receives.
    pub fn to_base64(&self) -> String {
        encode(&self.0)
    }
}

const _: () = assert!(std::mem::size_of::<Option<PresharedKey>>() == std::mem::size_of::<usize>());

impl PartialEq for PresharedKey {
    fn eq(&self, other: &Self) -> bool {
        subtle::ConstantTimeEq::ct_eq(&self.0[..], &other.0[..]).into()
    }
}

impl Eq for PresharedKey {}

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_redaction() {
        let k = SecretKey::generate();
        let again = SecretKey::parse(&k.to_base64()).unwrap();
        assert_eq!(again.public().as_bytes(), k.public().as_bytes());
        assert_eq!(format!("{k:?}"), "SecretKey(<redacted>)");
        let psk = PresharedKey::generate();
        assert_eq!(PresharedKey::parse(&psk.to_base64()), Ok(psk.clone()));
        assert_eq!(format!("{psk:?}"), "PresharedKey(<redacted>)");
        assert_ne!(psk, PresharedKey::generate());
        assert_eq!(decode("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(decode("not base64!"), Err(KeyError::Base64));
    }

    /// Generated keys come clamped, as `wg genkey` prints them.
    #[test]
    fn generated_keys_are_clamped() {
        for _ in 0..64 {
            let bytes = decode(&SecretKey::generate().to_base64()).unwrap();
            assert_eq!(bytes[0] & 7, 0);
            assert_eq!(bytes[31] & 0xc0, 0x40);
        }
    }

    #[test]
    fn public_key_matches_wg() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey` (RFC 7748 vector key)
        let k = SecretKey::parse("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            encode(k.public().as_bytes()),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }
}
