//! TUN mode: one kernel device (e.g. `wgplane0`) carrying every tenant's server
//! address, so the host reaches routers through ordinary routes, and the routers
//! reach the host.
//!
//! The device gets each tenant's server addresses with the tenant's prefixes
//! (IPv4: the subnet; IPv6: the tenant's ULA /64, `fd77:7770:a64::1/64` for
//! 10.100.0.0/16), which makes the kernel route both networks into it, and a route
//! for each client pool. One reader takes packets from the device and hands each
//! to the one tunnel whose network or pool holds its destination; the tunnel's
//! engine routes it to a peer by longest-prefix match. Packets from peers reach the
//! device only through routing rule 4 (destination = the tenant's server address
//! or a host prefix, source in the tenant's networks). Addresses and routes vanish
//! with the device when the process exits.
//!
//! Offload: when the kernel takes `IFF_VNET_HDR`, the reader gets GSO super-packets
//! from the host (one syscall for up to 64 KiB of a TCP flow), split into MTU-sized
//! packets by tun-rs; each tunnel task writes what it has for the host once per
//! wake-up with `send_multiple`, which coalesces TCP/UDP flows (GRO) into
//! super-packets. Without offload support both fall back to one packet per
//! syscall. Left out: multi-queue (one reader keeps every flow in order).
//!
//! Set down from outside (`ip link set wgplane0 down`), the device loses its
//! IPv6 addresses and every route through it; [`HostDevice::repair`], run by
//! the supervisor, reports it down meanwhile and puts back the addresses and
//! pool routes once it is up again. It does not set the device up itself: that
//! is the operator's call.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::TryStreamExt;
use ipnet::{IpNet, Ipv4Net};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkFlags;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::sys::AsyncSocket;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::core::table::PrefixTable;
use crate::core::{alloc, packet};

/// Packets waiting for one tunnel task; more are dropped (the kernel's queue is
/// the place to wait, not our memory).
pub const HOST_QUEUE: usize = 1024;

/// Why the device or its routes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// Creating or configuring the device failed (no `/dev/net/tun`, no
    /// `CAP_NET_ADMIN`, name taken).
    #[error("TUN device {name}: {source}")]
    Device {
        name: String,
        source: std::io::Error,
    },
    /// A route could not be added or removed.
    #[error("route {prefix} via {name}: {message}")]
    Route {
        name: String,
        prefix: Ipv4Net,
        message: String,
    },
    /// The kernel would not say what the device has (a netlink dump failed).
    #[error("TUN device {name}: netlink: {message}")]
    Netlink { name: String, message: String },
}

/// A tunnel's share of the device, as the runtime set it up: what
/// [`HostDevice::repair`] puts back.
#[derive(Debug, Clone, Copy)]
pub struct TenantOnDevice<'a> {
    pub server: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The device took the tenant's IPv6 address too.
    pub v6: bool,
    pub pools: &'a [Ipv4Net],
}

/// What [`HostDevice::repair`] found.
#[derive(Debug)]
pub enum DeviceCheck {
    /// Set down from outside: the host routes nothing into it.
    Down,
    /// Up: how many addresses and routes were put back, and what the kernel
    /// refused to take back (tried again at the next check).
    Up {
        addresses: usize,
        routes: usize,
        refused: Vec<TunError>,
    },
}

/// Packets from the host device that reached no tunnel, by reason. Plain
/// atomics bumped by the reader; read at scrape time.
#[derive(Debug, Default)]
pub struct HostDrops {
    /// Reads the offload code could not split (the whole read is lost).
    pub unreadable: AtomicU64,
    /// Not a well-formed IPv4/IPv6 packet.
    pub malformed: AtomicU64,
    /// No tenant's subnet or pool holds the destination.
    pub no_tunnel: AtomicU64,
    /// A multicast or link-local destination: the host's own chatter on the
    /// device (IPv6 neighbour discovery and MLD, mDNS), never for a tunnel.
    pub link_local: AtomicU64,
    /// The source lies in another tenant's subnet, pool or IPv6 network: the
    /// host relayed one tenant's packet towards another (a proxy, a tunnel
    /// device, forwarding), which tenant isolation forbids.
    pub cross_tenant: AtomicU64,
    /// The tunnel's queue was full (it is behind; the kernel's queue is the
    /// place to wait).
    pub queue_full: AtomicU64,
}

impl HostDrops {
    /// Each reason's name (as in metrics) and count.
    pub fn counts(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("unreadable", get(&self.unreadable)),
            ("malformed", get(&self.malformed)),
            ("no_tunnel", get(&self.no_tunnel)),
            ("link_local", get(&self.link_local)),
            ("cross_tenant", get(&self.cross_tenant)),
            ("queue_full", get(&self.queue_full)),
        ]
    }
}

/// Which tunnel takes a host packet, by destination. The reader takes a
/// snapshot per batch, so the lock is held only to clone an `Arc`, never while
/// packets are handled; a change copies the table only when the reader holds a
/// snapshot at that moment.
type Routes = RwLock<Arc<PrefixTable<mpsc::Sender<Vec<u8>>>>>;

/// The host device and the table that sends its packets to tunnels.
pub struct HostDevice {
    device: Arc<AsyncDevice>,
    drops: Arc<HostDrops>,
    name: String,
    index: u32,
    routes: Arc<Routes>,
    netlink: rtnetlink::Handle,
    /// Where tunnels hand packet buffers back to the reader for reuse.
    recycle: mpsc::Sender<Vec<u8>>,
    /// The reader: when it ends, no host packet reaches any tunnel.
    reader: tokio::task::JoinHandle<()>,
}

/// The reader holds the device open: it ends with the device's owner.
impl Drop for HostDevice {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Packet buffers in circulation between the reader and the tunnels; beyond
/// this, returned buffers are freed.
const RECYCLED_BUFFERS: usize = 1024;

impl HostDevice {
    /// Creates the device and starts its reader. Needs `CAP_NET_ADMIN`.
    pub fn open(name: &str, mtu: u16) -> Result<Self, TunError> {
        Self::open_on(name, mtu, &tokio::runtime::Handle::current())
    }

    /// [`HostDevice::open`], with the device and its reader on the current
    /// runtime (the tunnels') and the netlink connection for its routes and
    /// addresses on `control`: only changes and the periodic check (under the
    /// control lock) use it, and they should not wait on the tunnels' threads.
    pub fn open_on(
        name: &str,
        mtu: u16,
        control: &tokio::runtime::Handle,
    ) -> Result<Self, TunError> {
        let err = |source| TunError::Device {
            name: name.to_owned(),
            source,
        };
        let build = |offload| {
            DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .offload(offload)
                .build_async()
        };
        let (device, vnet_hdr) = match build(true) {
            Ok(d) => (d, true),
            Err(e) => {
                tracing::warn!(error = %e, "TUN offload unavailable; plain reads and writes");
                (build(false).map_err(err)?, false)
            }
        };
        let index = device.if_index().map_err(err)?;
        // Its socket is registered where it is made: made on `control`.
        let (mut connection, netlink, _) = {
            let _on_control = control.enter();
            rtnetlink::new_connection().map_err(err)?
        };
        // Strict checking (Linux 4.20+) makes the kernel filter route dumps by
        // device, so that `repair` never reads a host's whole routing table;
        // without it the dump is filtered here.
        let strict = connection.socket_mut().socket_ref();
        if let Err(e) = strict.set_netlink_get_strict_chk(true) {
            tracing::warn!(error = %e, "netlink strict checking unavailable (Linux before 4.20): \
                the device check every 5 s reads the host's whole routing table");
        }
        control.spawn(connection);
        let device = Arc::new(device);
        let routes = Arc::new(RwLock::new(Arc::new(PrefixTable::new())));
        let (recycle, spare) = mpsc::channel(RECYCLED_BUFFERS);
        let drops = Arc::new(HostDrops::default());
        let reader = tokio::spawn(read_loop(
            Arc::clone(&device),
            Arc::clone(&routes),
            spare,
            Arc::clone(&drops),
            mtu,
        ));
        tracing::info!(name, index, mtu, offload = vnet_hdr, "TUN device up");
        Ok(Self {
            device,
            drops,
            name: name.to_owned(),
            index,
            routes,
            netlink,
            recycle,
            reader,
        })
    }

    /// True while the reader runs (it ends when the device fails).
    pub fn reading(&self) -> bool {
        !self.reader.is_finished()
    }

    /// What the reader dropped, by reason.
    pub fn drops(&self) -> &HostDrops {
        &self.drops
    }

    /// Where a tunnel returns the packet buffers it got, so the reader does not
    /// allocate one per packet.
    pub fn recycler(&self) -> mpsc::Sender<Vec<u8>> {
        self.recycle.clone()
    }

    /// The device, for the tunnel tasks to write host-bound packets.
    pub fn device(&self) -> Arc<AsyncDevice> {
        Arc::clone(&self.device)
    }

    /// Gives the device a tenant's server addresses, IPv4 with the tenant's
    /// prefix and IPv6 with its /64 (which makes the kernel route both networks
    /// here), and sends packets for them to `tunnel`. IPv6 is best effort: where
    /// the host has it off (`disable_ipv6`, common in containers) the tunnel
    /// carries IPv4 alone. Returns whether the device carries the IPv6 network.
    pub fn add_tenant(
        &self,
        server: Ipv4Addr,
        subnet: Ipv4Net,
        tunnel: mpsc::Sender<Vec<u8>>,
    ) -> Result<bool, TunError> {
        self.device
            .add_address_v4(server, subnet.prefix_len())
            .map_err(|source| TunError::Device {
                name: self.name.clone(),
                source,
            })?;
        let net6 = alloc::server_net_v6(subnet);
        let v6 = match self
            .device
            .add_address_v6(alloc::server_address_v6(subnet), net6.prefix_len())
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(name = %self.name, %net6, error = %e,
                    "IPv6 address refused; this tunnel reaches the host over IPv4 only");
                false
            }
        };
        if let Ok(mut routes) = self.routes.write() {
            let routes = Arc::make_mut(&mut routes);
            routes.insert(IpNet::V4(subnet), tunnel.clone());
            if v6 {
                routes.insert(IpNet::V6(net6), tunnel);
            }
        }
        Ok(v6)
    }

    /// Removes a tenant's addresses and every route to its tunnel.
    pub fn remove_tenant(&self, server: Ipv4Addr, subnet: Ipv4Net) {
        let _ = self.device.remove_address(IpAddr::V4(server));
        let net6 = alloc::server_net_v6(subnet);
        let _ = self
            .device
            .remove_address_v6(alloc::server_address_v6(subnet), net6.prefix_len());
        if let Ok(mut routes) = self.routes.write() {
            let routes = Arc::make_mut(&mut routes);
            routes.remove(IpNet::V4(subnet));
            routes.remove(IpNet::V6(net6));
        }
    }

    /// Routes a client pool into the device, towards `tunnel`, with the
    /// tenant's server address `server` as the host's source for it.
    pub async fn add_pool(
        &self,
        pool: Ipv4Net,
        server: Ipv4Addr,
        tunnel: mpsc::Sender<Vec<u8>>,
    ) -> Result<(), TunError> {
        match self
            .netlink
            .route()
            .add(self.pool_route(pool, Some(server)))
            .replace()
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) => {
                return Err(TunError::Route {
                    name: self.name.clone(),
                    prefix: pool,
                    message: e.to_string(),
                })
            }
        }
        if let Ok(mut routes) = self.routes.write() {
            Arc::make_mut(&mut routes).insert(IpNet::V4(pool), tunnel);
        }
        Ok(())
    }

    /// The kernel's route for a pool through the device. With `source`, the
    /// tenant's server address: what the host sends to a phone leaves from its
    /// own tenant's address, not from the device's first one (another tenant's,
    /// which the reader would drop as `cross_tenant`).
    fn pool_route(
        &self,
        pool: Ipv4Net,
        source: Option<Ipv4Addr>,
    ) -> rtnetlink::packet_route::route::RouteMessage {
        let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(pool.network(), pool.prefix_len())
            .output_interface(self.index);
        match source {
            Some(source) => route.pref_source(source).build(),
            None => route.build(),
        }
    }

    /// Checks the device against what the tunnels put on it and puts back
    /// what is missing: after `ip link set … down` and `up` the kernel has
    /// dropped the IPv6 addresses and the pool routes (IPv4 addresses stay;
    /// `ip address flush` takes them too). Reports a device that is down and
    /// changes nothing then.
    pub async fn repair(&self, tenants: &[TenantOnDevice<'_>]) -> Result<DeviceCheck, TunError> {
        let netlink = |e: rtnetlink::Error| TunError::Netlink {
            name: self.name.clone(),
            message: e.to_string(),
        };
        let mut links = self.netlink.link().get().match_index(self.index).execute();
        let up = match links.try_next().await.map_err(netlink)? {
            Some(link) => link.header.flags.contains(LinkFlags::Up),
            None => false,
        };
        if !up {
            return Ok(DeviceCheck::Down);
        }
        let mut have = HashSet::new();
        let mut request = self
            .netlink
            .address()
            .get()
            .set_link_index_filter(self.index);
        // With strict checking the kernel sends only this device's addresses.
        request.message_mut().header.index = self.index;
        let mut dump = request.execute();
        while let Some(message) = dump.try_next().await.map_err(netlink)? {
            for attribute in message.attributes {
                if let AddressAttribute::Address(a) | AddressAttribute::Local(a) = attribute {
                    have.insert(a);
                }
            }
        }
        let mut routed = HashSet::new();
        // Static IPv4 routes of the main table through the device (the filter
        // strict checking lets the kernel apply).
        let ours = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(self.index)
            .build();
        let mut dump = self.netlink.route().get(ours).execute();
        while let Some(message) = dump.try_next().await.map_err(netlink)? {
            let (mut oif, mut dst) = (None, None);
            for attribute in &message.attributes {
                match attribute {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(*a),
                    _ => {}
                }
            }
            let len = message.header.destination_prefix_length;
            if let (Some(i), Some(a)) = (oif, dst) {
                if let (true, Ok(net)) = (i == self.index, Ipv4Net::new(a, len)) {
                    routed.insert(net);
                }
            }
        }
        let device = |source| TunError::Device {
            name: self.name.clone(),
            source,
        };
        // Every tenant gets its turn: one the kernel refuses (IPv6 turned off
        // on the device meanwhile, say) does not keep the others' back.
        let (mut addresses, mut routes, mut refused) = (0, 0, Vec::new());
        for t in tenants {
            if !have.contains(&IpAddr::V4(t.server)) {
                match self.device.add_address_v4(t.server, t.subnet.prefix_len()) {
                    Ok(()) => addresses += 1,
                    Err(e) => refused.push(device(e)),
                }
            }
            let v6 = alloc::server_address_v6(t.subnet);
            if t.v6 && !have.contains(&IpAddr::V6(v6)) {
                let len = alloc::server_net_v6(t.subnet).prefix_len();
                match self.device.add_address_v6(v6, len) {
                    Ok(()) => addresses += 1,
                    Err(e) => refused.push(device(e)),
                }
            }
            for &pool in t.pools.iter().filter(|p| !routed.contains(p)) {
                let add = self
                    .netlink
                    .route()
                    .add(self.pool_route(pool, Some(t.server)));
                match add.replace().execute().await {
                    Ok(()) => routes += 1,
                    Err(e) => refused.push(TunError::Route {
                        name: self.name.clone(),
                        prefix: pool,
                        message: e.to_string(),
                    }),
                }
            }
        }
        Ok(DeviceCheck::Up {
            addresses,
            routes,
            refused,
        })
    }

    /// Removes a pool's route.
    pub async fn remove_pool(&self, pool: Ipv4Net) {
        if let Ok(mut routes) = self.routes.write() {
            Arc::make_mut(&mut routes).remove(IpNet::V4(pool));
        }
        let _ = self
            .netlink
            .route()
            .del(self.pool_route(pool, None))
            .execute()
            .await;
    }
}

/// Most segments one offloaded read can split into: 64 KiB in segments of 16
/// bytes. A router that advertises a small MSS makes the host's TCP build
/// trains of small segments (the kernel's floor, `tcp_min_snd_mss` = 48,
/// applies before TCP options: 36 bytes with timestamps, less with SACK
/// blocks); with too few buffers the whole read is lost (counted as
/// `unreadable`). The buffers are sized for the device's MTU as configured: an
/// MTU raised by hand later is not followed.
const MAX_SEGMENTS: usize = 65_535 / 16 + 1;

/// The single reader: one queue, so the packets of a flow stay in order.
async fn read_loop(
    device: Arc<AsyncDevice>,
    routes: Arc<Routes>,
    mut spare: mpsc::Receiver<Vec<u8>>,
    drops: Arc<HostDrops>,
    mtu: u16,
) {
    let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65_535];
    // The first buffer takes any packet a read brings whole; the others one
    // segment of a split read each, never larger than the device's MTU
    // (about 7 MB in all at 1420).
    let segment = usize::from(mtu) + 256;
    let mut bufs: Vec<Vec<u8>> = (0..MAX_SEGMENTS)
        .map(|i| vec![0u8; if i == 0 { 65_535 } else { segment }])
        .collect();
    let mut sizes = vec![0usize; MAX_SEGMENTS];
    // The buffer of a packet a full queue refused, for the next packet: under
    // that overload the tunnels return no buffers, and none is allocated.
    let mut refused: Option<Vec<u8>> = None;
    loop {
        let count = match device
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
            .await
        {
            Ok(n) => n,
            // A packet the offload code cannot split: skip it, keep reading
            // (after a pause, should the device keep failing).
            Err(e) if device.is_running().unwrap_or(false) => {
                tracing::debug!(error = %e, "TUN read skipped");
                drops.unreadable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "TUN device read failed; host traffic stops");
                return;
            }
        };
        let Ok(routes) = routes.read().map(|r| Arc::clone(&r)) else {
            return;
        };
        for (buf, &size) in bufs.iter().zip(&sizes).take(count) {
            let Ok(header) = packet::parse(&buf[..size]) else {
                drops.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if link_scope(header.dst) {
                drops.link_local.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Some(tunnel) = routes.lookup(header.dst) else {
                drops.no_tunnel.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // Isolation on the host side too: what comes from one tenant's
            // addresses never enters another's tunnel.
            if routes
                .lookup(header.src)
                .is_some_and(|owner| !owner.same_channel(tunnel))
            {
                drops.cross_tenant.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut packet = match refused.take() {
                Some(buf) => buf,
                None => spare.try_recv().unwrap_or_default(),
            };
            packet.clear();
            packet.extend_from_slice(&buf[..header.len]);
            // Full queue: drop, as a congested link would. A tunnel whose
            // task ended (restarted within 5 s by the supervisor) has none.
            match tunnel.try_send(packet) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(packet)) => {
                    drops.queue_full.fetch_add(1, Ordering::Relaxed);
                    refused = Some(packet);
                }
                Err(mpsc::error::TrySendError::Closed(packet)) => {
                    drops.no_tunnel.fetch_add(1, Ordering::Relaxed);
                    refused = Some(packet);
                }
            }
        }
    }
}

/// Multicast and link-local destinations, which no tunnel ever gets from the host.
fn link_scope(dst: IpAddr) -> bool {
    match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_link_local() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local(),
    }
}

#[cfg(test)]
mod tests {
    use super::link_scope;

    #[test]
    fn the_hosts_link_chatter_is_told_apart() {
        for chatter in [
            "ff02::16",
            "ff02::2",
            "fe80::1",
            "224.0.0.251",
            "169.254.1.1",
            "255.255.255.255",
        ] {
            assert!(link_scope(chatter.parse().unwrap()), "{chatter}");
        }
        for unicast in ["fd77:7770:a64::101", "10.100.1.1", "2001:db8::1"] {
            assert!(!link_scope(unicast.parse().unwrap()), "{unicast}");
        }
    }
}
