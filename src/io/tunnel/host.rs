//! A tunnel task's share of the host TUN device: the packets the device's
//! reader hands it, and the packets it writes, in one batch per wake-up.
//!
//! Left out: the device, its reader and routes (`io::tun`), and what the
//! engine does with a host packet.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::core::engine::TunnelEngine;

use super::sink::TunnelSink;
use super::RECV_BATCH;

/// The tunnel's side of the host TUN device, when there is one.
#[derive(Default)]
pub struct HostLink {
    /// Packets from the host whose destination is in this tunnel.
    pub packets: Option<mpsc::Receiver<Vec<u8>>>,
    /// Where their buffers go back to the device's reader.
    pub recycle: Option<mpsc::Sender<Vec<u8>>>,
    /// The device, for packets to the tunnel's server address.
    pub device: Option<Arc<tun_rs::AsyncDevice>>,
    /// Packets for the device, written once per wake-up.
    pub out: HostOut,
}

/// Hands up to `limit` host packets queued for this tunnel to the engine,
/// without waiting for more.
pub(super) fn take_host_packets(
    packets: &mut Option<mpsc::Receiver<Vec<u8>>>,
    recycle_to: &Option<mpsc::Sender<Vec<u8>>>,
    engine: &mut TunnelEngine,
    now: Instant,
    sink: &mut TunnelSink<'_>,
    limit: usize,
) {
    let Some(rx) = packets.as_mut() else { return };
    for _ in 0..limit {
        let Ok(mut packet) = rx.try_recv() else { break };
        engine.handle_host_packet(&mut packet, now, sink);
        recycle(recycle_to, packet);
    }
}

/// Hands a packet buffer back to the device's reader (freed if it has plenty).
pub(super) fn recycle(to: &Option<mpsc::Sender<Vec<u8>>>, packet: Vec<u8>) {
    if let Some(to) = to {
        let _ = to.try_send(packet);
    }
}

/// The next host packet for the tunnel; never, without a device.
pub(super) async fn recv_host(packets: &mut Option<mpsc::Receiver<Vec<u8>>>) -> Option<Vec<u8>> {
    match packets {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Packets for the host device, collected during one wake-up and written in one
/// batch (`send_multiple`: coalesced with GRO when offload is on). Buffers are
/// recycled, with headroom for the virtio header.
#[derive(Default)]
pub struct HostOut {
    pending: Vec<Vec<u8>>,
    pub(super) spare: Vec<Vec<u8>>,
    /// The capacity of the buffers in `spare`, in bytes.
    pub(super) spare_bytes: usize,
    /// The coalescing tables (1.8 MB), made at the first write: tunnels
    /// without host traffic never pay for them.
    gro: Option<Box<tun_rs::GROTable>>,
}

/// Packets collected before the batch is written: what one wake-up can read
/// (`RECV_BATCH` slots, each a GRO train of at most 64 datagrams), so that
/// nothing read is refused. Should it be reached, the engine counts the rest as
/// `local_unavailable`.
pub(super) const HOST_BATCH: usize = RECV_BATCH * 64;

/// Buffers kept for reuse between wake-ups: a bulk upload to the host reuses
/// them instead of allocating per packet (up to about 1.5 MB per tunnel that
/// has sent the host such a burst).
pub(super) const HOST_SPARE: usize = 1024;

/// The most their capacity may add up to: a burst of full-size packets, and
/// some buffers the coalescing grew to 64 KiB. A router that sends the host
/// large packets (fragmented, up to 64 KiB each) cannot make a tunnel keep
/// more.
pub(super) const HOST_SPARE_BYTES: usize = 4 << 20;

impl HostOut {
    /// Queues `packet` for the host; false when the batch is full.
    pub(super) fn push(&mut self, packet: &[u8]) -> bool {
        if self.pending.len() >= HOST_BATCH {
            return false;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        self.spare_bytes -= buf.capacity();
        buf.clear();
        buf.resize(tun_rs::VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        self.pending.push(buf);
        true
    }

    /// Writes the collected packets to `device` in one batch; returns how many
    /// it refused. A TUN device's writes do not wait (the kernel takes a packet
    /// or drops it), so this also runs between handshake turns, where the task
    /// must not wait: host traffic does not wait behind a storm, and the batch
    /// never fills up over several turns.
    pub(super) fn flush(&mut self, device: &tun_rs::AsyncDevice) -> u64 {
        if self.pending.is_empty() {
            return 0;
        }
        let gro = self.gro.get_or_insert_with(Box::default);
        let offset = tun_rs::VIRTIO_NET_HDR_LEN;
        // How many went before an error is unknown: count the batch.
        // The device's own (non-blocking) writes, not the async wrapper's.
        let sync: &tun_rs::DeviceImpl = device;
        let failures = match sync.send_multiple(gro, &mut self.pending, offset) {
            Ok(_) => 0,
            Err(_) => self.pending.len() as u64,
        };
        self.recycle();
        failures
    }

    /// Keeps the written buffers for the next packets, up to [`HOST_SPARE`]
    /// of them and [`HOST_SPARE_BYTES`]; the others are freed.
    pub(super) fn recycle(&mut self) {
        for buf in self.pending.drain(..) {
            let bytes = self.spare_bytes + buf.capacity();
            if self.spare.len() < HOST_SPARE && bytes <= HOST_SPARE_BYTES {
                self.spare_bytes = bytes;
                self.spare.push(buf);
            }
        }
    }
}
