//! `wgplane relay`: a UDP relay that knows nothing of WireGuard, the floor of a
//! userspace hub in the `benches/hubs.sh` lab.
//!
//! It reads and writes its socket exactly as a tunnel task does (the same socket
//! set-up, `recvmmsg` with UDP GRO, GSO and `sendmmsg` sends through
//! `SendBatch`, the same runtime and scheduling policy) but passes every
//! datagram on unchanged: from the upstream address to the last client that
//! spoke, from anybody else to the upstream address. The phone and the gateway
//! then hold one WireGuard session end to end through it. What a hub needs on
//! top of this relay is its cryptography and its routing; what the relay
//! itself costs is the kernel's work for the same datagrams, which no hub
//! built on UDP sockets avoids.
//!
//! Leaves out more than one client at a time (the last one to speak gets the
//! answers; upstream datagrams before any client spoke are dropped), IPv6
//! clients of an IPv4 socket and any check of what it relays: it is a measuring
//! tool, never an appliance feature.

use std::io;
use std::net::SocketAddr;

use crate::io::sendbatch::SendBatch;
use crate::io::udp::{self, TunnelSocket, MAX_DATAGRAM, RX_SLOTS};

/// Batches read per wake-up before the datagrams are sent on, as a tunnel's.
const BATCHES: usize = 4;

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    socket: TunnelSocket,
    state: quinn_udp::UdpSocketState,
    upstream: SocketAddr,
    tx: SendBatch,
    /// Where the upstream's datagrams go: the last other address that sent one.
    client: Option<SocketAddr>,
}

impl Relay {
    /// Binds `listen` (with a tunnel socket's set-up) and relays to and from
    /// `upstream`. Needs a tokio runtime.
    pub fn bind(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Relay> {
        let socket = udp::bind(listen)?;
        let state = udp::batching_state(&socket)?;
        let tx = SendBatch::new(state.max_gso_segments(), listen.is_ipv6());
        Ok(Relay {
            socket: udp::register(socket)?,
            state,
            upstream,
            tx,
            client: None,
        })
    }

    /// The address the relay listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.get_ref().local_addr()
    }

    /// Relays until the socket fails.
    pub async fn run(mut self) -> io::Result<()> {
        let mut bufs = vec![vec![0u8; MAX_DATAGRAM + 1]; RX_SLOTS];
        loop {
            self.socket.readable().await?.retain_ready();
            self.read(&mut bufs);
            self.tx.flush(self.socket.get_ref(), &self.state);
        }
    }

    /// Reads up to [`BATCHES`] batches and queues every datagram for its way on.
    /// A batch that comes back short clears the socket's readiness, as a tunnel's
    /// does: the next datagram raises it again.
    fn read(&mut self, bufs: &mut [Vec<u8>]) {
        let Relay {
            socket,
            state,
            upstream,
            tx,
            client,
        } = self;
        let mut meta = [quinn_udp::RecvMeta::default(); RX_SLOTS];
        for _ in 0..BATCHES {
            let outcome = socket.try_io(tokio::io::Interest::READABLE, |inner| {
                let count = udp::recv_batch(inner, state, bufs, &mut meta)?;
                for (m, buf) in meta.iter().zip(bufs.iter()).take(count) {
                    for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                        if m.addr != *upstream {
                            *client = Some(m.addr);
                            tx.push(*upstream, None, datagram);
                        } else if let Some(to) = *client {
                            tx.push(to, None, datagram);
                        }
                    }
                }
                if count < RX_SLOTS {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match outcome {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors from earlier sends surface here on Linux; skip them.
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Duration;

    use super::Relay;

    fn socket() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn recv(s: &UdpSocket) -> (Vec<u8>, std::net::SocketAddr) {
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf).expect("a datagram within 5 s");
        (buf[..n].to_vec(), from)
    }

    /// Datagrams go upstream unchanged and in order; the upstream's answers go
    /// to the last client that spoke.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn relays_both_ways_to_the_last_client() {
        let upstream = socket();
        let relay = Relay::bind(
            "127.0.0.1:0".parse().unwrap(),
            upstream.local_addr().unwrap(),
        )
        .unwrap();
        let at = relay.local_addr().unwrap();
        let task = tokio::spawn(relay.run());

        let result = tokio::task::spawn_blocking(move || {
            let phone = socket();
            for i in 0..100u8 {
                phone.send_to(&[i; 148], at).unwrap();
            }
            for i in 0..100u8 {
                assert_eq!(recv(&upstream), (vec![i; 148], at), "datagram {i}");
            }
            upstream.send_to(b"answer", at).unwrap();
            assert_eq!(recv(&phone), (b"answer".to_vec(), at));

            let other = socket();
            other.send_to(b"roamed", at).unwrap();
            assert_eq!(recv(&upstream).0, b"roamed");
            upstream.send_to(b"to the new one", at).unwrap();
            assert_eq!(recv(&other).0, b"to the new one");
        })
        .await;
        task.abort();
        result.unwrap();
    }
}
