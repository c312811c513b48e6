//! Allocation of listen ports, tenant subnets, peer addresses and receiver indices.
//!
//! Every allocator is a pure function of what is already taken, so the control plane
//! can call it under its own lock and the same inputs always give the same answer.
//! Nothing here remembers anything; persistence and locking are the caller's.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};

/// Why an allocation found nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every port of the range is taken.
    #[error("no free listen port in {first}-{last}")]
    PortsExhausted { first: u16, last: u16 },
    /// Every subnet of the supernet is taken or overlaps a pool.
    #[error("no free /{prefix_len} left in {supernet}")]
    SubnetsExhausted { supernet: Ipv4Net, prefix_len: u8 },
    /// The prefix length cannot carve the supernet.
    #[error("cannot carve /{prefix_len} subnets out of {supernet}")]
    BadPrefixLength { supernet: Ipv4Net, prefix_len: u8 },
    /// Every host address of the range is taken.
    #[error("no free address left in {range}")]
    AddressesExhausted { range: IpNet },
    /// All 2^24 receiver indices are in use.
    #[error("no free receiver index")]
    IndicesExhausted,
}

/// The first port of `first..=last` that is not in `used`.
pub fn next_port(first: u16, last: u16, used: &BTreeSet<u16>) -> Result<u16, AllocError> {
    (first..=last)
        .find(|p| !used.contains(p))
        .ok_or(AllocError::PortsExhausted { first, last })
}

/// The first `/prefix_len` of `supernet`, at or after the one holding `start` and
/// then wrapping around, that overlaps none of `taken`.
///
/// O((candidates + taken) log taken): the taken ranges are sorted once and each
/// candidate is checked by binary search, so a thousand tenants stay cheap.
pub fn next_subnet(
    supernet: Ipv4Net,
    prefix_len: u8,
    start: Ipv4Addr,
    taken: &[IpNet],
) -> Result<Ipv4Net, AllocError> {
    let subnets = supernet
        .subnets(prefix_len)
        .map_err(|_| AllocError::BadPrefixLength {
            supernet,
            prefix_len,
        })?;
    let start = Ipv4Net::new(start, prefix_len)
        .map(|n| n.network())
        .unwrap_or(supernet.network());
    let taken = TakenRanges::new(taken);
    let after = subnets.filter(|c| c.network() >= start);
    let before = subnets.filter(|c| c.network() < start);
    for candidate in after.chain(before) {
        if !taken.overlaps(candidate) {
            return Ok(candidate);
        }
    }
    Err(AllocError::SubnetsExhausted {
        supernet,
        prefix_len,
    })
}

/// IPv4 ranges sorted by start, with the running maximum of their ends: a range
/// `[s, e]` overlaps one of them iff among those starting at or before `e` the
/// largest end reaches `s`.
struct TakenRanges {
    starts: Vec<u32>,
    max_end: Vec<u32>,
}

impl TakenRanges {
    fn new(taken: &[IpNet]) -> Self {
        let mut ranges: Vec<(u32, u32)> = taken
            .iter()
            .filter_map(|t| match t {
                IpNet::V4(n) => Some((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(_) => None,
            })
            .collect();
        ranges.sort_unstable();
        let mut running = 0;
        let max_end = ranges
            .iter()
            .map(|&(_, end)| {
                running = running.max(end);
                running
            })
            .collect();
        Self {
            starts: ranges.iter().map(|&(start, _)| start).collect(),
            max_end,
        }
    }

    fn overlaps(&self, net: Ipv4Net) -> bool {
        let (start, end) = (u32::from(net.network()), u32::from(net.broadcast()));
        let before = self.starts.partition_point(|&s| s <= end);
        before > 0 && self.max_end[before - 1] >= start
    }
}

/// True when two prefixes share at least one address.
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The tenant's own address: the first host of its subnet (10.100.0.1).
pub fn server_address(subnet: Ipv4Net) -> Ipv4Addr {
    nth(subnet, 1)
}

/// The tenant's IPv6 server address: the tenant's IPv4 network embedded in a ULA
/// /64 (`fd77:7770:<v4 network>::1`), so every tenant has one without another
/// allocation to store. 10.100.0.0/16 gets `fd77:7770:a64:0::1`.
pub fn server_address_v6(subnet: Ipv4Net) -> std::net::Ipv6Addr {
    let [a, b, c, d] = subnet.network().octets();
    std::net::Ipv6Addr::new(
        0xfd77,
        0x7770,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
        0,
        0,
        0,
        1,
    )
}

/// Where every tenant's IPv6 network lies (`fd77:7770::/32`): routed into tunnels,
/// so never a host prefix.
pub const TENANT_RANGE_V6: ipnet::Ipv6Net = ipnet::Ipv6Net::new_assert(
    std::net::Ipv6Addr::new(0xfd77, 0x7770, 0, 0, 0, 0, 0, 0),
    32,
);

/// The tenant's IPv6 network: the ULA /64 that holds [`server_address_v6`]. The
/// host device carries it in TUN mode; no two tenants share one, since no two
/// subnets share their network address.
pub fn server_net_v6(subnet: Ipv4Net) -> ipnet::Ipv6Net {
    ipnet::Ipv6Net::new_assert(server_address_v6(subnet), 64).trunc()
}

/// Where router addresses start: 10.X.1.1 in a subnet large enough to keep the
/// first /24 for the server and imported peers, else the second host.
pub fn router_range_start(subnet: Ipv4Net) -> u32 {
    if subnet.prefix_len() <= 22 {
        257
    } else {
        2
    }
}

/// The first free router address of `subnet` (10.X.1.1, 10.X.1.2, …), skipping
/// addresses that end in .0 or .255 so that none looks like a network or broadcast.
pub fn next_router_address(
    subnet: Ipv4Net,
    used: &HashSet<IpAddr>,
) -> Result<Ipv4Addr, AllocError> {
    next_host(subnet, router_range_start(subnet), used)
}

/// The first free client address of a pool (10.200.0.2, …); .1 stays free for the
/// gateway side of the pool.
pub fn next_pool_address(pool: Ipv4Net, used: &HashSet<IpAddr>) -> Result<Ipv4Addr, AllocError> {
    next_host(pool, 2, used)
}

fn next_host(net: Ipv4Net, start: u32, used: &HashSet<IpAddr>) -> Result<Ipv4Addr, AllocError> {
    next_host_where(net, start, |a| used.contains(&IpAddr::V4(a))).map(|(a, _)| a)
}

/// The first address of `net` at or after host number `start` that does not end
/// in .0 or .255 and is not `taken`, with its host number.
pub fn next_host_where(
    net: Ipv4Net,
    start: u32,
    taken: impl Fn(Ipv4Addr) -> bool,
) -> Result<(Ipv4Addr, u32), AllocError> {
    let size = 1u64 << (32 - net.prefix_len());
    // The last address is the broadcast address of the subnet.
    let end = size.saturating_sub(1);
    (u64::from(start)..end)
        .map(|i| (nth(net, i as u32), i as u32))
        .find(|(a, _)| {
            let last = a.octets()[3];
            last != 0 && last != 255 && !taken(*a)
        })
        .ok_or(AllocError::AddressesExhausted {
            range: IpNet::V4(net),
        })
}

/// True when `addr` is a host address of `net` that a peer may take: not the network,
/// not the broadcast, not the server address.
pub fn is_assignable(net: Ipv4Net, addr: Ipv4Addr) -> bool {
    net.contains(&addr)
        && addr != net.network()
        && addr != net.broadcast()
        && (net.prefix_len() >= 31 || addr != server_address(net))
}

fn nth(net: Ipv4Net, i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()).wrapping_add(i))
}

/// Receiver indices (24 bits; boringtun shifts them left by 8) unique in the process.
///
/// Indices are handed out from a counter that starts at a random offset, so that an
/// index says nothing about how many peers exist, and freed ones are reused only after
/// the counter wraps.
#[derive(Debug)]
pub struct IndexAllocator {
    next: u32,
    used: HashSet<u32>,
}

/// Receiver indices are 24 bits wide.
pub const INDEX_SPACE: u32 = 1 << 24;

impl IndexAllocator {
    /// An allocator whose first candidate is `seed` (mod 2^24).
    pub fn new(seed: u32) -> Self {
        Self {
            next: seed % INDEX_SPACE,
            used: HashSet::new(),
        }
    }

    /// A fresh index.
    pub fn allocate(&mut self) -> Result<u32, AllocError> {
        if self.used.len() as u32 >= INDEX_SPACE - 1 {
            return Err(AllocError::IndicesExhausted);
        }
        loop {
            let candidate = self.next;
            self.next = (self.next + 1) % INDEX_SPACE;
            // Index 0 is never used so that a zeroed field never matches.
            if candidate != 0 && self.used.insert(candidate) {
                return Ok(candidate);
            }
        }
    }

    /// True for an index this allocator could hand out.
    pub fn is_valid(index: u32) -> bool {
        index != 0 && index < INDEX_SPACE
    }

    /// Marks an index restored from the store as used; false if it is not a
    /// valid index or already was used.
    pub fn reserve(&mut self, index: u32) -> bool {
        Self::is_valid(index) && self.used.insert(index)
    }

    /// Returns an index for reuse.
    pub fn free(&mut self, index: u32) {
        self.used.remove(&index);
    }

    /// Number of indices in use.
    pub fn in_use(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n4(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// Each tenant's IPv6 network is the /64 of its server address, and
    /// non-overlapping subnets never share one.
    #[test]
    fn ipv6_network_per_tenant() {
        let kitonga = n4("10.100.0.0/16");
        let net = server_net_v6(kitonga);
        assert_eq!(net, "fd77:7770:a64::/64".parse::<ipnet::Ipv6Net>().unwrap());
        assert!(net.contains(&server_address_v6(kitonga)));
        assert_ne!(net, server_net_v6(n4("10.101.0.0/16")));
        assert_ne!(
            server_net_v6(n4("10.100.0.0/24")),
            server_net_v6(n4("10.100.1.0/24"))
        );
        assert!(TENANT_RANGE_V6.contains(&net));
        assert!(TENANT_RANGE_V6.contains(&server_net_v6(n4("10.255.255.0/24"))));
    }

    #[test]
    fn seed_layout() {
        let supernet = n4("10.0.0.0/8");
        let start = Ipv4Addr::new(10, 100, 0, 0);
        let first = next_subnet(supernet, 16, start, &[]).unwrap();
        assert_eq!(first, n4("10.100.0.0/16"));
        let second = next_subnet(supernet, 16, start, &[IpNet::V4(first)]).unwrap();
        assert_eq!(second, n4("10.101.0.0/16"));
        // After 10.255.0.0/16 allocation wraps around to 10.0.0.0/16.
        let high: Vec<IpNet> = (100..=255)
            .map(|b| format!("10.{b}.0.0/16").parse().unwrap())
            .collect();
        assert_eq!(
            next_subnet(supernet, 16, start, &high).unwrap(),
            n4("10.0.0.0/16")
        );
        assert_eq!(
            server_address(first),
            "10.100.0.1".parse::<Ipv4Addr>().unwrap()
        );
        let used = HashSet::new();
        assert_eq!(
            next_router_address(first, &used).unwrap(),
            "10.100.1.1".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            next_pool_address(n4("10.200.0.0/24"), &used).unwrap(),
            "10.200.0.2".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn subnets_skip_pools_and_report_exhaustion() {
        let supernet = n4("10.200.0.0/15");
        let pool: IpNet = "10.200.0.0/24".parse().unwrap();
        let start = supernet.network();
        assert_eq!(
            next_subnet(supernet, 16, start, &[pool]).unwrap(),
            n4("10.201.0.0/16")
        );
        let all = [pool, "10.201.0.0/16".parse().unwrap()];
        assert_eq!(
            next_subnet(supernet, 16, start, &all),
            Err(AllocError::SubnetsExhausted {
                supernet,
                prefix_len: 16
            })
        );
        assert!(matches!(
            next_subnet(supernet, 8, start, &[]),
            Err(AllocError::BadPrefixLength { .. })
        ));
    }

    #[test]
    fn ports() {
        let used: BTreeSet<u16> = [51820, 51821].into_iter().collect();
        assert_eq!(next_port(51820, 65535, &used), Ok(51822));
        let full: BTreeSet<u16> = [65534, 65535].into_iter().collect();
        assert!(next_port(65534, 65535, &full).is_err());
        // The range ends where the operator says, and exhaustion names it.
        assert_eq!(
            next_port(51820, 51821, &used),
            Err(AllocError::PortsExhausted {
                first: 51820,
                last: 51821
            })
        );
        assert_eq!(next_port(51820, 51822, &used), Ok(51822));
    }

    #[test]
    fn router_addresses_skip_dot_255_and_small_subnets_start_low() {
        let net = n4("10.100.0.0/16");
        let used: HashSet<IpAddr> = (1..=254)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 100, 1, i)))
            .collect();
        assert_eq!(
            next_router_address(net, &used).unwrap(),
            Ipv4Addr::new(10, 100, 2, 1)
        );
        assert_eq!(
            next_router_address(n4("10.9.9.0/24"), &HashSet::new()).unwrap(),
            Ipv4Addr::new(10, 9, 9, 2)
        );
        let tiny = n4("10.9.9.0/30");
        let used: HashSet<IpAddr> = [IpAddr::V4(Ipv4Addr::new(10, 9, 9, 2))].into();
        assert!(next_router_address(tiny, &used).is_err());
    }

    #[test]
    fn indices_are_unique_and_reused_after_wrap() {
        let mut a = IndexAllocator::new(INDEX_SPACE - 2);
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        let z = a.allocate().unwrap();
        assert_eq!((x, y, z), (INDEX_SPACE - 2, INDEX_SPACE - 1, 1));
        a.free(y);
        assert_eq!(a.in_use(), 2);
        // A freed index is not handed out again at once (a datagram still in
        // flight for the old peer must not reach a new one)...
        let next = a.allocate().unwrap();
        assert_eq!(next, 2);
        // ... only once the counter has gone round.
        let mut b = IndexAllocator::new(INDEX_SPACE - 3);
        let first = b.allocate().unwrap();
        b.free(first);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(b.allocate().unwrap());
        }
        assert_eq!(
            seen,
            [INDEX_SPACE - 2, INDEX_SPACE - 1, 1, 2, 3],
            "not {first} before the wrap"
        );
    }

    proptest! {
        /// Near the wrap point: no index is handed out twice while held, and a
        /// freed one comes back only after every other candidate was offered.
        #[test]
        fn freed_indices_wait_for_the_counter_to_come_round(
            back in 1u32..300,
            frees in proptest::collection::vec(0usize..50, 0..20),
        ) {
            let mut a = IndexAllocator::new(INDEX_SPACE - back);
            let mut held: Vec<u32> = (0..50).map(|_| a.allocate().unwrap()).collect();
            let mut freed = Vec::new();
            for i in frees {
                if i < held.len() {
                    let f = held.swap_remove(i);
                    a.free(f);
                    freed.push(f);
                }
            }
            // The next 100 never include a freed index (the counter is past them
            // and the space is 2^24), nor a held one.
            for _ in 0..100 {
                let n = a.allocate().unwrap();
                prop_assert!(!freed.contains(&n) && !held.contains(&n));
                held.push(n);
            }
        }
    }

    proptest! {
        /// Ports handed out one after another are the range's free ones, lowest
        /// first, never one another program holds, and then exhaustion.
        #[test]
        fn ports_stay_in_their_range(
            first in 1u16..=65535,
            span in 0u16..40,
            held in prop::collection::btree_set(any::<u16>(), 0..20),
        ) {
            let last = first.saturating_add(span);
            let mut used = held.clone();
            let mut got = Vec::new();
            while let Ok(p) = next_port(first, last, &used) {
                prop_assert!((first..=last).contains(&p) && !used.contains(&p));
                got.push(p);
                used.insert(p);
            }
            let free: Vec<u16> = (first..=last).filter(|p| !held.contains(p)).collect();
            prop_assert_eq!(got, free);
        }
    }

    proptest! {
        /// Subnets handed out one after another never overlap each other or a pool.
        #[test]
        fn subnets_never_overlap(prefix_len in 16u8..=20, pools in prop::collection::vec((0u8..4, any::<u8>()), 0..4)) {
            let supernet = n4("10.100.0.0/14");
            let mut taken: Vec<IpNet> = pools
                .iter()
                .map(|&(a, b)| IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, 100 + a, b, 0), 24).unwrap()))
                .collect();
            let pools_len = taken.len();
            let start = Ipv4Addr::new(10, 101, 0, 0);
            while let Ok(s) = next_subnet(supernet, prefix_len, start, &taken) {
                // The same choice as a naive first fit from `start`, wrapping.
                let all: Vec<Ipv4Net> = supernet.subnets(prefix_len).unwrap().collect();
                let naive = all
                    .iter()
                    .filter(|c| c.network() >= start)
                    .chain(all.iter().filter(|c| c.network() < start))
                    .find(|c| taken.iter().all(|t| !overlaps(IpNet::V4(**c), *t)))
                    .copied();
                prop_assert_eq!(Some(s), naive);
                let s = IpNet::V4(s);
                prop_assert!(taken.iter().all(|t| !overlaps(s, *t)));
                prop_assert!(IpNet::V4(supernet).contains(&s.network()));
                taken.push(s);
            }
            // Exhaustion is reported only when the naive count agrees.
            let free = supernet
                .subnets(prefix_len)
                .unwrap()
                .filter(|c| taken[..pools_len].iter().all(|t| !overlaps(IpNet::V4(*c), *t)))
                .count();
            prop_assert_eq!(taken.len() - pools_len, free);
        }

        /// Addresses handed out one after another are distinct, assignable and never the server.
        #[test]
        fn addresses_unique(pre in prop::collection::hash_set(0u32..600, 0..50)) {
            let net = n4("10.100.0.0/22");
            let mut used: HashSet<IpAddr> = pre
                .iter()
                .map(|i| IpAddr::V4(Ipv4Addr::from(u32::from(net.network()) + i)))
                .collect();
            for _ in 0..100 {
                let a = next_router_address(net, &used).unwrap();
                prop_assert!(is_assignable(net, a));
                prop_assert!(used.insert(IpAddr::V4(a)));
            }
        }

        #[test]
        fn index_allocator_never_repeats_live_indices(ops in prop::collection::vec(any::<bool>(), 1..300), seed in any::<u32>()) {
            let mut a = IndexAllocator::new(seed);
            let mut live = Vec::new();
            for alloc in ops {
                if alloc || live.is_empty() {
                    let i = a.allocate().unwrap();
                    prop_assert!(i != 0 && i < INDEX_SPACE);
                    prop_assert!(!live.contains(&i));
                    live.push(i);
                } else {
                    a.free(live.swap_remove(0));
                }
            }
            prop_assert_eq!(a.in_use(), live.len());
        }
    }
}
