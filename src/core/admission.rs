//! Which handshake initiations a tunnel spends Diffie-Hellman work on.
//!
//! WireGuard's answer to a handshake flood is the cookie: a tunnel under load
//! answers an initiation that carries no valid `mac2` with a cookie reply (one
//! MAC and one XChaCha20-Poly1305 seal, no Diffie-Hellman), and only senders that
//! proved their address by echoing the cookie get a handshake. A tunnel is under
//! load here when either
//! - its own initiations in the current second exceed its limit
//!   (`tunnels.handshakes_per_second`), and for a second after the last time
//!   they did (as kernel WireGuard stays under load for a second), or
//! - the process-wide [`HandshakeBudget`] ran dry, or more initiations with a
//!   valid mac1 arrived across tunnels than it pays for, during the last second:
//!   a storm spread thin over many tunnels then meets cookies on all of them, so
//!   spoofed sources cannot spend the budget that address-proven peers need.
//!
//! An initiation that proved its address but finds the budget spent, or its
//! source's share of it spent ([`super::sources`]), is dropped (`under_load`) and
//! retried by its sender, as when a kernel WireGuard's handshake queue is full
//! or its rate limiter refuses. Every initiation's `mac1` is checked first.
//!
//! Handshake responses pass the same way and count as initiations do: boringtun
//! does two Diffie-Hellman operations on a response before its AEAD check, so
//! while a handshake of ours is in progress, forged responses with a valid mac1
//! would cost as much as initiations (kernel WireGuard admits both alike). A
//! response's cookie reply goes to the responder, whose answer to our next
//! initiation then carries a valid mac2.
//!
//! Left out: the Noise handshake itself (boringtun's `Tunn`, in [`super::peer`]).
//! boringtun's `RateLimiter` does the MAC and cookie cryptography; the load
//! decision is made here, on the time passed in.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::TunnResult;
use boringtun::x25519::PublicKey;

use super::budget::HandshakeBudget;
use super::load::{LoadMemory, PerSecond};
use super::policy::DropReason;

/// Handshake initiations per second a tunnel answers before it demands cookies.
pub const DEFAULT_HANDSHAKES_PER_SECOND: u32 = 1_000;

/// Why an initiation gets no Diffie-Hellman work.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal<'a> {
    /// Under load and no valid cookie: send this cookie reply back, and stop.
    Cookie(&'a [u8]),
    /// Not a valid initiation for this tunnel, or no budget left for it.
    Drop(DropReason),
}

/// One tunnel's admission control for handshake initiations.
pub struct Admission {
    /// Checks `mac1` only (never under load). Also given to the peers' `Tunn`s,
    /// which check every handshake message again.
    macs: Arc<RateLimiter>,
    /// Always under load: checks `mac2` and makes the cookie replies. The one
    /// cookie secret of the tunnel.
    cookies: RateLimiter,
    per_second: u32,
    /// Initiations with a valid mac1, per second.
    seen: PerSecond,
    /// Marked whenever the tunnel is over its limit.
    load: LoadMemory,
    budget: Option<Arc<HandshakeBudget>>,
}

impl Admission {
    /// Admission for the tunnel with this public key, `per_second` initiations a
    /// second before cookies (at least one).
    pub fn new(public: &PublicKey, per_second: u32) -> Self {
        Self {
            macs: Arc::new(RateLimiter::new(public, u64::MAX)),
            cookies: RateLimiter::new(public, 0),
            per_second: per_second.max(1),
            seen: PerSecond::default(),
            load: LoadMemory::default(),
            budget: None,
        }
    }

    /// Shares the process-wide handshake budget.
    pub fn set_budget(&mut self, budget: Arc<HandshakeBudget>) {
        self.budget = Some(budget);
    }

    /// Sets the tunnel's own limit; takes effect at once.
    pub fn set_per_second(&mut self, per_second: u32) {
        self.per_second = per_second.max(1);
    }

    /// The `mac1` checker for the peers' `Tunn`s.
    pub fn macs(&self) -> Arc<RateLimiter> {
        Arc::clone(&self.macs)
    }

    /// Decides on an initiation or a response from `from` at `now`. `Ok` means: do the
    /// handshake (a budget token is taken). A cookie reply is written into `out`.
    pub fn admit<'a>(
        &mut self,
        from: IpAddr,
        datagram: &[u8],
        now: Instant,
        out: &'a mut [u8],
    ) -> Result<(), Refusal<'a>> {
        // The decision writes a cookie into `out` but returns no borrow of it, so
        // every check can use `out`; the one borrow is taken here.
        match self.decide(from, datagram, now, out) {
            Verdict::Pass => Ok(()),
            Verdict::Cookie => Err(cookie(out)),
            Verdict::Drop(reason) => Err(Refusal::Drop(reason)),
        }
    }

    fn decide(&mut self, from: IpAddr, datagram: &[u8], now: Instant, out: &mut [u8]) -> Verdict {
        // Only initiations with a valid mac1 (which needs the tunnel's public
        // key) count towards its load; this one would be over the limit if the
        // window already holds as many as the limit.
        let busy = self.over_limit(now) || self.budget.as_ref().is_some_and(|b| b.under_load(now));
        if busy {
            // One pass over the MACs: mac1, then mac2 (a cookie reply if it fails).
            let mac2 = verify(&self.cookies, from, datagram, out);
            if !matches!(mac2, Verdict::Drop(_)) {
                self.count(now);
            }
            if mac2 != Verdict::Pass {
                return mac2;
            }
            // A proven address, but no more than its fair share of the budget.
            return match &self.budget {
                Some(budget) if !budget.take_for(from, now) => Verdict::Drop(DropReason::UnderLoad),
                _ => Verdict::Pass,
            };
        } else {
            let mac1 = verify(&self.macs, from, datagram, out);
            if mac1 != Verdict::Pass {
                return mac1;
            }
            self.count(now);
        }
        match &self.budget {
            Some(budget) if !budget.take(now) => {
                // The budget ran dry just now: from here on, cookies first.
                match verify(&self.cookies, from, datagram, out) {
                    Verdict::Pass => Verdict::Drop(DropReason::UnderLoad),
                    mac2 => mac2,
                }
            }
            _ => Verdict::Pass,
        }
    }

    /// Whether one more initiation in the current one-second window (which
    /// starts afresh after a second) is over the tunnel's limit, or the tunnel
    /// was over it less than a second ago: a storm keeps meeting cookies when a
    /// new window opens, rather than getting a fresh allowance every second.
    fn over_limit(&mut self, now: Instant) -> bool {
        if self.seen.at(now) >= self.per_second {
            self.load.mark(now);
        }
        self.load.active(now)
    }

    /// Counts one initiation with a valid mac1 in the tunnel's window and in
    /// the process-wide budget's.
    fn count(&mut self, now: Instant) {
        self.seen.add(now);
        if let Some(budget) = &self.budget {
            budget.offered(now);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// A cookie reply of `COOKIE_REPLY_LEN` bytes is at the start of `out`.
    Cookie,
    Drop(DropReason),
}

/// Size of a WireGuard cookie reply message.
const COOKIE_REPLY_LEN: usize = 64;

fn verify(checker: &RateLimiter, from: IpAddr, datagram: &[u8], out: &mut [u8]) -> Verdict {
    match checker.verify_packet(Some(from), datagram, out) {
        Ok(_) => Verdict::Pass,
        Err(TunnResult::WriteToNetwork(reply)) if reply.len() == COOKIE_REPLY_LEN => {
            Verdict::Cookie
        }
        Err(TunnResult::Err(e)) => Verdict::Drop(super::peer::drop_reason(&e)),
        Err(_) => Verdict::Drop(DropReason::HandshakeFailed),
    }
}

fn cookie(out: &[u8]) -> Refusal<'_> {
    match out.get(..COOKIE_REPLY_LEN) {
        Some(reply) => Refusal::Cookie(reply),
        None => Refusal::Drop(super::peer::drop_reason(
            &WireGuardError::DestinationBufferTooSmall,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::Tunn;
    use boringtun::x25519::StaticSecret;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

    struct Client {
        tunn: Tunn,
        buf: Vec<u8>,
    }

    impl Client {
        fn new(server: &PublicKey) -> Self {
            let secret = StaticSecret::random_from_rng(rand_core::OsRng);
            Self {
                tunn: Tunn::new(secret, *server, None, None, 1, None),
                buf: vec![0; 256],
            }
        }

        fn initiation(&mut self) -> Vec<u8> {
            match self.tunn.format_handshake_initiation(&mut self.buf, true) {
                TunnResult::WriteToNetwork(d) => d.to_vec(),
                _ => panic!("no initiation"),
            }
        }

        /// An initiation with one bit of its mac1 flipped.
        fn forged_initiation(&mut self) -> Vec<u8> {
            let mut forged = self.initiation();
            let n = forged.len();
            forged[n - 20] ^= 1;
            forged
        }

        /// Sends an initiation that must meet a cookie reply, and keeps the
        /// cookie for the next ones.
        fn earn_cookie(&mut self, admission: &mut Admission, now: Instant) {
            let initiation = self.initiation();
            let mut reply = [0u8; 256];
            let Err(Refusal::Cookie(reply)) = admission.admit(FROM, &initiation, now, &mut reply)
            else {
                panic!("expected a cookie");
            };
            let mut out = vec![0; 256];
            assert!(matches!(
                self.tunn.decapsulate(Some(FROM), reply, &mut out),
                TunnResult::Done
            ));
        }
    }

    fn server() -> (PublicKey, Instant) {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        (PublicKey::from(&secret), Instant::now())
    }

    fn outcome(admission: &mut Admission, datagram: &[u8], now: Instant) -> Result<(), String> {
        let mut out = [0u8; 256];
        admission
            .admit(FROM, datagram, now, &mut out)
            .map_err(|r| match r {
                Refusal::Cookie(c) => format!("cookie {}", c.len()),
                Refusal::Drop(reason) => format!("drop {}", reason.as_str()),
            })
    }

    #[test]
    fn over_its_limit_a_tunnel_answers_with_cookies_until_the_next_second() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 3);
        let mut client = Client::new(&public);
        for _ in 0..3 {
            assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        }
        let fourth = client.initiation();
        assert_eq!(
            outcome(&mut admission, &fourth, t0),
            Err("cookie 64".into())
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(outcome(&mut admission, &client.initiation(), t1), Ok(()));
    }

    #[test]
    fn a_tunnel_stays_under_load_a_second_after_it_was_last_over_its_limit() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 3);
        let mut client = Client::new(&public);
        for _ in 0..3 {
            assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        }
        let ms = Duration::from_millis;
        // Over the limit late in the window: under load until t0 + 1.9 s.
        let late = t0 + ms(900);
        assert_eq!(
            outcome(&mut admission, &client.initiation(), late),
            Err("cookie 64".into())
        );
        // A new window, but still within that second: cookies.
        assert_eq!(
            outcome(&mut admission, &client.initiation(), t0 + ms(1000)),
            Err("cookie 64".into())
        );
        // A second after it was last over its limit: answered again.
        assert_eq!(
            outcome(&mut admission, &client.initiation(), t0 + ms(1900)),
            Ok(())
        );
    }

    #[test]
    fn a_storm_spread_thin_stays_on_cookies_when_the_budget_could_pay_again() {
        // Two tunnels, each far below its own limit, share a budget of 10 a
        // second (a bucket of one token).
        let (public, t0) = server();
        let budget = Arc::new(HandshakeBudget::new(10));
        let mut tunnels: Vec<Admission> = (0..2)
            .map(|_| {
                let mut a = Admission::new(&public, 1_000);
                a.set_budget(Arc::clone(&budget));
                a
            })
            .collect();
        let mut client = Client::new(&public);
        let ms = Duration::from_millis;
        // 30 initiations over 0.9 s: the one token pays for one handshake, the
        // rest meet cookies and never take a token.
        let passed = (0..30)
            .filter(|&i| {
                let at = t0 + ms(30 * i);
                outcome(&mut tunnels[i as usize % 2], &client.initiation(), at).is_ok()
            })
            .count();
        assert_eq!(passed, 1);
        // 1.5 s in, the bucket has long refilled, but 30 offered in a second is
        // three times the rate: still cookies, on both tunnels.
        for tunnel in &mut tunnels {
            assert_eq!(
                outcome(tunnel, &client.initiation(), t0 + ms(1500)),
                Err("cookie 64".into())
            );
        }
        // A quiet second later the process is calm again.
        assert_eq!(
            outcome(&mut tunnels[0], &client.initiation(), t0 + ms(3000)),
            Ok(())
        );
    }

    #[test]
    fn initiations_with_a_bad_mac1_do_not_count_towards_the_load() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 2);
        let mut client = Client::new(&public);
        let forged = client.forged_initiation();
        for _ in 0..10 {
            assert!(outcome(&mut admission, &forged, t0).is_err());
        }
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        assert_eq!(
            outcome(&mut admission, &client.initiation(), t0),
            Err("cookie 64".into())
        );
    }

    #[test]
    fn a_cookie_holder_passes_under_load() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 1);
        let mut client = Client::new(&public);
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        client.earn_cookie(&mut admission, t0);
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
    }

    #[test]
    fn under_load_one_cookie_holder_gets_only_its_share() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 1);
        admission.set_budget(Arc::new(HandshakeBudget::new(100_000)));
        let mut client = Client::new(&public);
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        client.earn_cookie(&mut admission, t0);
        let results: Vec<_> = (0..20)
            .map(|_| outcome(&mut admission, &client.initiation(), t0))
            .collect();
        let passed = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(passed, crate::core::sources::PER_SOURCE_BURST as usize);
        assert!(results.contains(&Err("drop under_load".into())));
    }

    #[test]
    fn a_bad_mac1_is_dropped_even_when_calm() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 10);
        let mut client = Client::new(&public);
        let forged = client.forged_initiation();
        assert_eq!(
            outcome(&mut admission, &forged, t0),
            Err("drop bad_mac".into())
        );
    }

    #[test]
    fn under_load_a_bad_mac1_gets_no_cookie() {
        // Under load mac1 and mac2 are checked in one pass; mac1 still comes
        // first, so junk never earns a reply.
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 1);
        let mut client = Client::new(&public);
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        let forged = client.forged_initiation();
        assert_eq!(
            outcome(&mut admission, &forged, t0),
            Err("drop bad_mac".into())
        );
        assert_eq!(
            outcome(&mut admission, &client.initiation(), t0),
            Err("cookie 64".into())
        );
    }

    #[test]
    fn a_spent_budget_means_cookies_then_drops_for_cookie_holders() {
        let (public, t0) = server();
        let mut admission = Admission::new(&public, 1_000);
        admission.set_budget(Arc::new(HandshakeBudget::new(1)));
        let mut client = Client::new(&public);
        assert_eq!(outcome(&mut admission, &client.initiation(), t0), Ok(()));
        client.earn_cookie(&mut admission, t0);
        assert_eq!(
            outcome(&mut admission, &client.initiation(), t0),
            Err("drop under_load".into()),
            "proved its address, but there is no budget"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(outcome(&mut admission, &client.initiation(), t1), Ok(()));
    }
}
