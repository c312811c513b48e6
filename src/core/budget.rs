//! The process-wide budget for handshake work.
//!
//! A storm spread over many tunnels, each below its own cookie threshold, can
//! still eat every core with Diffie-Hellman work (about 150 µs per handshake)
//! and starve established flows. This token bucket, shared by all tunnels, caps
//! the handshakes the process computes per second. When it runs dry, or when
//! more initiations are offered in a second than it pays for, every tunnel
//! counts as under load for a second and answers initiations without a valid
//! cookie with cookie replies (see [`super::admission`]), and each source of
//! cookie-proven initiations gets its own fair share ([`SourceLimiter`]). The
//! offered count keeps a storm that only ever meets cookies (and so never takes
//! a token) from finding the process calm again after a second.
//!
//! Time is passed in; nothing here reads a clock.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use super::load::{LoadMemory, PerSecond};
use super::sources::SourceLimiter;

/// A token bucket of handshakes: `per_second` tokens a second, at most 10 ms
/// worth saved up. A small bucket paces the work: a burst of Diffie-Hellman
/// never holds a core for long (a full second's worth took 0.4 s of one core at
/// the default and stalled the flows that share it; at 10 ms it is 20
/// handshakes, about 4 ms).
#[derive(Debug)]
pub struct HandshakeBudget {
    per_second: u32,
    bucket: Mutex<Bucket>,
    sources: Mutex<SourceLimiter>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
    /// Marked when a handshake finds the bucket empty, or the initiations
    /// offered in a second exceed the rate.
    load: LoadMemory,
    /// Initiations with a valid mac1 offered, across tunnels.
    offered: PerSecond,
}

/// The work a full bucket holds, in time at the configured rate.
const BURST_SECONDS: f64 = 0.01;

/// Tokens a full bucket holds at `per_second` (at least one).
fn capacity(per_second: u32) -> f64 {
    (f64::from(per_second) * BURST_SECONDS).max(1.0)
}

impl Bucket {
    /// Pays out the tokens earned at `per_second` since the last call, up to a
    /// full bucket. Tunnels pass their own `now`, read at their last wake-up: a
    /// caller may be behind another. Time only moves forward here, so no stretch
    /// of it is paid out twice.
    fn refill(&mut self, now: Instant, per_second: u32) {
        match self.last {
            Some(last) if now > last => {
                let elapsed = now.duration_since(last).as_secs_f64();
                self.tokens =
                    (self.tokens + elapsed * f64::from(per_second)).min(capacity(per_second));
                self.last = Some(now);
            }
            Some(_) => {}
            None => self.last = Some(now),
        }
    }
}

impl HandshakeBudget {
    /// A full bucket of `per_second` handshakes a second (at least one).
    pub fn new(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        Self {
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: capacity(per_second),
                last: None,
                load: LoadMemory::default(),
                offered: PerSecond::default(),
            }),
            sources: Mutex::new(SourceLimiter::default()),
        }
    }

    /// The configured rate.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Takes one handshake's token at `now`; false if the budget is spent.
    pub fn take(&self, now: Instant) -> bool {
        self.take_if(now, || true)
    }

    /// Takes a token at `now` if there is one and `also` agrees (asked with
    /// the bucket held, and only when there is a token).
    fn take_if(&self, now: Instant, also: impl FnOnce() -> bool) -> bool {
        let Ok(mut b) = self.bucket.lock() else {
            // A panicked holder cannot have left the bucket inconsistent in a
            // way that matters more than refusing work: refuse.
            return false;
        };
        b.refill(now, self.per_second);
        if b.tokens < 1.0 {
            b.load.mark(now);
            return false;
        }
        if !also() {
            return false;
        }
        b.tokens -= 1.0;
        true
    }

    /// Counts an initiation with a valid mac1 at `now`, whether it is answered
    /// with a handshake or a cookie. More in a second than the rate puts the
    /// process under load, as a dry bucket does.
    pub fn offered(&self, now: Instant) {
        let Ok(mut b) = self.bucket.lock() else {
            return;
        };
        if b.offered.add(now) > self.per_second {
            b.load.mark(now);
        }
    }

    /// Under load: one handshake for a proven `source`, from the bucket and
    /// from the source's own share together; false if either refuses, and then
    /// neither is spent (a source's share is not used up by a dry bucket).
    pub fn take_for(&self, source: IpAddr, now: Instant) -> bool {
        // Bucket, then sources: the one order in which both are ever held.
        self.take_if(now, || {
            self.sources
                .lock()
                .is_ok_and(|mut sources| sources.allow(source, now))
        })
    }

    /// True if a handshake at `now` would find the bucket empty, or the bucket
    /// was found empty (or the offered initiations over the rate) less than a
    /// second ago.
    pub fn under_load(&self, now: Instant) -> bool {
        let Ok(mut b) = self.bucket.lock() else {
            return true;
        };
        b.refill(now, self.per_second);
        if b.tokens < 1.0 {
            b.load.mark(now);
            return true;
        }
        b.load.active(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_short_burst_then_the_rate() {
        // 5,000 a second: a bucket of 50 (10 ms of work).
        let budget = HandshakeBudget::new(5_000);
        let t0 = Instant::now();
        let burst = (0..1_000).filter(|_| budget.take(t0)).count();
        assert_eq!(burst, 50);
        // 2 ms later: ten more tokens.
        let t1 = t0 + Duration::from_millis(2);
        assert_eq!((0..1_000).filter(|_| budget.take(t1)).count(), 10);
        // Over five seconds no more than the bucket accumulates.
        let t2 = t1 + Duration::from_secs(5);
        let saved = (0..1_000).filter(|_| budget.take(t2)).count();
        assert_eq!(saved, 50);
        // A caller whose `now` is behind another's is granted nothing extra,
        // and does not make the others' time count twice.
        assert!(!budget.take(t0));
        assert!(!budget.take(t2));
        let t3 = t2 + Duration::from_micros(200);
        assert!(budget.take(t3));
        assert!(!budget.take(t3));
    }

    #[test]
    fn under_load_while_empty_and_for_a_second_after() {
        let budget = HandshakeBudget::new(1_000);
        let t0 = Instant::now();
        assert!(!budget.under_load(t0));
        assert_eq!((0..20).filter(|_| budget.take(t0)).count(), 10);
        assert!(budget.under_load(t0), "empty");
        assert!(!budget.take(t0));
        // Refilled after half a second, but it ran dry recently.
        let t1 = t0 + Duration::from_millis(500);
        assert!(budget.under_load(t1));
        assert!(budget.take(t1), "refilled tokens are still paid out");
        // A second after it last ran dry, and with tokens: calm again.
        let t2 = t0 + Duration::from_millis(1_000);
        assert!(!budget.under_load(t2));
    }

    /// A proven source's share is spent only with a token of the bucket: tries
    /// that meet a dry bucket leave its share whole for when there is one.
    #[test]
    fn a_dry_bucket_spends_no_sources_share() {
        let budget = HandshakeBudget::new(1_000);
        let t0 = Instant::now();
        while budget.take(t0) {}
        let source: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!((0..100).filter(|_| budget.take_for(source, t0)).count(), 0);
        // 50 ms later the bucket has tokens again; the source still has its
        // burst (5), not the one token it would have earned since.
        let t1 = t0 + Duration::from_millis(50);
        let taken = (0..100).filter(|_| budget.take_for(source, t1)).count();
        assert_eq!(taken, crate::core::sources::PER_SOURCE_BURST as usize);
    }

    #[test]
    fn zero_means_one() {
        let budget = HandshakeBudget::new(0);
        assert_eq!(budget.per_second(), 1);
        assert!(budget.take(Instant::now()));
    }
}
