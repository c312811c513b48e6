//! A router inside the test process: a [`UdpPeer`] whose decrypted packets feed a
//! smoltcp interface at the router's tunnel address, running TCP echo servers. It
//! lets loopback tests open TCP connections *into* a tunnel, as the backend does
//! through a management forward.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::UdpPeer;

#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut b = vec![0; len];
        let r = f(&mut b);
        self.0.push_back(b);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx, Tx<'_>)> {
        let p = self.rx.pop_front()?;
        Some((Rx(p), Tx(&mut self.tx)))
    }
    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = 1420;
        c
    }
}

/// A running in-process router; stops on drop.
pub struct StackRouter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StackRouter {
    /// Runs `peer` (already handshaken) as router `address/16` with `listeners`
    /// echo sockets on `port`.
    pub fn start(mut peer: UdpPeer, address: Ipv4Addr, port: u16, listeners: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        peer.socket
            .set_read_timeout(Some(Duration::from_millis(1)))
            .expect("timeout");
        let thread = std::thread::spawn(move || {
            let mut device = Queues::default();
            let mut iface = Interface::new(
                Config::new(HardwareAddress::Ip),
                &mut device,
                smoltcp::time::Instant::ZERO,
            );
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(address), 16));
            });
            let mut sockets = SocketSet::new(Vec::new());
            let listen = |sockets: &mut SocketSet<'static>| -> SocketHandle {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; 64 * 1024]),
                    tcp::SocketBuffer::new(vec![0; 64 * 1024]),
                );
                s.set_congestion_control(tcp::CongestionControl::Cubic);
                s.listen(port).expect("listen");
                sockets.add(s)
            };
            let mut handles: Vec<SocketHandle> =
                (0..listeners).map(|_| listen(&mut sockets)).collect();
            let start = Instant::now();
            let mut buf = vec![0u8; 64 * 1024];
            while !flag.load(Ordering::Relaxed) {
                // Everything waiting on the UDP socket, then the stack.
                for _ in 0..256 {
                    match peer.poll() {
                        Some(p) => device.rx.push_back(p),
                        None => break,
                    }
                }
                let at = smoltcp::time::Instant::from_micros(start.elapsed().as_micros() as i64);
                iface.poll(at, &mut device, &mut sockets);
                for h in handles.iter_mut() {
                    let s = sockets.get_mut::<tcp::Socket>(*h);
                    while s.can_recv() && s.send_capacity() - s.send_queue() > 0 {
                        let room = (s.send_capacity() - s.send_queue()).min(buf.len());
                        let n = s.recv_slice(&mut buf[..room]).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        let _ = s.send_slice(&buf[..n]);
                    }
                    if s.state() == tcp::State::CloseWait && !s.can_recv() {
                        s.close();
                    }
                    if s.state() == tcp::State::Closed {
                        let _ = s.listen(port);
                    }
                }
                iface.poll(at, &mut device, &mut sockets);
                for _ in 0..1024 {
                    if matches!(
                        iface.poll_egress(at, &mut device, &mut sockets),
                        smoltcp::iface::PollResult::None
                    ) {
                        break;
                    }
                }
                while let Some(p) = device.tx.pop_front() {
                    peer.send(&p);
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StackRouter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
