//! Longest-prefix-match tables over IPv4 and IPv6 prefixes.
//!
//! One [`PrefixTable`] holds the routes of one tunnel: every prefix maps to one value
//! (a peer). It wraps `prefix-trie` so that callers see `ipnet` types only and one
//! table serves both address families. Host routes (/32, /128: a router's or a
//! phone's address) are also kept in a hash index by address: a host route is
//! always the longest match, and most packets' lookups end at one, so one hash
//! probe answers them instead of a walk down the trie. It performs no I/O and
//! knows nothing about peers or policy; overlap rules (who may own which prefix)
//! belong to the caller.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A longest-prefix-match table from IP prefixes to values.
#[derive(Clone)]
pub struct PrefixTable<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
    /// The host routes of `v4` and `v6` again, by address. Keyed by addresses
    /// the operator configured; the hasher is seeded per process.
    hosts: HashMap<IpAddr, T, foldhash::fast::RandomState>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
            hosts: HashMap::default(),
        }
    }
}

/// The address of a host route (/32 or /128), else None.
fn host(prefix: IpNet) -> Option<IpAddr> {
    (prefix.prefix_len() == prefix.max_prefix_len()).then(|| prefix.addr())
}

impl<T: Clone> PrefixTable<T> {
    /// Inserts `prefix` (host bits are cleared first), returning the value it replaced.
    pub fn insert(&mut self, prefix: IpNet, value: T) -> Option<T> {
        if let Some(addr) = host(prefix) {
            self.hosts.insert(addr, value.clone());
        }
        match prefix.trunc() {
            IpNet::V4(p) => self.v4.insert(p, value),
            IpNet::V6(p) => self.v6.insert(p, value),
        }
    }

    /// Removes every entry whose value fails `keep` (asked once per entry).
    pub fn retain(&mut self, mut keep: impl FnMut(IpNet, &T) -> bool) {
        let hosts = &mut self.hosts;
        let mut check = |p: IpNet, v: &T| {
            let kept = keep(p, v);
            if !kept {
                if let Some(addr) = host(p) {
                    hosts.remove(&addr);
                }
            }
            kept
        };
        self.v4.retain(|p, v| check(IpNet::V4(*p), v));
        self.v6.retain(|p, v| check(IpNet::V6(*p), v));
    }
}

impl<T> PrefixTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes exactly `prefix`, returning its value.
    pub fn remove(&mut self, prefix: IpNet) -> Option<T> {
        if let Some(addr) = host(prefix) {
            self.hosts.remove(&addr);
        }
        match prefix.trunc() {
            IpNet::V4(p) => self.v4.remove(&p),
            IpNet::V6(p) => self.v6.remove(&p),
        }
    }

    /// The value stored for exactly `prefix`.
    pub fn get_exact(&self, prefix: IpNet) -> Option<&T> {
        match prefix.trunc() {
            IpNet::V4(p) => self.v4.get(&p),
            IpNet::V6(p) => self.v6.get(&p),
        }
    }

    /// The value of the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        if let Some(value) = self.hosts.get(&addr) {
            return Some(value);
        }
        self.trie_lookup(addr).map(|(_, v)| v)
    }

    /// The longest prefix that contains `addr`, with its value.
    #[inline]
    pub fn lookup_with_prefix(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
        if let Some(value) = self.hosts.get(&addr) {
            return Some((IpNet::from(addr), value));
        }
        self.trie_lookup(addr)
    }

    /// The longest match in the tries alone.
    #[inline]
    fn trie_lookup(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
        match addr {
            IpAddr::V4(a) => self
                .v4
                .get_lpm(&Ipv4Net::from(a))
                .map(|(p, v)| (IpNet::V4(p), v)),
            IpAddr::V6(a) => self
                .v6
                .get_lpm(&Ipv6Net::from(a))
                .map(|(p, v)| (IpNet::V6(p), v)),
        }
    }

    /// All entries, IPv4 first, each family in prefix order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        self.v4
            .iter()
            .map(|(p, v)| (IpNet::V4(p), v))
            .chain(self.v6.iter().map(|(p, v)| (IpNet::V6(p), v)))
    }

    /// Number of prefixes stored.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// True when no prefix is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = PrefixTable::new();
        t.insert(net("10.100.0.0/16"), 1);
        t.insert(net("10.100.1.1/32"), 2);
        t.insert(net("0.0.0.0/0"), 3);
        assert_eq!(t.lookup("10.100.1.1".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("10.100.1.2".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("::1".parse().unwrap()), None);
        assert_eq!(t.remove(net("0.0.0.0/0")), Some(3));
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), None);
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut t = PrefixTable::new();
        t.insert(net("10.100.7.9/16"), 1);
        assert_eq!(t.get_exact(net("10.100.0.0/16")), Some(&1));
        assert_eq!(t.remove(net("10.100.3.3/16")), Some(1));
        assert!(t.is_empty());
    }

    /// The reference: scan every prefix, keep the longest that contains the address.
    fn naive(model: &BTreeMap<IpNet, u32>, addr: IpAddr) -> Option<(IpNet, u32)> {
        model
            .iter()
            .filter(|(p, _)| p.contains(&addr))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(p, v)| (*p, *v))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(IpNet, u32),
        Remove(IpNet),
        /// Remove the stored prefix at this position (modulo their number).
        RemoveStored(usize),
        /// Keep the entries whose value is not this one modulo 3.
        Retain(u32),
    }

    // Addresses are drawn from a small space so that prefixes overlap often and
    // probes hit host routes.
    fn v4() -> impl Strategy<Value = IpAddr> {
        (0u8..2, any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c)| IpAddr::V4(Ipv4Addr::new(10, a, b & 0x03, c & 0x1f)))
    }
    fn v6() -> impl Strategy<Value = IpAddr> {
        (0u16..2, any::<u16>())
            .prop_map(|(a, b)| IpAddr::V6(Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, 0, b & 0x3f)))
    }
    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            2 => (v4(), 0u8..=32).prop_map(|(a, l)| IpNet::new(a, l).unwrap().trunc()),
            1 => (v6(), 0u8..=128).prop_map(|(a, l)| IpNet::new(a, l).unwrap().trunc()),
            // Host routes, as most peers have.
            2 => v4().prop_map(IpNet::from),
            1 => v6().prop_map(IpNet::from),
        ]
    }
    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (prefix(), any::<u32>()).prop_map(|(p, v)| Op::Insert(p, v)),
            1 => prefix().prop_map(Op::Remove),
            2 => any::<usize>().prop_map(Op::RemoveStored),
            1 => any::<u32>().prop_map(Op::Retain),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_reference(ops in prop::collection::vec(op(), 0..80),
                                   probes in prop::collection::vec(prop_oneof![v4(), v6()], 1..60)) {
            let mut table = PrefixTable::new();
            let mut model = BTreeMap::new();
            // Every prefix's own address is probed too: stale host entries show there.
            let mut probes = probes;
            for op in ops {
                match op {
                    Op::Insert(p, v) => {
                        probes.push(p.addr());
                        prop_assert_eq!(table.insert(p, v), model.insert(p, v));
                    }
                    Op::Remove(p) => prop_assert_eq!(table.remove(p), model.remove(&p)),
                    Op::RemoveStored(i) => {
                        if let Some(p) = model.keys().nth(i % model.len().max(1)).copied() {
                            prop_assert_eq!(table.remove(p), model.remove(&p));
                        }
                    }
                    Op::Retain(r) => {
                        let mut asked = 0;
                        table.retain(|_, v| {
                            asked += 1;
                            v % 3 != r % 3
                        });
                        prop_assert_eq!(asked, model.len(), "each entry asked once");
                        model.retain(|_, v| *v % 3 != r % 3);
                    }
                }
            }
            prop_assert_eq!(table.len(), model.len());
            for addr in probes {
                let expected = naive(&model, addr);
                prop_assert_eq!(table.lookup(addr).copied(), expected.map(|(_, v)| v));
                prop_assert_eq!(
                    table.lookup_with_prefix(addr).map(|(p, v)| (p, *v)),
                    expected
                );
            }
        }
    }
}
