//! The control plane's changes to a running tunnel: peers added, updated and
//! removed, host prefixes and sources, egress policies. Sessions survive every
//! change that keeps the peer's key.
//!
//! Left out: deciding the changes and choosing receiver indices, which is the
//! registry's ([`crate::control::registry`]); the engine only refuses a prefix another
//! peer holds and an index out of range or in use.

use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{EgressConfig, EngineError, TunnelEngine};
use crate::core::peer::{canonical_endpoint, Peer, PeerConfig};
use crate::core::policy::{DropReason, Egress, PeerId};
use crate::core::table::PrefixTable;

impl TunnelEngine {
    /// Adds a peer, or updates the prefixes and kind of an existing one without
    /// touching its session (its keepalive is fixed once its protocol state
    /// exists: boringtun has no setter). A new preshared key makes it a new
    /// peer with the same receiver index (its session ends), since every
    /// handshake depends on it. A configured endpoint is where to reach
    /// a peer that has not spoken yet: it never replaces one the peer was
    /// authenticated from. `index` is used only when the peer is new, and must
    /// then be in 1 to 2^24 - 1.
    pub fn upsert_peer(&mut self, config: PeerConfig, mut index: u32) -> Result<(), EngineError> {
        let key = *config.public_key.as_bytes();
        let mut existing = self.peers.by_key.get(&key).copied();
        for prefix in &config.allowed {
            match self.routing.routes.get_exact(*prefix) {
                Some(&owner) if Some(owner) != existing => {
                    return Err(EngineError::PrefixTaken { prefix: *prefix })
                }
                _ => {}
            }
        }
        let new_psk = existing
            .and_then(|id| self.peers.get(id))
            .is_some_and(|p| p.config.preshared_key != config.preshared_key);
        if new_psk {
            // Checked above, so it does come back below, with the same
            // receiver index.
            if let Some(old) = self.unlink_peer(&key) {
                index = old;
            }
            self.peers.prune_active();
            existing = None;
        }
        let id = match existing {
            Some(id) => {
                self.reach_at(id, config.endpoint);
                let Some(peer) = self.peers.get_mut(id) else {
                    return Ok(());
                };
                peer.config.kind = config.kind;
                if peer.config.allowed == config.allowed {
                    return Ok(());
                }
                for old in std::mem::take(&mut peer.config.allowed) {
                    if self.routing.routes.get_exact(old) == Some(&id) {
                        self.routing.routes.remove(old);
                    }
                }
                peer.config.allowed.clone_from(&config.allowed);
                id
            }
            None => {
                if !crate::core::alloc::IndexAllocator::is_valid(index) {
                    return Err(EngineError::BadIndex { index });
                }
                if self.peers.by_index.contains_key(&index) {
                    return Err(EngineError::IndexTaken { index });
                }
                let peer = Peer::new(
                    Arc::clone(&self.secret),
                    config.clone(),
                    index,
                    self.admission.macs(),
                    self.liveness_timeout,
                    Arc::clone(&self.held),
                );
                let id = self.peers.insert(peer);
                self.strangers.welcome(&key);
                self.reach_at(id, config.endpoint);
                id
            }
        };
        for prefix in config.allowed {
            self.routing.routes.insert(prefix, id);
        }
        self.resolve_egress();
        Ok(())
    }

    /// A configured endpoint for peer `id`: where to reach it while it has not
    /// spoken (a peer heard from elsewhere keeps that). A peer kept up by our
    /// keepalive is reached out to now, as after a restart, not when it next
    /// speaks.
    fn reach_at(&mut self, id: PeerId, endpoint: Option<SocketAddr>) {
        let Some(endpoint) = endpoint.map(canonical_endpoint) else {
            return;
        };
        let Some(peer) = self.peers.get_mut(id) else {
            return;
        };
        if peer.endpoint.is_some_and(|heard| heard != endpoint) {
            return;
        }
        peer.endpoint = Some(endpoint);
        self.endpoints.entry(endpoint).or_insert(id);
        if peer.config.keepalive.is_some() {
            self.peers.activate(id);
        }
    }

    /// Removes a peer and its routes; returns its receiver index for reuse.
    pub fn remove_peer(&mut self, key: &[u8; 32]) -> Option<u32> {
        let index = self.unlink_peer(key)?;
        self.peers.prune_active();
        self.resolve_egress();
        Some(index)
    }

    /// [`Self::remove_peer`] but for the active list and the egress policies,
    /// which the caller brings up to date.
    fn unlink_peer(&mut self, key: &[u8; 32]) -> Option<u32> {
        let id = self.peers.by_key.get(key).copied()?;
        let mut peer = self.peers.remove(id)?;
        // What waited for its handshake is lost with it, and counted.
        self.stats.drops[DropReason::PeerRemoved.index()] += u64::from(peer.discard_queue());
        // Whoever was told it connected is told it is gone.
        if peer.connected {
            self.events
                .push_back(super::Event::Disconnected { peer: *key });
        }
        if let Some(endpoint) = peer.endpoint {
            if self.endpoints.get(&endpoint) == Some(&id) {
                self.endpoints.remove(&endpoint);
            }
        }
        for prefix in &peer.config.allowed {
            if self.routing.routes.get_exact(*prefix) == Some(&id) {
                self.routing.routes.remove(*prefix);
            }
        }
        Some(peer.index)
    }

    /// Makes the peer set exactly `peers` (by key): removes the others, upserts these.
    /// Sessions of peers whose key stays are untouched. Returns the receiver indices
    /// of removed peers.
    pub fn sync_peers(&mut self, peers: Vec<(PeerConfig, u32)>) -> Result<Vec<u32>, EngineError> {
        let keep: std::collections::HashSet<[u8; 32]> = peers
            .iter()
            .map(|(c, _)| *c.public_key.as_bytes())
            .collect();
        let gone: Vec<[u8; 32]> = self
            .peers
            .by_key
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        let freed = gone.iter().filter_map(|k| self.unlink_peer(k)).collect();
        self.peers.prune_active();
        self.resolve_egress();
        let new = peers
            .iter()
            .filter(|(c, _)| !self.peers.by_key.contains_key(c.public_key.as_bytes()))
            .count();
        self.peers.reserve(new);
        // First every kept peer gives up the prefixes it no longer has, so that
        // a prefix moving from one kept peer to another is free whichever of
        // them is listed first.
        for (config, _) in &peers {
            let Some(&id) = self.peers.by_key.get(config.public_key.as_bytes()) else {
                continue;
            };
            let Some(peer) = self.peers.get_mut(id) else {
                continue;
            };
            let routes = &mut self.routing.routes;
            peer.config.allowed.retain(|prefix| {
                let kept = config.allowed.contains(prefix);
                if !kept && routes.get_exact(*prefix) == Some(&id) {
                    routes.remove(*prefix);
                }
                kept
            });
        }
        // Every peer that can be added is: one the engine refuses (its prefix
        // is another's) must not take the tenant's other peers down with it.
        let mut refused = None;
        for (config, index) in peers {
            if let Err(e) = self.upsert_peer(config, index) {
                refused.get_or_insert(e);
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(freed),
        }
    }

    /// Replaces the host prefixes (TUN mode).
    pub fn set_host_prefixes(&mut self, prefixes: &[IpNet]) {
        self.routing.host = PrefixTable::new();
        for p in prefixes {
            self.routing.host.insert(*p, ());
        }
    }

    /// TUN mode: the sources the host routes back into this tunnel (the
    /// tenant's subnet). Packets for the host device, to a host prefix or to the
    /// server address, are accepted only from these.
    pub fn set_host_sources(&mut self, sources: &[IpNet]) {
        self.routing.host_sources = PrefixTable::new();
        for p in sources {
            self.routing.host_sources.insert(*p, ());
        }
    }

    /// Replaces the egress policies. A peer that stops being a gateway while
    /// packets wait for its handshake loses them (`gateway_withdrawn`): some
    /// may be clients' packets sent through it, and a client's packet goes
    /// only to a gateway of its policy, at any time.
    pub fn set_egress(&mut self, egress: Vec<EgressConfig>) {
        let before: Vec<PeerId> = self
            .routing
            .egress
            .iter()
            .flat_map(|e| e.gateways.iter().copied())
            .collect();
        self.egress = egress;
        self.resolve_egress();
        for id in before {
            if self.routing.egress.iter().any(|e| e.gateways.contains(&id)) {
                continue;
            }
            if let Some(peer) = self.peers.get_mut(id) {
                self.stats.drops[DropReason::GatewayWithdrawn.index()] +=
                    u64::from(peer.discard_waiting());
            }
        }
    }

    fn resolve_egress(&mut self) {
        self.routing.egress = self
            .egress
            .iter()
            .map(|e| Egress {
                pool: e.pool,
                gateways: e
                    .gateways
                    .iter()
                    .filter_map(|k| self.peers.by_key.get(k).copied())
                    .collect(),
            })
            .collect();
    }
}
