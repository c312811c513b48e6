//! Which addresses and keys a tenant's peers hold, kept beside the tenant.
//!
//! Adding a peer must check its key against every other peer's and find it a
//! free address. Collecting those from every peer on each call made an add
//! O(peers of the tenant); this index answers in O(log n), and remembers per
//! allocation range how far the addresses are densely taken, so the search for
//! the next free one starts there. It holds no data of its own: the registry
//! keeps one per tenant through every change, and builds it again from the
//! tenant (`of`) after an undone one.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use boringtun::x25519::PublicKey;
use ipnet::{IpNet, Ipv4Net};

use super::model::{Id, Tenant};
use crate::core::alloc::{self, AllocError};
use crate::core::peer::PeerKind;

/// Who holds a key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Router(Id),
    Client(Id),
}

/// A tenant's taken peer addresses and keys.
#[derive(Debug, Default)]
pub struct Occupancy {
    addresses: BTreeSet<Ipv4Addr>,
    keys: HashMap<[u8; 32], Holder>,
    /// Per allocation range: every assignable host number below this is taken.
    dense_below: HashMap<Ipv4Net, u32>,
    /// Per client pool: the host number handed out last
    /// ([`Occupancy::next_free_rotating`]).
    last_given: HashMap<Ipv4Net, u32>,
}

impl Occupancy {
    /// The index of `tenant` as it is now.
    pub fn of(tenant: &Tenant) -> Self {
        let mut o = Self::default();
        for r in tenant.routers.values() {
            o.add_router(&r.id, r.vpn_ip, &r.extra_prefixes, &r.public_key);
        }
        for c in tenant.clients.values() {
            o.add_client(&c.id, c.vpn_ip, &c.public_key);
        }
        o
    }

    /// A router holds its address and every single IPv4 address (`/32`) among
    /// its extra prefixes: neither may be handed to another peer.
    pub fn add_router(&mut self, id: &Id, ip: Ipv4Addr, extra: &[IpNet], key: &PublicKey) {
        self.addresses.extend(held(ip, extra));
        self.keys
            .insert(*key.as_bytes(), Holder::Router(id.clone()));
    }

    pub fn add_client(&mut self, id: &Id, ip: Ipv4Addr, key: &PublicKey) {
        self.addresses.insert(ip);
        self.keys
            .insert(*key.as_bytes(), Holder::Client(id.clone()));
    }

    /// Releases a peer's addresses (its own and, for a router, its extra
    /// prefixes') and its key.
    pub fn remove(&mut self, ip: Ipv4Addr, extra: &[IpNet], key: &PublicKey) {
        self.keys.remove(key.as_bytes());
        for ip in held(ip, extra) {
            self.addresses.remove(&ip);
            for (net, dense) in &mut self.dense_below {
                if net.contains(&ip) {
                    let host = u32::from(ip) - u32::from(net.network());
                    *dense = (*dense).min(host);
                }
            }
        }
    }

    /// Who else holds `key` ("router x" / "client y"), ignoring the peer
    /// `except`: a router and a client may share an id, never a key.
    pub fn key_owner(&self, key: &PublicKey, except: Option<(PeerKind, &Id)>) -> Option<String> {
        let (kind, id, what) = match self.keys.get(key.as_bytes())? {
            Holder::Router(id) => (PeerKind::Router, id, "router"),
            Holder::Client(id) => (PeerKind::Client, id, "client"),
        };
        (except != Some((kind, id))).then(|| format!("{what} {id}"))
    }

    /// The peer holding `key`: a router (true) or a client (false), and its id.
    pub fn holder(&self, key: &[u8; 32]) -> Option<(bool, &Id)> {
        match self.keys.get(key)? {
            Holder::Router(id) => Some((true, id)),
            Holder::Client(id) => Some((false, id)),
        }
    }

    /// True when a peer holds `ip`.
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        self.addresses.contains(&ip)
    }

    /// The first free address of `net` from host number `start`, skipping
    /// `reserved` (the server address): like a scan from `start`, but it begins
    /// where the range stops being densely taken.
    pub fn next_free(
        &mut self,
        net: Ipv4Net,
        start: u32,
        reserved: Ipv4Addr,
    ) -> Result<Ipv4Addr, AllocError> {
        let from = self
            .dense_below
            .get(&net)
            .copied()
            .unwrap_or(start)
            .max(start);
        let addresses = &self.addresses;
        let (ip, host) =
            alloc::next_host_where(net, from, |a| a == reserved || addresses.contains(&a))?;
        // Everything below `host` is taken; `ip` itself is about to be.
        self.dense_below.insert(net, host);
        Ok(ip)
    }
}

impl Occupancy {
    /// Takes over where `old`'s rotation through client pools stood (an index
    /// built again after an undone change goes on from there).
    pub fn keep_rotation(&mut self, old: Occupancy) {
        self.last_given = old.last_given;
    }

    /// The first free address of `net` after the one handed out last (after
    /// the highest one held, when none was handed out since the index was
    /// built), wrapping to host number `start` at the range's end, skipping
    /// `reserved`. So a freed address goes to a new peer only once every
    /// other free one has been handed out: what still flows towards the old
    /// peer's address (a gateway's NAT keeps an established TCP flow's state
    /// for a day) reaches nobody for as long as the range allows, as a DHCP
    /// server's iterative allocation does. For client pools, whose phones
    /// come and go; routers keep the dense numbering of [`Self::next_free`].
    pub fn next_free_rotating(
        &mut self,
        net: Ipv4Net,
        start: u32,
        reserved: Ipv4Addr,
    ) -> Result<Ipv4Addr, AllocError> {
        let base = u32::from(net.network());
        let after = match self.last_given.get(&net) {
            Some(&host) => host.saturating_add(1),
            None => self
                .addresses
                .range(net.network()..=net.broadcast())
                .next_back()
                .map_or(start, |highest| u32::from(*highest) - base + 1),
        };
        let addresses = &self.addresses;
        let taken = |a: Ipv4Addr| a == reserved || addresses.contains(&a);
        let (ip, host) = alloc::next_host_where(net, after.max(start), taken)
            .or_else(|_| alloc::next_host_where(net, start, taken))?;
        self.last_given.insert(net, host);
        Ok(ip)
    }
}

/// The addresses a peer holds: `ip` and the single IPv4 addresses in `extra`.
fn held(ip: Ipv4Addr, extra: &[IpNet]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let singles = extra.iter().filter_map(|net| match net {
        IpNet::V4(n) if n.prefix_len() == 32 => Some(n.addr()),
        _ => None,
    });
    std::iter::once(ip).chain(singles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::IpAddr;

    use proptest::prelude::*;

    fn key(n: u8) -> PublicKey {
        PublicKey::from([n; 32])
    }

    proptest! {
        /// Against the plain scan over all used addresses: the same address
        /// every time, through any mix of adds and removals.
        #[test]
        fn next_free_matches_a_full_scan(ops in prop::collection::vec((any::<bool>(), 0u8..60), 1..200)) {
            let net: Ipv4Net = "10.100.0.0/26".parse().unwrap();
            let server = Ipv4Addr::new(10, 100, 0, 1);
            let mut occ = Occupancy::default();
            let mut held: Vec<(Ipv4Addr, PublicKey)> = Vec::new();
            let id = Id::parse("r", "router").unwrap();
            for (n, (add, pick)) in ops.into_iter().enumerate() {
                if add || held.is_empty() {
                    let mut used: HashSet<IpAddr> = held.iter().map(|(a, _)| IpAddr::V4(*a)).collect();
                    used.insert(IpAddr::V4(server));
                    let naive = alloc::next_host_where(net, 2, |a| used.contains(&IpAddr::V4(a))).map(|(a, _)| a);
                    let got = occ.next_free(net, 2, server);
                    prop_assert_eq!(got.as_ref().ok(), naive.as_ref().ok());
                    if let Ok(ip) = got {
                        let k = key(n as u8);
                        occ.add_router(&id, ip, &[], &k);
                        held.push((ip, k));
                    }
                } else {
                    let (ip, k) = held.remove(pick as usize % held.len());
                    occ.remove(ip, &[], &k);
                }
            }
        }
    }

    proptest! {
        /// Against a plain cyclic scan: each address is the first free one
        /// after the last handed out, wrapping at the pool's end, through any
        /// mix of adds and removals; and an error only when none is free.
        #[test]
        fn rotating_allocation_goes_round_the_pool(ops in prop::collection::vec((any::<bool>(), 0u8..60), 1..300)) {
            let net: Ipv4Net = "10.200.0.0/26".parse().unwrap();
            let outside = Ipv4Addr::new(10, 100, 0, 1);
            let mut occ = Occupancy::default();
            let mut held: Vec<(Ipv4Addr, PublicKey)> = Vec::new();
            let mut last: Option<u32> = None;
            let id = Id::parse("c", "client").unwrap();
            for (n, (add, pick)) in ops.into_iter().enumerate() {
                if add || held.is_empty() {
                    let free = |h: u32| {
                        let a = Ipv4Addr::from(u32::from(net.network()) + h);
                        !held.iter().any(|(b, _)| *b == a)
                    };
                    // Host numbers 2..63 (the network, .1 and the broadcast are never handed out).
                    let from = last.map_or(2, |l| l + 1);
                    let naive = (from..63).chain(2..from.min(63)).find(|&h| free(h));
                    let got = occ.next_free_rotating(net, 2, outside);
                    let got_host = got.as_ref().ok().map(|a| u32::from(*a) - u32::from(net.network()));
                    prop_assert_eq!(got_host, naive);
                    if let Ok(ip) = got {
                        let k = key(n as u8);
                        occ.add_client(&id, ip, &k);
                        held.push((ip, k));
                        last = got_host;
                    }
                } else {
                    let (ip, k) = held.remove(pick as usize % held.len());
                    occ.remove(ip, &[], &k);
                }
            }
        }
    }

    /// An index built anew (a restart, an undone change) goes on after the
    /// highest address held, not from the pool's start.
    #[test]
    fn a_new_index_rotates_on_from_the_highest_address_held() {
        let net: Ipv4Net = "10.200.0.0/24".parse().unwrap();
        let outside = Ipv4Addr::new(10, 100, 0, 1);
        let c = Id::parse("c1", "client").unwrap();
        let mut occ = Occupancy::default();
        occ.add_client(&c, Ipv4Addr::new(10, 200, 0, 7), &key(1));
        assert_eq!(
            occ.next_free_rotating(net, 2, outside),
            Ok(Ipv4Addr::new(10, 200, 0, 8))
        );
        let mut empty = Occupancy::default();
        assert_eq!(
            empty.next_free_rotating(net, 2, outside),
            Ok(Ipv4Addr::new(10, 200, 0, 2))
        );
    }

    #[test]
    fn keys_name_their_holder() {
        let (r, c) = (
            Id::parse("r1", "router").unwrap(),
            Id::parse("c1", "client").unwrap(),
        );
        let mut occ = Occupancy::default();
        occ.add_router(&r, Ipv4Addr::new(10, 0, 1, 1), &[], &key(1));
        occ.add_client(&c, Ipv4Addr::new(10, 200, 0, 2), &key(2));
        assert_eq!(occ.key_owner(&key(1), None).as_deref(), Some("router r1"));
        assert_eq!(occ.key_owner(&key(1), Some((PeerKind::Router, &r))), None);
        assert_eq!(
            occ.key_owner(&key(2), Some((PeerKind::Router, &r)))
                .as_deref(),
            Some("client c1")
        );
        // A client that shares the router's id is another peer.
        assert_eq!(
            occ.key_owner(&key(1), Some((PeerKind::Client, &r)))
                .as_deref(),
            Some("router r1")
        );
        assert!(occ.holds(Ipv4Addr::new(10, 0, 1, 1)));
        occ.remove(Ipv4Addr::new(10, 0, 1, 1), &[], &key(1));
        assert!(!occ.holds(Ipv4Addr::new(10, 0, 1, 1)));
        assert_eq!(occ.key_owner(&key(1), None), None);
    }

    #[test]
    fn a_routers_single_extra_addresses_are_held_and_released_with_it() {
        let net: Ipv4Net = "10.100.0.0/16".parse().unwrap();
        let server = Ipv4Addr::new(10, 100, 0, 1);
        let r = Id::parse("r1", "router").unwrap();
        let extra: Vec<IpNet> = vec![
            "10.100.1.2/32".parse().unwrap(),
            "192.168.88.0/24".parse().unwrap(),
            "fd00::1/128".parse().unwrap(),
        ];
        let mut occ = Occupancy::default();
        occ.add_router(&r, Ipv4Addr::new(10, 100, 1, 1), &extra, &key(1));
        assert!(occ.holds(Ipv4Addr::new(10, 100, 1, 2)));
        assert!(!occ.holds(Ipv4Addr::new(192, 168, 88, 0)));
        // The next router skips the address r1 routes.
        let start = alloc::router_range_start(net);
        assert_eq!(
            occ.next_free(net, start, server),
            Ok(Ipv4Addr::new(10, 100, 1, 3))
        );
        occ.remove(Ipv4Addr::new(10, 100, 1, 1), &extra, &key(1));
        assert!(!occ.holds(Ipv4Addr::new(10, 100, 1, 2)));
        assert_eq!(
            occ.next_free(net, start, server),
            Ok(Ipv4Addr::new(10, 100, 1, 1))
        );
    }
}
