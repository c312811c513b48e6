//! The engine's peer slots: O(1) lookups by key and by receiver index, and the
//! list of active peers that timer work walks.
//!
//! Left out: a peer's own state ([`crate::core::peer`]), which peers exist (`changes`),
//! and lookup by endpoint, a map the engine keeps beside the slots (see `receive`).

use std::collections::HashMap;

use crate::core::peer::Peer;
use crate::core::policy::PeerId;

/// Slot storage for peers with O(1) lookups by key and by receiver index.
#[derive(Default)]
pub(super) struct Peers {
    pub(super) slots: Vec<Option<Peer>>,
    pub(super) free: Vec<PeerId>,
    pub(super) by_key: HashMap<[u8; 32], PeerId>,
    pub(super) by_index: HashMap<u32, PeerId>,
    /// Peers with timer work: a handshake completed or protocol work started
    /// within a session's lifetime, packets waiting, or a keepalive to keep up
    /// (see [`Peer::idle`]). The only ones [`super::TunnelEngine::handle_timers`] visits.
    pub(super) active: Vec<PeerId>,
    /// Removed peers may still be on `active` (see [`Peers::prune_active`]).
    pub(super) stale: bool,
    /// Passes over `active` that removals cost.
    #[cfg(test)]
    pub(super) prunes: usize,
}

impl Peers {
    #[inline]
    pub(super) fn get(&self, id: PeerId) -> Option<&Peer> {
        self.slots.get(id as usize)?.as_ref()
    }
    #[inline]
    pub(super) fn get_mut(&mut self, id: PeerId) -> Option<&mut Peer> {
        self.slots.get_mut(id as usize)?.as_mut()
    }
    /// Room for `n` more peers at once: a tunnel's start-up then allocates each
    /// table once instead of growing it step by step (whose freed steps stay in
    /// the process's memory, about 200 B per peer at 100 peers per tunnel).
    pub(super) fn reserve(&mut self, n: usize) {
        let more = n.saturating_sub(self.free.len());
        self.slots.reserve(more);
        self.by_key.reserve(n);
        self.by_index.reserve(n);
    }
    pub(super) fn insert(&mut self, peer: Peer) -> PeerId {
        // A reused slot must not inherit a removed peer's place on the list.
        self.prune_active();
        let key = *peer.public_key().as_bytes();
        let index = peer.index;
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(peer);
                id
            }
            None => {
                self.slots.push(Some(peer));
                (self.slots.len() - 1) as PeerId
            }
        };
        self.by_key.insert(key, id);
        self.by_index.insert(index, id);
        id
    }
    /// Removes peer `id`. Its place on the active list goes at the next
    /// [`Peers::prune_active`] (before any insert at the latest), so that k
    /// removals cost one pass over the list, not k.
    pub(super) fn remove(&mut self, id: PeerId) -> Option<Peer> {
        let peer = self.slots.get_mut(id as usize)?.take()?;
        self.by_key.remove(peer.public_key().as_bytes());
        self.by_index.remove(&peer.index);
        self.stale |= peer.listed;
        self.free.push(id);
        Some(peer)
    }
    /// Takes removed peers off the active list: one pass, if any is on it.
    pub(super) fn prune_active(&mut self) {
        if std::mem::take(&mut self.stale) {
            let slots = &self.slots;
            self.active
                .retain(|&a| slots.get(a as usize).is_some_and(Option::is_some));
            #[cfg(test)]
            {
                self.prunes += 1;
            }
        }
    }
    /// Gives peer `id` protocol state (if it has none yet) and lists it among
    /// the active peers. Called before a handshake or a packet we send to it.
    #[inline]
    pub(super) fn activate(&mut self, id: PeerId) {
        if let Some(peer) = self.slots.get_mut(id as usize).and_then(Option::as_mut) {
            if !peer.listed {
                peer.start_protocol();
                peer.listed = true;
                self.active.push(id);
            }
        }
    }
    /// Lists peer `id` among the active peers, once a datagram from it
    /// authenticated (its protocol state exists then).
    #[inline]
    pub(super) fn list(&mut self, id: PeerId) {
        if let Some(peer) = self.slots.get_mut(id as usize).and_then(Option::as_mut) {
            if !peer.listed {
                peer.listed = true;
                self.active.push(id);
            }
        }
    }
    pub(super) fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.slots.iter().flatten()
    }
}
