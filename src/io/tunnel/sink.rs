//! Where a tunnel engine's output goes during one wake-up: datagrams into the
//! send batch, and in TUN mode packets for the host into the device's batch.
//!
//! Left out: writing either batch (the task flushes them once per wake-up).

use std::net::{IpAddr, SocketAddr};

use crate::io::sendbatch::SendBatch;

use crate::core::engine::Sink;

use super::host::HostOut;

/// The engine's [`Sink`] in a tunnel task.
pub(super) struct TunnelSink<'a> {
    pub(super) tx: &'a mut SendBatch,
    pub(super) host: Option<&'a mut HostOut>,
}

impl<'a> TunnelSink<'a> {
    /// Datagrams into `tx`; packets for the host into `out` where there is a
    /// device (`has_device`), else refused.
    pub(super) fn new(tx: &'a mut SendBatch, has_device: bool, out: &'a mut HostOut) -> Self {
        Self {
            tx,
            host: has_device.then_some(out),
        }
    }
}

impl Sink for TunnelSink<'_> {
    #[inline]
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.tx.push(to, None, datagram);
    }

    #[inline]
    fn send_from(&mut self, to: SocketAddr, local: Option<IpAddr>, datagram: &[u8]) {
        self.tx.push(to, local, datagram);
    }

    fn local(&mut self, packet: &[u8]) -> bool {
        // TUN mode: the host kernel answers for the server address. (In userspace
        // mode the engine's own stack takes these packets and this is not called.)
        self.host.as_mut().is_some_and(|out| out.push(packet))
    }
}
