//! Keys that knocked: handshake initiations whose static key (decrypted with
//! the tunnel's key, after a valid mac1) is no peer of this tunnel
//! (`unknown_peer`), the last few of them, for the operator who asks why a
//! router does not connect (its key is not registered here, or it dials
//! another tenant's port). Whoever knows the tunnel's public key can make such
//! an initiation with any key from any source: an entry is a lead, not a
//! proof (the proof, the initiation's timestamp, is checked only for peers).
//!
//! Left out: initiations that name no key (`bad_mac`, `handshake_failed`),
//! and memory of more than [`STRANGERS`] keys: a flood of made-up keys pushes
//! out the older ones, never more.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

/// Keys remembered per tunnel, the most recent ones.
pub const STRANGERS: usize = 16;

/// A key that is no peer of the tunnel, and what it did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stranger {
    /// The static public key its initiations carry.
    pub public_key: [u8; 32],
    /// Where its last initiation came from.
    pub endpoint: SocketAddr,
    /// When that was.
    pub last_seen: Instant,
    /// Its initiations since it was first remembered.
    pub initiations: u64,
}

/// The last [`STRANGERS`] keys, the most recent first.
#[derive(Debug, Default)]
pub(super) struct Strangers(VecDeque<Stranger>);

impl Strangers {
    /// `key` sent an initiation from `from` at `now`.
    pub(super) fn knocked(&mut self, key: [u8; 32], from: SocketAddr, now: Instant) {
        let initiations = match self.0.iter().position(|s| s.public_key == key) {
            Some(at) => self.0.remove(at).map_or(0, |s| s.initiations),
            None => 0,
        };
        if self.0.len() >= STRANGERS {
            self.0.pop_back();
        }
        self.0.push_front(Stranger {
            public_key: key,
            endpoint: from,
            last_seen: now,
            initiations: initiations.saturating_add(1),
        });
    }

    /// The keys, the most recent first.
    pub(super) fn list(&self) -> Vec<Stranger> {
        self.0.iter().cloned().collect()
    }

    /// `key` is a peer now: it is no stranger any more.
    pub(super) fn welcome(&mut self, key: &[u8; 32]) {
        self.0.retain(|s| &s.public_key != key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_most_recent_keys_are_kept_with_their_count() {
        let now = Instant::now();
        let from: SocketAddr = "198.51.100.7:4000".parse().unwrap();
        let mut strangers = Strangers::default();
        for n in 0..40u8 {
            strangers.knocked([n; 32], from, now + Duration::from_secs(u64::from(n)));
        }
        let list = strangers.list();
        assert_eq!(list.len(), STRANGERS);
        assert_eq!(list[0].public_key, [39; 32], "the most recent first");
        assert_eq!(list[STRANGERS - 1].public_key, [24; 32]);

        let elsewhere: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        strangers.knocked([30; 32], elsewhere, now + Duration::from_secs(99));
        strangers.knocked([30; 32], elsewhere, now + Duration::from_secs(100));
        let list = strangers.list();
        assert_eq!(list.len(), STRANGERS);
        assert_eq!(
            (list[0].public_key, list[0].endpoint, list[0].initiations),
            ([30; 32], elsewhere, 3)
        );
        strangers.welcome(&[30; 32]);
        assert!(strangers.list().iter().all(|s| s.public_key != [30; 32]));
    }
}
