//! Handshake initiations wait until the data of their wake-up has been sent.
//!
//! A tunnel reads a batch of datagrams per wake-up and sends what they produce
//! together. A data packet costs the engine about 1.5 µs; an initiation costs a
//! Diffie-Hellman handshake (about 140 µs) or, once the tunnel is under load, a
//! cookie reply. Handled in arrival order, a few initiations in a batch hold every
//! data packet behind them until the whole batch is done. So initiations are set
//! aside while the batch is read, the data's datagrams leave, the task lets the
//! other tunnels that are ready run, and only then are the initiations handled, a
//! turn at a time ([`Deferred::release_in_turns`]). Between two turns the other
//! tunnels run, and then the tunnel reads its own socket again, so that data which
//! arrived meanwhile is forwarded before the next turn and its initiations join
//! the queue. As kernel WireGuard keeps handshakes on a queue of their own, off
//! the data path, a flow waits behind one turn of handshakes at most (the caller
//! ends a turn after one Diffie-Hellman handshake, or after about fifty cookie
//! replies), whether the storm is on another tunnel or on its own.
//!
//! That needs turns of different tunnels kept apart, too. A task that yields
//! runs again only after tokio has polled its IO driver, which is where a flow's
//! packet wakes its tunnel; but the driver is polled only once no other task is
//! ready. With ten tunnels holding initiations, all ten are ready at once and
//! would take their turns back to back before the flow's tunnel is even woken
//! (measured: the flow's p99 1.3 ms with a storm of address-proven handshakes
//! over ten tunnels, 0.7 ms over one). So a tunnel takes its turn only if no
//! other tunnel's turn ended on its thread while it waited; if one did, it yields
//! once more, and the driver is polled in between.
//!
//! Reordering them is safe: data in a batch never belongs to a session that an
//! initiation in the same batch starts, because the initiator sends data only
//! after it has our response, which the initiation has not produced yet.
//! Responses and cookie replies answer this side's own initiations, which are
//! rare (a response costs a Diffie-Hellman, a cookie reply almost nothing); they
//! are not held.
//!
//! Left out: reading. The storm's datagrams are read (and the reading paid for)
//! in the tunnel's turn; the store holds two receive batches, and once it is full
//! the tunnel stops reading between turns, so a wake-up ends after a bounded
//! number of turns and the rest waits in the socket. Initiations that find it
//! full all the same (GRO trains carry up to 64 in one slot) are the caller's
//! to drop ([`Hold::Full`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::core::peer::Path;

/// Size of a WireGuard handshake initiation.
const INITIATION_LEN: usize = 148;

/// Message type 1 (little-endian) and its three reserved zero bytes.
const INITIATION_TYPE: [u8; 4] = [1, 0, 0, 0];

/// What [`Deferred::release_in_turns`] hands its caller, in this order: `Pause`,
/// the other tasks' turn, `Resume`, `Initiation`s until the caller ends the turn,
/// and again until none is held.
pub(crate) enum Step<'a> {
    /// The task is about to let the others run: send what the last turn produced.
    Pause,
    /// The task runs again: read the clock again, and handle what arrived in the
    /// meantime before the next turn, holding its initiations in the store given
    /// here (behind the older ones) while [`Deferred::room`] allows. Comes more
    /// than once before a turn when another tunnel's turn came first.
    Resume(&'a mut Deferred),
    /// The next held initiation and where it came from (and to), oldest first.
    /// The caller answers whether the turn goes on.
    Initiation(Path, &'a [u8]),
}

/// What [`Deferred::hold`] did with a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// An initiation, held for a later turn.
    Held,
    /// An initiation, but the store is full: the caller drops it (handled now,
    /// a storm's GRO trains would put thousands of them in one wake-up).
    Full,
    /// Not an initiation: the caller's to handle now.
    Other,
}

/// Numbers turns and stores across the process, so that no two are the same.
static SEQUENCE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The last turn that ended on this thread: its number and its store's.
    static LAST_TURN: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// A tunnel's initiations held back during one wake-up. Its storage is allocated
/// when the first initiation comes (tunnels that never see one pay nothing) and
/// never grows.
pub(crate) struct Deferred {
    held: Vec<(Path, [u8; INITIATION_LEN])>,
    /// How many of `held` were handed out already.
    released: usize,
    limit: usize,
    /// Which store this is, for [`LAST_TURN`].
    id: u64,
}

impl Deferred {
    /// Room for `limit` initiations (one receive batch).
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            held: Vec::new(),
            released: 0,
            limit,
            id: SEQUENCE.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Holds `datagram` back if it is a handshake initiation and there is room.
    #[inline]
    pub(crate) fn hold(&mut self, from: Path, datagram: &[u8]) -> Hold {
        let Ok(bytes) = <[u8; INITIATION_LEN]>::try_from(datagram) else {
            return Hold::Other;
        };
        if bytes[..4] != INITIATION_TYPE {
            return Hold::Other;
        }
        if self.held.len() >= self.limit {
            return Hold::Full;
        }
        if self.held.capacity() == 0 {
            self.held.reserve_exact(self.limit);
        }
        self.held.push((from, bytes));
        Hold::Held
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.released == self.held.len()
    }

    /// How many more initiations can be held before the store is drained.
    pub(crate) fn room(&self) -> usize {
        self.limit - self.held.len()
    }

    /// Hands every held initiation to `handle`, in arrival order, and forgets them.
    #[cfg(test)]
    pub(crate) fn release(&mut self, mut handle: impl FnMut(Path, &[u8])) {
        while let Some((from, datagram)) = self.next() {
            handle(from, &datagram);
        }
    }

    /// Hands every held initiation to `step`, a turn at a time, and lets the other
    /// tasks run before each turn: they wait behind one turn of handshakes at
    /// most, never behind a whole batch, and never behind the turns of several
    /// tunnels in a row. A turn lasts until `step` answers an `Initiation` with
    /// false (each turn handles one at least). Before each turn the caller may
    /// read on ([`Step::Resume`]); that ends once the store is full, so this
    /// returns after at most `limit` turns.
    pub(crate) async fn release_in_turns(&mut self, mut step: impl FnMut(Step<'_>) -> bool) {
        while !self.is_empty() {
            step(Step::Pause);
            // A yielded task runs again only after tokio has polled its IO driver,
            // and the tasks that poll wakes run first. But if another tunnel's
            // turn ended on this thread while this one waited (or this task came
            // back on another thread), the poll may have come before that turn
            // ended: then yield once more. The data read meanwhile goes first.
            loop {
                let before = LAST_TURN.get();
                tokio::task::yield_now().await;
                step(Step::Resume(self));
                let last = LAST_TURN.get();
                if last == before || last.1 == self.id {
                    break;
                }
            }
            // The store is not empty here (reading only adds): a turn always
            // handles one initiation at least.
            while let Some((from, datagram)) = self.next() {
                if !step(Step::Initiation(from, &datagram)) {
                    break;
                }
            }
            let turn = SEQUENCE.fetch_add(1, Ordering::Relaxed);
            LAST_TURN.set((turn, self.id));
        }
    }

    /// The oldest initiation not handed out yet; the storage is reset (keeping its
    /// capacity) once all have been.
    fn next(&mut self) -> Option<(Path, [u8; INITIATION_LEN])> {
        let next = self.held.get(self.released).copied();
        if next.is_some() {
            self.released += 1;
        }
        if self.is_empty() {
            self.held.clear();
            self.released = 0;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::{Deferred, Hold, Path, INITIATION_LEN};

    fn initiation(tag: u8) -> Vec<u8> {
        let mut d = vec![tag; INITIATION_LEN];
        d[..4].copy_from_slice(&[1, 0, 0, 0]);
        d
    }

    #[test]
    fn only_initiations_are_held_and_they_come_back_in_order() {
        let from = Path {
            remote: "127.0.0.1:9".parse().expect("address"),
            local: None,
        };
        let mut deferred = Deferred::new(4);
        // Data, a response, a cookie reply, a short or long type 1: handled now.
        let mut data = vec![0u8; INITIATION_LEN];
        data[0] = 4;
        assert_eq!(deferred.hold(from, &data), Hold::Other);
        assert_eq!(deferred.hold(from, &[2, 0, 0, 0, 9, 9]), Hold::Other);
        assert_eq!(deferred.hold(from, &[3, 0, 0, 0, 9, 9]), Hold::Other);
        assert_eq!(
            deferred.hold(from, &initiation(7)[..INITIATION_LEN - 1]),
            Hold::Other
        );
        let mut long = initiation(7);
        long.push(0);
        assert_eq!(deferred.hold(from, &long), Hold::Other);
        let mut reserved = initiation(7);
        reserved[1] = 1;
        assert_eq!(deferred.hold(from, &reserved), Hold::Other);
        assert!(deferred.is_empty());

        assert_eq!(deferred.hold(from, &initiation(1)), Hold::Held);
        assert_eq!(deferred.hold(from, &initiation(2)), Hold::Held);
        // Beyond the store's room an initiation is refused as such.
        assert_eq!(deferred.hold(from, &initiation(3)), Hold::Held);
        assert_eq!(deferred.hold(from, &initiation(4)), Hold::Held);
        assert_eq!(deferred.hold(from, &initiation(5)), Hold::Full);
        assert_eq!(deferred.hold(from, &data), Hold::Other);
        let mut seen = Vec::new();
        deferred.release(|at, d| seen.push((at, d[4])));
        assert_eq!(seen, vec![(from, 1), (from, 2), (from, 3), (from, 4)]);
        assert!(deferred.is_empty());
    }

    /// Between turns the other tasks run: a task that yields in a loop gets a
    /// turn whenever the caller ends one, and the initiations keep their order.
    #[tokio::test(flavor = "current_thread")]
    async fn other_tasks_run_between_turns() {
        use super::Step;
        use std::sync::{Arc, Mutex};
        let from = Path {
            remote: "127.0.0.1:9".parse().expect("address"),
            local: None,
        };
        let mut deferred = Deferred::new(64);
        for tag in 0..20 {
            assert_eq!(deferred.hold(from, &initiation(tag)), Hold::Held);
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        let other = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for _ in 0..10 {
                    log.lock().expect("log").push(None);
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut in_turn = 0;
        deferred
            .release_in_turns(|step| match step {
                Step::Initiation(_, d) => {
                    log.lock().expect("log").push(Some(d[4]));
                    in_turn += 1;
                    in_turn < 8
                }
                Step::Resume(_) => {
                    in_turn = 0;
                    true
                }
                Step::Pause => true,
            })
            .await;
        other.await.expect("other task");
        let log = log.lock().expect("log").clone();
        let handled: Vec<u8> = log.iter().flatten().copied().collect();
        assert_eq!(handled, (0..20).collect::<Vec<u8>>(), "all, in order");
        let longest = log
            .split(Option::is_none)
            .map(<[Option<u8>]>::len)
            .max()
            .unwrap_or(0);
        assert_eq!(longest, 8, "the other task ran between turns: {log:?}");
        assert!(deferred.is_empty());
    }

    /// Initiations read between turns queue behind the held ones, only while
    /// there is room; a turn that ends at once still handles one; and the store
    /// is reused afterwards.
    #[tokio::test(flavor = "current_thread")]
    async fn initiations_read_between_turns_queue_behind_and_the_store_bounds_them() {
        use super::Step;
        let from = Path {
            remote: "127.0.0.1:9".parse().expect("address"),
            local: None,
        };
        let mut deferred = Deferred::new(4);
        assert_eq!(
            deferred.held.capacity(),
            0,
            "nothing until an initiation comes"
        );
        assert_eq!(deferred.hold(from, &initiation(1)), Hold::Held);
        assert_eq!(deferred.hold(from, &initiation(2)), Hold::Held);
        let mut next = 3;
        let mut handled = Vec::new();
        let mut resumed = 0;
        deferred
            .release_in_turns(|step| match step {
                Step::Resume(store) => {
                    resumed += 1;
                    // A reader that finds one initiation waiting each time.
                    if store.room() > 0 {
                        assert_eq!(store.hold(from, &initiation(next)), Hold::Held);
                        next += 1;
                    } else {
                        assert_eq!(store.hold(from, &initiation(99)), Hold::Full, "full");
                    }
                    true
                }
                Step::Initiation(_, d) => {
                    handled.push(d[4]);
                    false
                }
                Step::Pause => true,
            })
            .await;
        assert_eq!(handled, vec![1, 2, 3, 4], "oldest first, one per turn");
        assert_eq!(resumed, 4, "one turn each, and reading stopped when full");
        assert!(deferred.is_empty());
        let capacity = deferred.held.capacity();
        assert_eq!(deferred.room(), 4, "drained");
        assert_eq!(deferred.hold(from, &initiation(5)), Hold::Held);
        let mut count = 0;
        deferred.release(|_, _| count += 1);
        assert_eq!(count, 1);
        assert_eq!(deferred.held.capacity(), capacity, "storage is reused");
    }

    /// Two tunnels hold initiations; a packet for a third task arrives during
    /// the first turn, whichever tunnel takes it. That task runs before the next
    /// turn of either tunnel: turns of different tunnels are never back to back.
    #[tokio::test(flavor = "current_thread")]
    async fn a_packet_that_comes_during_one_tunnels_turn_goes_before_the_next_turn() {
        use super::Step;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::new()));
        let flow = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let to = flow.local_addr().expect("address");
        let sender = Arc::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"));
        let sent = Arc::new(AtomicBool::new(false));
        let reader = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut buf = [0u8; 8];
                flow.recv(&mut buf).await.expect("recv");
                log.lock().expect("log").push("flow");
            })
        };
        let tunnel = |name: &'static str| {
            let (log, sender, sent) = (Arc::clone(&log), Arc::clone(&sender), Arc::clone(&sent));
            tokio::spawn(async move {
                let from = Path {
                    remote: "127.0.0.1:9".parse().expect("address"),
                    local: None,
                };
                let mut deferred = Deferred::new(4);
                assert_eq!(deferred.hold(from, &initiation(1)), Hold::Held);
                assert_eq!(deferred.hold(from, &initiation(2)), Hold::Held);
                deferred
                    .release_in_turns(|step| {
                        if let Step::Initiation(..) = step {
                            log.lock().expect("log").push(name);
                            // The flow's packet arrives during the first turn.
                            if !sent.swap(true, Ordering::Relaxed) {
                                sender.send_to(b"data", to).expect("send");
                            }
                            return false;
                        }
                        true
                    })
                    .await;
            })
        };
        let a = tunnel("a");
        let b = tunnel("b");
        a.await.expect("tunnel a");
        b.await.expect("tunnel b");
        reader.await.expect("flow");
        let log = log.lock().expect("log").clone();
        assert_eq!(log.len(), 5, "{log:?}");
        assert_eq!(log[1], "flow", "the flow waited for another turn: {log:?}");
    }
}
