//! A tunnel's UDP socket: bound with large buffers, registered with tokio for
//! reading only.
//!
//! Sends never wait for the socket: a datagram the kernel refuses is dropped and
//! counted, as a link drops. So a tunnel has no use for write readiness, and
//! registering for it costs wake-ups. Every datagram a tunnel sends is charged to
//! its socket until the receiver has read it; each time one is freed, the kernel
//! reports the socket writable again (`EPOLLOUT`). Registered for both directions
//! (what `tokio::net::UdpSocket` does), that event wakes the tunnel's worker out of
//! `epoll_wait` for nothing, as often as the receiving side reads.
//!
//! Leaves out reading and writing: `tunnel` reads, `sendbatch` writes.

use std::io;
use std::net::SocketAddr;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A tunnel's socket, readable readiness only. Sends use the socket directly.
pub type TunnelSocket = AsyncFd<std::net::UdpSocket>;

/// Socket buffers requested for tunnel sockets: bursts of a few thousand datagrams
/// must not be dropped by the kernel while the task is busy. The kernel caps the
/// request at `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER: usize = 8 * 1024 * 1024;

/// Binds a tunnel's UDP socket with large buffers, non-blocking.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, it only drops earlier.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Registers a non-blocking socket with the current tokio runtime, for reading.
pub fn register(socket: std::net::UdpSocket) -> io::Result<TunnelSocket> {
    // SAFETY: the `AsyncFd` owns the socket, so its descriptor stays open and
    // the same for as long as the registration lives.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// The socket reports readable when a datagram comes; a send never needs to
    /// wait for it.
    #[tokio::test]
    async fn reads_by_readiness_and_sends_without_it() {
        let socket = super::register(super::bind("127.0.0.1:0".parse().unwrap()).unwrap())
            .expect("register");
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = socket.get_ref().local_addr().unwrap();
        socket
            .get_ref()
            .send_to(b"out", peer.local_addr().unwrap())
            .expect("sent with no write readiness");
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(peer.recv(&mut buf).unwrap(), 3);
        peer.send_to(b"in", at).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let mut guard = socket.readable().await.expect("readable");
                match guard.try_io(|s| s.get_ref().recv(&mut buf)) {
                    Ok(result) => break result,
                    Err(_would_block) => continue,
                }
            }
        })
        .await
        .expect("readable within 2 s");
        assert_eq!(got.unwrap(), 2);
    }
}
