//! Longest-prefix-match tables over IPv4 and IPv6 prefixes.
//!
//! One [`PrefixTable`] holds the routes of one tunnel: every prefix maps to one value
//! (a peer). It wraps `prefix-trie` so that callers see `ipnet` types only and one
//! table serves both address families. It performs no I/O and knows nothing about
//! peers or policy; overlap rules (who may own which prefix) belong to the caller.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A longest-prefix-match table from IP prefixes to values.
#[derive(Clone)]
pub struct PrefixTable<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
}

impl<T> Default for PrefixTable<T> {
    fn default() -> Self {
        Self {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
        }
    }
}

impl<T> PrefixTable<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `prefix` (host bits are cleared first), returning the value it replaced.
    pub fn insert(&mut self, prefix: IpNet, value: T) -> Option<T> {
        match prefix.trunc() {
            IpNet::V4(p) => self.v4.insert(p, value),
            IpNet::V6(p) => self.v6.insert(p, value),
        }
    }

    /// Removes exactly `prefix`, returning its value.
    pub fn remove(&mut self, prefix: IpNet) -> Option<T> {
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
        self.lookup_with_prefix(addr).map(|(_, v)| v)
    }

    /// The longest prefix that contains `addr`, with its value.
    #[inline]
    pub fn lookup_with_prefix(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
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

    /// Removes every entry whose value fails `keep`.
    pub fn retain(&mut self, mut keep: impl FnMut(IpNet, &T) -> bool) {
        self.v4.retain(|p, v| keep(IpNet::V4(*p), v));
        self.v6.retain(|p, v| keep(IpNet::V6(*p), v));
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
    fn naive(model: &BTreeMap<IpNet, u32>, addr: IpAddr) -> Option<u32> {
        model
            .iter()
            .filter(|(p, _)| p.contains(&addr))
            .max_by_key(|(p, _)| p.prefix_len())
            .map(|(_, v)| *v)
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(IpNet, u32),
        Remove(IpNet),
    }

    // Addresses are drawn from a small space so that prefixes overlap often.
    fn v4() -> impl Strategy<Value = IpAddr> {
        (0u8..4, any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c)| IpAddr::V4(Ipv4Addr::new(10, a, b & 0x0f, c)))
    }
    fn v6() -> impl Strategy<Value = IpAddr> {
        (0u16..4, any::<u16>())
            .prop_map(|(a, b)| IpAddr::V6(Ipv6Addr::new(0xfd00, a, 0, 0, 0, 0, 0, b & 0xff)))
    }
    fn prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (v4(), 0u8..=32).prop_map(|(a, l)| IpNet::new(a, l).unwrap().trunc()),
            (v6(), 0u8..=128).prop_map(|(a, l)| IpNet::new(a, l).unwrap().trunc()),
        ]
    }
    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (prefix(), any::<u32>()).prop_map(|(p, v)| Op::Insert(p, v)),
            1 => prefix().prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn matches_naive_reference(ops in prop::collection::vec(op(), 0..60),
                                   probes in prop::collection::vec(prop_oneof![v4(), v6()], 1..40)) {
            let mut table = PrefixTable::new();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(p, v) => prop_assert_eq!(table.insert(p, v), model.insert(p, v)),
                    Op::Remove(p) => prop_assert_eq!(table.remove(p), model.remove(&p)),
                }
            }
            prop_assert_eq!(table.len(), model.len());
            for addr in probes {
                prop_assert_eq!(table.lookup(addr).copied(), naive(&model, addr));
            }
        }
    }
}
