//! Fair shares of the handshake budget per source address, under load.
//!
//! Under load only initiations with a valid cookie get Diffie-Hellman work, and a
//! cookie proves an address, not good intent: one host that collects cookies
//! could still spend the whole budget and starve everyone else. As kernel
//! WireGuard does (`ratelimiter.c`), each source gets its own small token bucket:
//! 20 handshakes a second, bursts of 5. Sources are IPv4 addresses and IPv6 /64
//! prefixes (one host can hold a whole /64).
//!
//! Memory is bounded: sources idle for a second are forgotten at most once a
//! second, and a full table refuses new sources until then. Only address-proven
//! sources are ever entered, so spoofed floods cannot fill it.
//!
//! Time is passed in; nothing here reads a clock.

use std::collections::HashMap;
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
    last_sweep: Option<Instant>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl SourceLimiter {
    /// Takes one handshake from `source`'s share at `now`; false if it has none
    /// left (or the table is full of other sources).
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        self.sweep(now);
        let key = key(source);
        let full = self.buckets.len() >= MAX_SOURCES;
        let bucket = match self.buckets.get_mut(&key) {
            Some(bucket) => bucket,
            None if full => return false,
            None => self.buckets.entry(key).or_insert(Bucket {
                tokens: PER_SOURCE_BURST,
                last: now,
            }),
        };
        if now > bucket.last {
            let earned = now.duration_since(bucket.last).as_secs_f64() * PER_SOURCE_PER_SECOND;
            bucket.tokens = (bucket.tokens + earned).min(PER_SOURCE_BURST);
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

    /// Forgets idle sources, at most once a second.
    fn sweep(&mut self, now: Instant) {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= IDLE);
        if due {
            self.buckets
                .retain(|_, b| now.saturating_duration_since(b.last) < IDLE);
            self.last_sweep = Some(now);
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
        // Full: a new source is refused, a known one still has its share.
        let newcomer = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
        assert!(!limiter.allow(newcomer, t0));
        assert!(limiter.allow(IpAddr::V4(Ipv4Addr::from(0)), t0));
        // A second later the idle ones are gone.
        let t1 = t0 + IDLE;
        assert!(limiter.allow(newcomer, t1));
        assert_eq!(limiter.len(), 1);
    }
}
