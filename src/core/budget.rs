//! The process-wide budget for handshake work.
//!
//! Each tunnel's rate limiter answers with cookie replies above its own load,
//! but a storm spread over many tunnels can still eat every core with
//! Diffie-Hellman work (about 150 µs per handshake) and starve established
//! flows. This token bucket, shared by all tunnels, caps the handshakes the
//! process computes per second; initiations beyond it are dropped and counted
//! (`under_load`) before any expensive work, and their senders retry, as they do
//! when a kernel WireGuard's handshake queue overflows.
//!
//! Time is passed in; nothing here reads a clock.

use std::sync::Mutex;
use std::time::Instant;

/// A token bucket of handshakes: `per_second` tokens a second, at most one
/// second's worth saved up (a restart's reconnect wave gets a full second).
#[derive(Debug)]
pub struct HandshakeBudget {
    per_second: u32,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Option<Instant>,
}

impl HandshakeBudget {
    /// A full bucket of `per_second` handshakes a second (at least one).
    pub fn new(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        Self {
            per_second,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(per_second),
                last: None,
            }),
        }
    }

    /// The configured rate.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Takes one handshake's token at `now`; false if the budget is spent.
    pub fn take(&self, now: Instant) -> bool {
        let Ok(mut b) = self.bucket.lock() else {
            // A panicked holder cannot have left the bucket inconsistent in a
            // way that matters more than refusing work: refuse.
            return false;
        };
        let rate = f64::from(self.per_second);
        // Tunnels pass their own `now`, read at their last wake-up: a caller may
        // be behind another. Time only moves forward here, so no stretch of it is
        // paid out twice.
        match b.last {
            Some(last) if now > last => {
                let elapsed = now.duration_since(last).as_secs_f64();
                b.tokens = (b.tokens + elapsed * rate).min(rate);
                b.last = Some(now);
            }
            Some(_) => {}
            None => b.last = Some(now),
        }
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_second_of_burst_then_the_rate() {
        let budget = HandshakeBudget::new(100);
        let t0 = Instant::now();
        let burst = (0..1_000).filter(|_| budget.take(t0)).count();
        assert_eq!(burst, 100);
        // 10 ms later: one more token.
        let t1 = t0 + Duration::from_millis(10);
        assert!(budget.take(t1));
        assert!(!budget.take(t1));
        // Over five seconds at most a second's worth accumulates.
        let t2 = t1 + Duration::from_secs(5);
        let saved = (0..1_000).filter(|_| budget.take(t2)).count();
        assert_eq!(saved, 100);
        // A caller whose `now` is behind another's is granted nothing extra,
        // and does not make the others' time count twice.
        assert!(!budget.take(t0));
        assert!(!budget.take(t2));
        let t3 = t2 + Duration::from_millis(10);
        assert!(budget.take(t3));
        assert!(!budget.take(t3));
    }

    #[test]
    fn zero_means_one() {
        let budget = HandshakeBudget::new(0);
        assert_eq!(budget.per_second(), 1);
        assert!(budget.take(Instant::now()));
    }
}
