//! The initiator's side of WireGuard's cookie mechanism, for the bench's routers.
//!
//! boringtun keeps a peer's cookie inside its `Tunn` and writes `mac2` only into
//! the initiations that `Tunn` formats after the cookie reply came. The storm's
//! echoing routers send initiations prepared before the measured window (each
//! costs the sender two Diffie-Hellman operations), so they open the cookie
//! reply and write `mac2` into a prepared initiation themselves, as the
//! WireGuard paper's section 5.4.7 specifies it:
//!
//! - the cookie reply's key is `BLAKE2s("cookie--" || responder's public key)`,
//!   its nonce the reply's bytes 8..32, its associated data the `mac1` of the
//!   initiation it answers, its sealed 16-byte cookie the bytes 32..64;
//! - `mac2` is the keyed BLAKE2s-128 of the initiation's bytes 0..132 under the
//!   cookie.
//!
//! Left out: the responder's side (boringtun's `RateLimiter`, used by
//! [`crate::core::admission`]) and cookies on handshake responses.

use blake2::digest::consts::U16;
use blake2::digest::{Digest, FixedOutput, KeyInit as MacKey, Update};
use blake2::{Blake2s256, Blake2sMac};
use boringtun::x25519::PublicKey;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Size of a handshake initiation.
pub const INITIATION_LEN: usize = 148;
/// Where an initiation's `mac1` and `mac2` lie.
const MAC1: std::ops::Range<usize> = 116..132;
const MAC2: std::ops::Range<usize> = 132..148;
/// Size of a cookie reply, and where its nonce and sealed cookie lie.
const COOKIE_REPLY_LEN: usize = 64;
const NONCE: std::ops::Range<usize> = 8..32;
const SEALED: std::ops::Range<usize> = 32..64;
/// Message type 3 (little-endian) and its three reserved zero bytes.
const COOKIE_REPLY_TYPE: [u8; 4] = [3, 0, 0, 0];

/// A cookie: what the responder asks an initiator to prove its address with.
pub type Cookie = [u8; 16];

/// Opens the cookie replies of one responder (one tunnel's public key).
pub struct CookieOpener {
    cipher: XChaCha20Poly1305,
}

impl CookieOpener {
    pub fn new(responder: &PublicKey) -> Self {
        let key = Blake2s256::new()
            .chain(b"cookie--")
            .chain(responder.as_bytes())
            .finalize();
        Self {
            // A 32-byte slice is always a valid key for this cipher.
            cipher: XChaCha20Poly1305::new_from_slice(&key).expect("32-byte key"),
        }
    }

    /// The cookie in `reply`, a cookie reply to `initiation`; none if `reply` is
    /// not one, or not from this responder, or answers another initiation.
    pub fn open(&self, reply: &[u8], initiation: &[u8; INITIATION_LEN]) -> Option<Cookie> {
        if reply.len() != COOKIE_REPLY_LEN || reply[..4] != COOKIE_REPLY_TYPE {
            return None;
        }
        let nonce: [u8; 24] = reply[NONCE].try_into().ok()?;
        let cookie = self
            .cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &reply[SEALED],
                    aad: &initiation[MAC1],
                },
            )
            .ok()?;
        cookie.try_into().ok()
    }
}

/// Writes `mac2` under `cookie` into `initiation` (whose `mac1` is already set).
pub fn write_mac2(initiation: &mut [u8; INITIATION_LEN], cookie: &Cookie) {
    let mut mac = <Blake2sMac<U16> as MacKey>::new_from_slice(cookie)
        .expect("BLAKE2s takes keys of 1 to 32 bytes");
    Update::update(&mut mac, &initiation[..MAC2.start]);
    initiation[MAC2].copy_from_slice(&mac.finalize_fixed());
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use boringtun::noise::rate_limiter::RateLimiter;
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::StaticSecret;

    use super::*;

    const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 9));

    fn keys() -> (StaticSecret, PublicKey) {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret);
        (secret, public)
    }

    fn initiation(tunn: &mut Tunn) -> [u8; INITIATION_LEN] {
        let mut buf = [0u8; 256];
        match tunn.format_handshake_initiation(&mut buf, true) {
            TunnResult::WriteToNetwork(d) => d.try_into().expect("an initiation"),
            _ => panic!("no initiation"),
        }
    }

    /// boringtun's responder, under load from the start (limit 0), is the judge:
    /// a prepared initiation with the `mac2` written here passes it.
    #[test]
    fn a_prepared_initiation_with_the_opened_cookie_passes_a_responder_under_load() {
        let (_, server) = keys();
        let limiter = RateLimiter::new(&server, 0);
        let (router, _) = keys();
        let mut tunn = Tunn::new(router, server, None, None, 1, None);
        let first = initiation(&mut tunn);
        let mut later = initiation(&mut tunn);

        let mut out = [0u8; 256];
        let reply = match limiter.verify_packet(Some(FROM), &first, &mut out) {
            Err(TunnResult::WriteToNetwork(reply)) => reply.to_vec(),
            _ => panic!("a responder under load answers with a cookie reply"),
        };
        let opener = CookieOpener::new(&server);
        let cookie = opener.open(&reply, &first).expect("the cookie");
        // The reply is bound to the initiation it answers (its mac1)...
        assert_eq!(opener.open(&reply, &later), None);
        // ...and to the responder.
        assert_eq!(CookieOpener::new(&keys().1).open(&reply, &first), None);

        write_mac2(&mut later, &cookie);
        assert!(limiter.verify_packet(Some(FROM), &later, &mut out).is_ok());
        // From another address the cookie proves nothing.
        let elsewhere = IpAddr::V4(Ipv4Addr::new(127, 77, 0, 10));
        assert!(limiter
            .verify_packet(Some(elsewhere), &later, &mut out)
            .is_err());
        // A wrong cookie does not pass either.
        write_mac2(&mut later, &[7; 16]);
        assert!(limiter.verify_packet(Some(FROM), &later, &mut out).is_err());
    }

    #[test]
    fn what_is_not_a_cookie_reply_opens_to_nothing() {
        let opener = CookieOpener::new(&keys().1);
        let initiation = [0u8; INITIATION_LEN];
        assert_eq!(opener.open(&[], &initiation), None);
        assert_eq!(opener.open(&[3, 0, 0, 0], &initiation), None);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        reply[0] = 3;
        assert_eq!(opener.open(&reply, &initiation), None);
        reply[0] = 2;
        assert_eq!(opener.open(&reply, &initiation), None);
        assert_eq!(opener.open(&[3; 92], &initiation), None);
    }
}
