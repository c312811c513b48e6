//! A tunnel's UDP socket: bound with large buffers, registered with tokio for
//! reading only, without the control messages quinn-udp turns on for QUIC.
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
    warn_if_capped(socket.recv_buffer_size(), socket.send_buffer_size());
    socket.set_nonblocking(true)?;
    // `::` takes IPv4 too, whatever `net.ipv6.bindv6only` says.
    if let SocketAddr::V6(v6) = addr {
        if v6.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Datagrams the kernel dropped at `socket` since it was opened, before the
/// appliance read them (its receive buffer full, a flood): `SO_MEMINFO`'s
/// drop count, which wraps at 2^32. 0 where the kernel does not say.
pub fn receive_drops(socket: &std::net::UdpSocket) -> u64 {
    use std::os::fd::AsRawFd;
    // SK_MEMINFO_VARS and SK_MEMINFO_DROPS of linux/sock_diag.h.
    const VARS: usize = 9;
    const DROPS: usize = 8;
    let mut info = [0u32; VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which lives
    // until the call returns, and sets `len` to what it wrote.
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if done != 0 || (len as usize) < (DROPS + 1) * std::mem::size_of::<u32>() {
        return 0;
    }
    u64::from(info[DROPS])
}

/// Below this, the buffers a tunnel socket got are worth a warning: the
/// kernel's default cap (`net.core.rmem_max` 212,992 bytes) holds about 140
/// full-size datagrams.
const UDP_BUFFER_LOW: usize = 1024 * 1024;

/// Says once per process when the kernel gave tunnel sockets small buffers
/// (Linux reports twice what it grants): bursts are then dropped in the
/// kernel, where no counter of ours sees them.
fn warn_if_capped(recv: io::Result<usize>, send: io::Result<usize>) {
    static SAID: std::sync::Once = std::sync::Once::new();
    let (Ok(recv), Ok(send)) = (recv, send) else {
        return;
    };
    if recv / 2 < UDP_BUFFER_LOW || send / 2 < UDP_BUFFER_LOW {
        SAID.call_once(|| {
            tracing::warn!(
                wanted_kib = UDP_BUFFER / 1024,
                receive_kib = recv / 2 / 1024,
                send_kib = send / 2 / 1024,
                "tunnel socket buffers capped by net.core.rmem_max / wmem_max: \
                 bursts may be dropped by the kernel; raise both to 8388608"
            );
        });
    }
}

/// Registers a non-blocking socket with the current tokio runtime, for reading.
pub fn register(socket: std::net::UdpSocket) -> io::Result<TunnelSocket> {
    // SAFETY: the `AsyncFd` owns the socket, so its descriptor stays open and
    // the same for as long as the registration lives.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Datagrams (or GRO trains) one [`recv_batch`] reads at most.
pub const RX_SLOTS: usize = 16;

/// Largest UDP payload: a receive buffer one byte longer holds any datagram or
/// GRO train whole.
pub const MAX_DATAGRAM: usize = 65_535;

/// One `recvmmsg` into `bufs` (one slot each, up to [`RX_SLOTS`]); returns how
/// many slots it filled, described by the same entries of `meta`.
#[inline]
pub fn recv_batch(
    socket: &std::net::UdpSocket,
    state: &quinn_udp::UdpSocketState,
    bufs: &mut [Vec<u8>],
    meta: &mut [quinn_udp::RecvMeta; RX_SLOTS],
) -> io::Result<usize> {
    let mut free = bufs.iter_mut();
    let mut slices: [std::io::IoSliceMut<'_>; RX_SLOTS] = std::array::from_fn(|_| {
        std::io::IoSliceMut::new(free.next().map_or(&mut [][..], |b| &mut b[..]))
    });
    state.recv(socket.into(), &mut slices, meta)
}

/// quinn-udp's state for `socket` (GSO and GRO probed), with what it sets up
/// for QUIC undone again (`quiet_control_messages`). Every WireGuard socket
/// that batches through quinn-udp is set up here.
pub fn batching_state(socket: &std::net::UdpSocket) -> io::Result<quinn_udp::UdpSocketState> {
    let state = quinn_udp::UdpSocketState::new(socket.into())?;
    let wildcard = socket.local_addr()?.ip().is_unspecified();
    quiet_control_messages(socket, wildcard);
    Ok(state)
}

/// Undoes what quinn-udp sets up for QUIC and a WireGuard tunnel must not have:
/// - the per-datagram control messages the tunnel never reads: the destination
///   address (`IP_PKTINFO`, with its IPv6 twin) unless `wildcard` (a socket
///   bound to a wildcard address reads it, so that replies leave from the
///   address the peer reached, as kernel WireGuard's do), the TOS/ECN byte
///   (`IP_RECVTOS`, with its IPv6 twin), and the receive time
///   (`SO_TIMESTAMPNS`). Each costs the kernel a
///   `put_cmsg` per received datagram; the timestamp also makes the kernel read
///   the clock for every packet the host receives, on any socket, for as long as
///   one socket asks for it.
/// - path-MTU probing (`IP_PMTUDISC_PROBE`: never fragment). A re-encrypted
///   full-size packet is 60 bytes larger than the peer's inner MTU; where the
///   path's MTU is smaller (1450 on VXLAN, 1460 on some clouds) it must leave in
///   fragments, as kernel WireGuard's do, not vanish with `EMSGSIZE`.
///
/// UDP GRO's segment size stays on. Best effort: a failure leaves an option as
/// it was.
fn quiet_control_messages(socket: &impl std::os::fd::AsRawFd, wildcard: bool) {
    let fd = socket.as_raw_fd();
    // 0 is "off", and IP(V6)_PMTUDISC_DONT for the MTU options.
    let off: libc::c_int = 0;
    let always = [
        (libc::IPPROTO_IP, libc::IP_RECVTOS),
        (libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS),
        (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
        (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
        (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER),
    ];
    // The destination address, which a wildcard socket keeps.
    let destination = [
        (libc::IPPROTO_IP, libc::IP_PKTINFO),
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    ];
    let destination = destination.iter().filter(|_| !wildcard);
    for &(level, name) in always.iter().chain(destination) {
        // SAFETY: `fd` is an open socket owned by `socket` for the duration of
        // the call; the option value is a live `c_int` of the size passed. An
        // option that does not apply to this socket's family fails harmlessly.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                std::ptr::addr_of!(off).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::{quiet_control_messages, receive_drops};

    /// What a full receive buffer dropped is counted by the kernel, and read
    /// back here.
    #[test]
    fn a_full_receive_buffer_counts_its_drops() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(4096)
            .expect("a small buffer");
        assert_eq!(receive_drops(&socket), 0);
        let to = socket.local_addr().expect("address");
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for _ in 0..200 {
            sender.send_to(&[0; 1000], to).expect("send");
        }
        // Loopback delivers as it sends, unless the kernel left the receive
        // work to its softirq thread on a busy machine: read until all 200
        // are accounted for, or 5 s.
        let mut buf = [0u8; 2048];
        socket.set_nonblocking(true).expect("non-blocking");
        let (mut kept, mut dropped) = (0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while kept + dropped < 200 && std::time::Instant::now() < deadline {
            while socket.recv(&mut buf).is_ok() {
                kept += 1;
            }
            dropped = receive_drops(&socket);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(kept > 0 && dropped > 0, "kept {kept}, dropped {dropped}");
        assert_eq!(kept + dropped, 200);
    }

    /// `--bind ::` serves IPv4 peers too, also on a host whose
    /// `net.ipv6.bindv6only` is 1 (set here in a private namespace).
    #[test]
    fn the_ipv6_wildcard_takes_ipv4_whatever_the_host_default() {
        let test = "the_ipv6_wildcard_takes_ipv4_whatever_the_host_default";
        crate::io::testnet::in_private_netns(test, 1500, || {
            if let Err(e) = std::fs::write("/proc/sys/net/ipv6/bindv6only", "1") {
                let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
                assert!(!ci, "{test}: /proc/sys is read-only under CI ({e})");
                eprintln!("SKIP {test}: cannot set net.ipv6.bindv6only ({e})");
                return;
            }
            let socket = super::bind("[::]:0".parse().unwrap()).expect("bind ::");
            let port = socket.local_addr().unwrap().port();
            let v4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            v4.send_to(b"hello", ("127.0.0.1", port)).unwrap();
            socket.set_nonblocking(false).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 16];
            let (n, from) = socket.recv_from(&mut buf).expect("the IPv4 datagram");
            assert_eq!(&buf[..n], b"hello");
            assert_eq!(from.port(), v4.local_addr().unwrap().port());
        });
    }

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

    fn option(socket: &std::net::UdpSocket, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a live socket, and a `c_int` with its size for the kernel to fill.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                level,
                name,
                std::ptr::addr_of_mut!(value).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt({level}, {name})");
        value
    }

    #[test]
    fn the_options_quinn_udp_turns_on_are_off_again() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let state = quinn_udp::UdpSocketState::new((&socket).into()).expect("quinn-udp state");
        assert_eq!(option(&socket, libc::IPPROTO_IP, libc::IP_PKTINFO), 1);
        assert_eq!(option(&socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS), 1);
        assert_eq!(
            option(&socket, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_PROBE
        );
        quiet_control_messages(&socket, false);
        assert_eq!(option(&socket, libc::IPPROTO_IP, libc::IP_PKTINFO), 0);
        assert_eq!(option(&socket, libc::IPPROTO_IP, libc::IP_RECVTOS), 0);
        assert_eq!(option(&socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS), 0);
        // Outer datagrams may be fragmented again (quinn-udp forbids it for QUIC).
        assert_eq!(
            option(&socket, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
            libc::IP_PMTUDISC_DONT
        );
        // GRO (the segment size of coalesced datagrams) stays as it was.
        assert_eq!(
            state.gro_segments() > 1,
            option(&socket, libc::SOL_UDP, libc::UDP_GRO) == 1
        );
    }
}
