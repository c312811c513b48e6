//! Fair shares of the handshake budget per source address, under load.
//!
//! Under load only initiations with a valid cookie get Diffie-Hellman work, and a
//! cookie proves an address, not good intent: one host that collects cookies
//! could still spend the whole budget and starve everyone else. As kernel
//! WireGuard does (`ratelimiter.c`), each source gets its own small token bucket:
//! 20 handshakes a second, bursts of 5. Sources are IPv4 addresses and IPv6 /64
//! prefixes (one host can hold a whole /64).
//!
//! Memory is bounded: sources idle for a second are forgotten, and a full table
//! makes room for a new source by forgetting the one used least recently (it
//! starts afresh with a full burst should it come back). Only address-proven
//! sources are ever entered, so spoofed floods cannot fill it.
//!
//! Time is passed in; nothing here reads a clock.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Handshakes per second one source may cost under load.
pub const PER_SOURCE_PER_SECOND: f64 = 20.0;
/// Handshakes one source may cost at once under load.
pub const PER_SOURCE_BURST: f64 = 5.0;
/// Most sources tracked at once.
pub const MAX_SOURCES: usize = 65_536;
/// How long a source is remembered after its last initiation.
const IDLE: Duration = Duration::from_secs(1);

/// Per-source token buckets.
#[derive(Debug, Default)]
pub struct SourceLimiter {
    buckets: HashMap<u128, Bucket>,
    /// Every tracked source by its bucket's `last`, least recently used first.
    by_use: BTreeSet<(Instant, u128)>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl SourceLimiter {
    /// Takes one handshake from `source`'s share at `now`; false if it has none
    /// left. O(log n) in the sources tracked.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        self.sweep(now);
        let key = key(source);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_SOURCES {
            if let Some((_, oldest)) = self.by_use.pop_first() {
                self.buckets.remove(&oldest);
            }
        }
        let by_use = &mut self.by_use;
        let bucket = self.buckets.entry(key).or_insert_with(|| {
            by_use.insert((now, key));
            Bucket {
                tokens: PER_SOURCE_BURST,
                last: now,
            }
        });
        if now > bucket.last {
            let earned = now.duration_since(bucket.last).as_secs_f64() * PER_SOURCE_PER_SECOND;
            bucket.tokens = (bucket.tokens + earned).min(PER_SOURCE_BURST);
            by_use.remove(&(bucket.last, key));
            by_use.insert((now, key));
            bucket.last = now;
        }
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Sources currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True if no source is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Forgets idle sources, least recently used first: O(1) when none is idle.
    fn sweep(&mut self, now: Instant) {
        while let Some(&(last, key)) = self.by_use.first() {
            if now.saturating_duration_since(last) < IDLE {
                break;
            }
            self.by_use.pop_first();
            self.buckets.remove(&key);
        }
    }
}

/// IPv4 addresses as themselves, IPv6 addresses by their /64. An IPv4 address
/// seen on a dual-stack socket (`::ffff:a.b.c.d`) is that IPv4 address: by its
/// /64 every IPv4 sender would share one bucket.
fn key(source: IpAddr) -> u128 {
    match source.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) | (1 << 127),
        IpAddr::V6(v6) => u128::from(v6) & !((1u128 << 64) - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv4_on_a_dual_stack_socket_is_keyed_as_ipv4() {
        let a = Ipv4Addr::new(198, 51, 100, 7);
        let b = Ipv4Addr::new(198, 51, 100, 8);
        assert_eq!(key(IpAddr::V6(a.to_ipv6_mapped())), key(IpAddr::V4(a)));
        assert_ne!(
            key(IpAddr::V6(a.to_ipv6_mapped())),
            key(IpAddr::V6(b.to_ipv6_mapped()))
        );
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 8));

    #[test]
    fn a_burst_then_twenty_a_second_per_source() {
        let mut limiter = SourceLimiter::default();
        let t0 = Instant::now();
        assert_eq!((0..100).filter(|_| limiter.allow(A, t0)).count(), 5);
        // Another source has its own share.
        assert!(limiter.allow(B, t0));
        // 100 ms later: two more for A.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!((0..100).filter(|_| limiter.allow(A, t1)).count(), 2);
    }

    #[test]
    fn one_ipv6_host_is_one_source_per_64() {
        let mut limiter = SourceLimiter::default();
        let t0 = Instant::now();
        let allowed = (0..100u16)
            .filter(|i| {
                let host = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, *i);
                limiter.allow(IpAddr::V6(host), t0)
            })
            .count();
        assert_eq!(allowed, 5);
        let other = Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1);
        assert!(limiter.allow(IpAddr::V6(other), t0));
    }

    #[test]
    fn idle_sources_are_forgotten_and_the_table_is_bounded() {
        let mut limiter = SourceLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            assert!(limiter.allow(IpAddr::V4(Ipv4Addr::from(i)), t0));
        }
        assert_eq!(limiter.len(), MAX_SOURCES);
        // Source 0 is used again, so source 1 is the least recently used.
        let t1 = t0 + Duration::from_millis(1);
        let (zero, one) = (Ipv4Addr::from(0), Ipv4Addr::from(1));
        assert!(limiter.allow(IpAddr::V4(zero), t1));
        // Full: a new source takes the place of the least recently used one.
        let newcomer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
        assert!(limiter.allow(newcomer, t1));
        assert_eq!(limiter.len(), MAX_SOURCES);
        assert!(!limiter.buckets.contains_key(&key(IpAddr::V4(one))));
        assert!(limiter.buckets.contains_key(&key(IpAddr::V4(zero))));
        assert_eq!(limiter.by_use.len(), MAX_SOURCES);
        // A second after their last use the idle ones are gone.
        assert!(limiter.allow(newcomer, t0 + IDLE));
        assert_eq!(limiter.len(), 2);
        assert!(limiter.allow(newcomer, t1 + IDLE));
        assert_eq!((limiter.len(), limiter.by_use.len()), (1, 1));
    }
}
