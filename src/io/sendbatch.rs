//! A tunnel's outgoing datagrams for one wake-up, sent with as few syscalls as the
//! kernel allows.
//!
//! Consecutive datagrams of one size to one destination (a burst towards a
//! gateway) leave as one UDP GSO send. Runs of single datagrams to different
//! destinations (return traffic to many phones, cookie replies in a handshake
//! storm) leave together in one `sendmmsg`. The order of the datagrams is kept, so
//! every destination sees its datagrams in the order the engine sent them.
//!
//! Some NICs and drivers refuse segmentation offload, which Linux only reports
//! when a GSO send fails. quinn-udp then turns GSO off for the socket; the run
//! that failed goes again as single datagrams, and later runs stay single.
//! A GSO send cannot fragment either: where the path's MTU is smaller than a
//! segment (an underlay of 1450 bytes under a peer's 1420-byte tunnel), the
//! kernel refuses the run (`EMSGSIZE` since Linux 6.14 and its stable backports;
//! `EINVAL` before, on which quinn-udp turns GSO off as above). That run goes
//! again as single datagrams, which leave as fragments (the sockets do not set
//! DF), and the batch merges no datagram of that size or larger into a run
//! again, to any destination of the socket (the limit is the tunnel's, not
//! per peer: simple, and a path that small is the underlay's, not one peer's).
//!
//! On a socket bound to a wildcard address a datagram may carry its source, the
//! address the peer reached the tunnel at (`IP_PKTINFO`). Such datagrams go by
//! this module's own `sendmmsg`, GSO runs too, never by quinn-udp: the kernel
//! refuses a source the host lost with `EINVAL`, which quinn-udp would take for
//! offload trouble and turn GSO off for good. Single datagrams never go by
//! quinn-udp either, with a source or without: their `EINVAL` is about an
//! address (a destination port 0, say), not offload. A refused run becomes
//! singles that keep their source; a single refused for an address goes again
//! from the kernel's pick, and if it leaves from there, its source is left out
//! for 10 s (if not, the destination was at fault). A run refused with
//! `EINVAL` or `EIO` (offload trouble and a lost source look alike) ends GSO for
//! sourced datagrams for 10 s; they leave in `sendmmsg` batches meanwhile.
//!
//! A send never waits for the socket: one the kernel refuses (a full buffer) is
//! dropped and counted, as a link drops, so the socket is not watched for write
//! readiness at all (see `udp`).
//!
//! Not here: deciding what to send (the engine) and receiving.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Largest GSO send (the kernel's limit is 64 KiB of payload).
const MAX_GSO_BYTES: usize = 60_000;

/// Datagrams per `sendmmsg` call (the kernel takes up to 1024; the headers live
/// on the stack).
const MMSG: usize = 64;

/// Datagrams to send, gathered during one wake-up.
pub(crate) struct SendBatch {
    data: Vec<u8>,
    runs: Vec<Run>,
    max_segments: usize,
    /// Largest datagram that goes into a GSO run: one a size smaller than the
    /// smallest segment the path refused (`EMSGSIZE`).
    max_segment_len: usize,
    /// The socket is IPv6: IPv4 destinations go as IPv4-mapped addresses.
    v6: bool,
    /// Source addresses the kernel refused lately (a floating address moved
    /// away), with when they are tried again: datagrams queued from them go
    /// from the kernel's pick meanwhile.
    vanished: Vec<(IpAddr, Instant)>,
    /// Until when datagrams that carry a source are not merged into GSO runs:
    /// the kernel refused such a run with `EINVAL` or `EIO`, which says
    /// offload trouble or a lost source alike. They leave in `sendmmsg`
    /// batches meanwhile.
    sourced_runs_after: Option<Instant>,
    /// Until when refused sends are not logged again: the counter says how
    /// many, one line per [`FORGOTTEN`] says why.
    quiet_until: Option<Instant>,
}

/// How long a refused source address, or GSO for sourced datagrams after a
/// refused run, stays forgotten.
const FORGOTTEN: Duration = Duration::from_secs(10);

/// Refused source addresses remembered at most.
const VANISHED_MAX: usize = 16;

/// Datagrams `data[start..start + len]` to `to`, from the tunnel's own address
/// `src` (the kernel picks for `None`), cut every `segment` bytes.
#[derive(Clone, Copy)]
struct Run {
    to: SocketAddr,
    src: Option<IpAddr>,
    start: usize,
    len: usize,
    segment: usize,
}

impl Run {
    fn datagrams(&self) -> u64 {
        self.len.div_ceil(self.segment) as u64
    }

    fn segmented(&self) -> bool {
        self.len > self.segment
    }
}

impl SendBatch {
    /// An empty batch for a socket that takes GSO sends of up to `max_segments`
    /// datagrams (1: no GSO) and is bound to an IPv6 address if `v6`.
    pub(crate) fn new(max_segments: usize, v6: bool) -> Self {
        SendBatch {
            data: Vec::new(),
            runs: Vec::new(),
            max_segments: max_segments.max(1),
            max_segment_len: usize::MAX,
            v6,
            vanished: Vec::new(),
            sourced_runs_after: None,
            quiet_until: None,
        }
    }

    /// Queues one datagram to `to`, from the tunnel's own address `src` (where
    /// the socket is bound to a wildcard address; `None`: the kernel picks).
    pub(crate) fn push(&mut self, to: SocketAddr, src: Option<IpAddr>, datagram: &[u8]) {
        let src = src.filter(|s| self.present(*s));
        if let Some(run) = self.runs.last_mut() {
            let whole = run.len % run.segment == 0;
            if run.to == to
                && run.src == src
                && (src.is_none() || self.sourced_runs_after.is_none())
                && whole
                && datagram.len() <= run.segment
                && run.segment <= self.max_segment_len
                && run.len / run.segment < self.max_segments
                && run.len + datagram.len() <= MAX_GSO_BYTES
            {
                self.data.extend_from_slice(datagram);
                run.len += datagram.len();
                return;
            }
        }
        self.runs.push(Run {
            to,
            src,
            start: self.data.len(),
            len: datagram.len(),
            segment: datagram.len().max(1),
        });
        self.data.extend_from_slice(datagram);
    }

    /// False while `src` is among the sources the host lost. A loss is
    /// forgotten in time even on a tunnel quiet since: the clock is read only
    /// for such a source, never for the others.
    fn present(&mut self, src: IpAddr) -> bool {
        let Some(at) = self.vanished.iter().position(|(v, _)| *v == src) else {
            return true;
        };
        if Instant::now() < self.vanished[at].1 {
            return false;
        }
        self.vanished.swap_remove(at);
        true
    }

    /// Sends everything in order; returns how many datagrams the socket refused
    /// (full buffer, no route). They are dropped, as a link drops.
    pub(crate) fn flush(&mut self, socket: &UdpSocket, state: &quinn_udp::UdpSocketState) -> u64 {
        let mut failures = 0;
        let mut refusal = None;
        let mut i = 0;
        while i < self.runs.len() {
            let run = self.runs[i];
            if run.segmented() {
                let sent = match run.src {
                    // With a source, by this module's own `sendmmsg`: a source
                    // the host lost (EINVAL) must not make quinn-udp take it
                    // for offload trouble and turn GSO off for good.
                    Some(_) => {
                        send_many(socket.as_raw_fd(), &self.data, &[run], self.v6, &[]).map(|_| ())
                    }
                    None => {
                        let transmit = quinn_udp::Transmit {
                            destination: run.to,
                            ecn: None,
                            contents: &self.data[run.start..run.start + run.len],
                            segment_size: Some(run.segment),
                            src_ip: None,
                        };
                        state.try_send(socket.into(), &transmit)
                    }
                };
                match sent {
                    Ok(()) => {}
                    // A full buffer takes no single datagram either.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        failures += run.datagrams();
                        refusal = Some(e);
                    }
                    Err(e) => {
                        // Segmentation refused (offload off, or segments larger
                        // than the path takes): the run becomes single datagrams
                        // in its place, sent next as any others are. A run with
                        // a source keeps it: its singles tell whether the source
                        // is what the kernel refused.
                        match e.raw_os_error() {
                            Some(libc::EMSGSIZE) => {
                                tracing::info!(segment = run.segment,
                                    "the path takes no GSO runs of datagrams this large: they go one by one");
                                self.max_segment_len = self.max_segment_len.min(run.segment - 1);
                            }
                            Some(libc::EINVAL | libc::EIO) if run.src.is_some() => {
                                if self.sourced_runs_after.is_none() {
                                    tracing::info!(error = %e,
                                        "a GSO run with a source address was refused: such runs go as batches for 10 s");
                                }
                                self.sourced_runs_after = Some(Instant::now() + FORGOTTEN);
                            }
                            _ => {}
                        }
                        let Run {
                            to,
                            src,
                            start,
                            len,
                            segment,
                        } = run;
                        let singles = (start..start + len).step_by(segment).map(|at| {
                            let len = segment.min(start + len - at);
                            Run {
                                to,
                                src,
                                start: at,
                                len,
                                segment: len,
                            }
                        });
                        self.runs.splice(i..=i, singles);
                        continue;
                    }
                }
                i += 1;
                continue;
            }
            // Single datagrams up to the next GSO run: one `sendmmsg` per MMSG.
            let end = self.runs[i..]
                .iter()
                .position(Run::segmented)
                .map_or(self.runs.len(), |p| i + p);
            let singles = &self.runs[i..end];
            failures += send_singles(
                socket,
                &self.data,
                singles,
                self.v6,
                &mut self.vanished,
                &mut refusal,
            );
            i = end;
        }
        self.data.clear();
        self.runs.clear();
        if !self.vanished.is_empty() || self.sourced_runs_after.is_some() {
            let now = Instant::now();
            self.vanished.retain(|(_, until)| now < *until);
            self.sourced_runs_after = self.sourced_runs_after.filter(|until| now < *until);
        }
        // quinn-udp may have turned GSO off during this flush.
        let max_segments = state.max_gso_segments().max(1);
        if max_segments < self.max_segments {
            tracing::warn!(
                "the kernel refused a GSO send: this tunnel's socket sends without GSO from now on"
            );
        }
        self.max_segments = max_segments;
        if let Some(e) = refusal {
            self.say_refused(failures, &e);
        }
        failures
    }

    /// Says why the kernel refused datagrams (a full buffer, no route, a
    /// firewall's EPERM), at most once per [`FORGOTTEN`]; how many is counted.
    #[cold]
    fn say_refused(&mut self, refused: u64, e: &io::Error) {
        let now = Instant::now();
        if self.quiet_until.is_some_and(|until| now < until) {
            return;
        }
        self.quiet_until = Some(now + FORGOTTEN);
        tracing::warn!(refused, error = %e,
            "the kernel refused datagrams to peers: dropped, and counted in wgplane_datagrams_total{{direction=\"send_failed\"}} (said at most once per 10 s)");
    }
}

/// Sends single datagrams in order, [`MMSG`] per `sendmmsg`; returns how many
/// the socket refused (each is dropped, the rest go on). Never by quinn-udp,
/// which takes any `EINVAL` for offload trouble and turns GSO off for good,
/// though a single datagram's `EINVAL` is about its addresses.
fn send_singles(
    socket: &UdpSocket,
    data: &[u8],
    runs: &[Run],
    v6: bool,
    vanished: &mut Vec<(IpAddr, Instant)>,
    refusal: &mut Option<io::Error>,
) -> u64 {
    let fd = socket.as_raw_fd();
    let mut failures = 0;
    let mut i = 0;
    while i < runs.len() {
        let chunk = &runs[i..runs.len().min(i + MMSG)];
        match send_many(fd, data, chunk, v6, vanished) {
            Ok(n) if n > 0 => i += n,
            // The first datagram was refused, perhaps for its source address
            // (one the host no longer has): once more from whichever the
            // kernel picks. Otherwise drop it, go on with the rest.
            Err(e) if runs[i].src.is_some() && refuses_address(&e) => {
                let anywhere = Run {
                    src: None,
                    ..runs[i]
                };
                match send_many(fd, data, &[anywhere], v6, &[]) {
                    // Refused from there too: the destination's fault.
                    Ok(0) | Err(_) => {
                        failures += 1;
                        *refusal = Some(e);
                    }
                    Ok(_) => forget_source(vanished, runs[i].src, &e),
                }
                i += 1;
            }
            other => {
                failures += 1;
                i += 1;
                *refusal = Some(match other {
                    Err(e) => e,
                    Ok(_) => io::ErrorKind::WouldBlock.into(),
                });
            }
        }
    }
    failures
}

/// The kernel's refusal of a single datagram names one of its addresses: a
/// source the host does not have (EADDRNOTAVAIL; ENETUNREACH or EINVAL from
/// the route lookup), or a destination nothing reaches.
fn refuses_address(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
    )
}

/// Remembers `src` as gone, and says so, after a datagram refused from it
/// (see [`refuses_address`]) left from the kernel's pick: the next datagrams
/// go from there at once.
fn forget_source(vanished: &mut Vec<(IpAddr, Instant)>, src: Option<IpAddr>, e: &io::Error) {
    let Some(src) = src else {
        return;
    };
    if !vanished.iter().any(|(v, _)| *v == src) {
        tracing::warn!(source = %src, error = %e,
            "a tunnel address the host no longer has: replies that would leave from it leave from the kernel's pick for 10 s");
        if vanished.len() >= VANISHED_MAX {
            vanished.remove(0);
        }
        vanished.push((src, Instant::now() + FORGOTTEN));
    }
}

/// Room for a message's control messages: its source address (`IP_PKTINFO`
/// or `IPV6_PKTINFO`, 32 or 40 bytes with its header) and, for a GSO run, the
/// segment size (`UDP_SEGMENT`, 24 bytes); aligned as the kernel reads them.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// Gives `header` its control messages, written into `control`: the source
/// `src`, and the segment size for a run cut every `segment` bytes.
///
/// # Safety
/// `control` must outlive every use of `header` by the kernel.
unsafe fn set_control(
    header: &mut libc::msghdr,
    control: &mut std::mem::MaybeUninit<Control>,
    src: IpAddr,
    segment: Option<u16>,
) {
    let control = control.write(Control([0; 64]));
    let base = control.0.as_mut_ptr();
    let (level, kind, len) = match src {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_PKTINFO,
            std::mem::size_of::<libc::in_pktinfo>() as u32,
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_PKTINFO,
            std::mem::size_of::<libc::in6_pktinfo>() as u32,
        ),
    };
    // SAFETY (this block and below): every header and its data lie within the
    // 64 aligned bytes of `control` (at most 40 + 24), each header at an
    // aligned offset; the data are written unaligned.
    let first = base.cast::<libc::cmsghdr>();
    (*first).cmsg_level = level;
    (*first).cmsg_type = kind;
    (*first).cmsg_len = libc::CMSG_LEN(len) as _;
    let data = base.add(libc::CMSG_LEN(0) as usize);
    match src {
        IpAddr::V4(v4) => std::ptr::write_unaligned(
            data.cast::<libc::in_pktinfo>(),
            libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            },
        ),
        IpAddr::V6(v6) => std::ptr::write_unaligned(
            data.cast::<libc::in6_pktinfo>(),
            libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                ipi6_ifindex: 0,
            },
        ),
    }
    // The last message counts its length, not its padding: a lone IPv6 source
    // (36 bytes) then fits the kernel's buffer on its stack.
    let mut total = libc::CMSG_LEN(len) as usize;
    if let Some(segment) = segment {
        let offset = libc::CMSG_SPACE(len) as usize;
        let second = base.add(offset).cast::<libc::cmsghdr>();
        (*second).cmsg_level = libc::SOL_UDP;
        (*second).cmsg_type = libc::UDP_SEGMENT;
        (*second).cmsg_len = libc::CMSG_LEN(2) as _;
        let data = base.add(offset + libc::CMSG_LEN(0) as usize);
        std::ptr::write_unaligned(data.cast::<u16>(), segment);
        total = offset + libc::CMSG_LEN(2) as usize;
    }
    header.msg_control = base.cast();
    header.msg_controllen = total as _;
}

/// One `sendmmsg` of single datagrams (at most [`MMSG`]), or of one GSO run
/// that carries a source address; returns how many the kernel took from the
/// front. nix's `sendmmsg` is not used: it allocates, and its
/// count of sent messages comes from an iterator that reads receive addresses.
fn send_many(
    fd: RawFd,
    data: &[u8],
    runs: &[Run],
    v6: bool,
    vanished: &[(IpAddr, Instant)],
) -> io::Result<usize> {
    let n = runs.len().min(MMSG);
    let addresses: [Option<socket2::SockAddr>; MMSG] = std::array::from_fn(|k| {
        runs.get(k).map(|r| {
            socket2::SockAddr::from(match r.to {
                SocketAddr::V4(v4) if v6 => {
                    SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
                }
                other => other,
            })
        })
    });
    let mut iovecs: [libc::iovec; MMSG] = std::array::from_fn(|k| match runs.get(k) {
        Some(run) => libc::iovec {
            iov_base: data[run.start..run.start + run.len]
                .as_ptr()
                .cast_mut()
                .cast(),
            iov_len: run.len,
        },
        None => libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
    });
    // Written only for the messages that carry a source.
    let mut controls: [std::mem::MaybeUninit<Control>; MMSG] =
        [const { std::mem::MaybeUninit::uninit() }; MMSG];
    // SAFETY: an all-zero `mmsghdr` is a valid empty header (null pointers,
    // zero lengths).
    let mut headers: [libc::mmsghdr; MMSG] = unsafe { std::mem::zeroed() };
    let each = headers
        .iter_mut()
        .zip(&addresses)
        .zip(&mut iovecs)
        .zip(&mut controls);
    for (((header, address), iovec), (run, control)) in
        each.zip(runs).take(n).map(|(h, r)| (h.0, (r, h.1)))
    {
        let Some(address) = address else { break };
        header.msg_hdr.msg_name = address.as_ptr().cast_mut().cast();
        header.msg_hdr.msg_namelen = address.len();
        header.msg_hdr.msg_iov = iovec;
        header.msg_hdr.msg_iovlen = 1;
        // A source found gone earlier in this flush is left out at once.
        if let Some(src) = run.src.filter(|s| !vanished.iter().any(|(v, _)| v == s)) {
            // A GSO run (from `flush`) carries its segment size too.
            let segment = run.segmented().then_some(run.segment as u16);
            // SAFETY: `controls` lives on this stack frame until the call ends.
            unsafe { set_control(&mut header.msg_hdr, control, src, segment) };
        }
    }
    // A signal may interrupt the call before it sent anything.
    loop {
        // SAFETY: the first `n` headers point at live addresses, iovecs and
        // control messages on this stack frame, and the iovecs at `data`,
        // which the kernel only reads; all outlive the call.
        let sent = unsafe { libc::sendmmsg(fd, headers.as_mut_ptr(), n as libc::c_uint, 0) };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{SendBatch, FORGOTTEN, MMSG};
    use std::io::Write as _;
    use std::net::{IpAddr, SocketAddr};
    use std::time::{Duration, Instant};

    fn receiver(addr: &str) -> std::net::UdpSocket {
        let socket = std::net::UdpSocket::bind(addr).expect("bind loopback");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(1 << 20)
            .expect("receive buffer");
        socket
    }

    /// Everything `socket` has, as (length, first byte) in arrival order.
    fn drain(socket: &std::net::UdpSocket, expect: usize) -> Vec<(usize, u8)> {
        let mut buf = [0u8; 2048];
        (0..expect)
            .map(|_| {
                let n = socket.recv(&mut buf).expect("datagram within 2 s");
                (n, buf[0])
            })
            .collect()
    }

    async fn check(bind: &str, peers: &str, v6: bool) {
        let socket = std::net::UdpSocket::bind(bind).expect("bind loopback");
        let state = quinn_udp::UdpSocketState::new((&socket).into()).expect("quinn-udp state");
        let a = receiver(peers);
        let b = receiver(peers);
        let (to_a, to_b): (SocketAddr, SocketAddr) = (
            a.local_addr().expect("address"),
            b.local_addr().expect("address"),
        );
        let mut batch = SendBatch::new(state.max_gso_segments(), v6);
        // A GSO run to a, singles alternating between a and b (more than one
        // sendmmsg's worth), another run to a, a single to b: each must see its
        // datagrams in order.
        let mut sent_a = Vec::new();
        let mut sent_b = Vec::new();
        let mut seq = 0u8;
        let mut send = |batch: &mut SendBatch, to: SocketAddr, len: usize| {
            batch.push(to, None, &vec![seq; len]);
            if to == to_a {
                sent_a.push((len, seq));
            } else {
                sent_b.push((len, seq));
            }
            seq = seq.wrapping_add(1);
        };
        for _ in 0..3 {
            send(&mut batch, to_a, 1200);
        }
        for k in 0..MMSG + 10 {
            send(&mut batch, if k % 2 == 0 { to_a } else { to_b }, 100 + k);
        }
        for _ in 0..2 {
            send(&mut batch, to_a, 900);
        }
        // And a lone single at the end (plain sendmsg).
        send(&mut batch, to_b, 50);
        assert_eq!(batch.flush(&socket, &state), 0);
        assert_eq!(drain(&a, sent_a.len()), sent_a);
        assert_eq!(drain(&b, sent_b.len()), sent_b);
        assert!(batch.runs.is_empty() && batch.data.is_empty());
    }

    /// On a socket bound to a wildcard address, replies leave from the address
    /// the peer sent to, not from the one the kernel would pick: a peer whose
    /// socket is connected to that address (as a NAT's mapping is) gets them,
    /// as GSO runs, as singles in one `sendmmsg`, and alone; over IPv4 (also
    /// on a dual-stack socket) and IPv6. A source the host does not have gives
    /// way to the kernel's pick, is skipped from then on, and leaves GSO on.
    #[test]
    fn replies_leave_from_the_address_the_peer_reached() {
        let test = "replies_leave_from_the_address_the_peer_reached";
        let cases = [
            ("0.0.0.0:0", "127.0.0.1:0", "127.0.0.5", "10.9.9.9"),
            ("[::]:0", "127.0.0.1:0", "127.0.0.5", "10.9.9.9"),
            ("[::]:0", "[::1]:0", "fd00::5", "fd00::9"),
        ];
        for (bind, peer_at, dialled, gone) in cases {
            crate::io::testnet::in_private_netns(test, 1500, || {
                // A second IPv6 address on loopback, which the kernel would not
                // pick to answer ::1 from.
                let added = std::process::Command::new("ip")
                    .args(["-6", "address", "add", "fd00::5/128", "dev", "lo", "nodad"])
                    .status();
                assert!(added.is_ok_and(|s| s.success()), "ip -6 address add");
                let socket = crate::io::udp::bind(bind.parse().unwrap()).expect("bind");
                socket.set_nonblocking(false).unwrap();
                let state = crate::io::udp::batching_state(&socket).expect("state");
                let gso = state.max_gso_segments();
                let port = socket.local_addr().unwrap().port();
                let dialled: IpAddr = dialled.parse().unwrap();
                let peers: Vec<_> = (0..2)
                    .map(|_| {
                        let peer = receiver(peer_at);
                        peer.connect((dialled, port)).expect("connect");
                        peer.send(b"hello").expect("send");
                        peer
                    })
                    .collect();
                let mut bufs = vec![vec![0u8; 2048]; crate::io::udp::RX_SLOTS];
                let mut meta = [quinn_udp::RecvMeta::default(); crate::io::udp::RX_SLOTS];
                let mut heard = Vec::new();
                while heard.len() < 2 {
                    let n = crate::io::udp::recv_batch(&socket, &state, &mut bufs, &mut meta)
                        .expect("the hellos");
                    // As the engine keeps them: canonical.
                    heard.extend(
                        meta[..n]
                            .iter()
                            .map(|m| (m.addr, m.dst_ip.map(|a| a.to_canonical()))),
                    );
                }
                let v6 = bind.starts_with('[');
                let mut batch = SendBatch::new(gso, v6);
                for &(to, at) in &heard {
                    assert_eq!(at, Some(dialled), "{bind} {peer_at}");
                    for _ in 0..3 {
                        batch.push(to, at, &[7; 1000]); // a GSO run
                    }
                }
                for &(to, at) in heard.iter().chain(&heard) {
                    batch.push(to, at, &[8; 100]); // singles, one sendmmsg
                }
                batch.push(heard[0].0, heard[0].1, &[9; 50]); // alone
                assert_eq!(batch.flush(&socket, &state), 0, "{bind} {peer_at}");
                for (k, peer) in peers.iter().enumerate() {
                    let mut expect = vec![(1000, 7); 3];
                    expect.extend([(100, 8), (100, 8)]);
                    if heard[0].0.port() == peer.local_addr().unwrap().port() {
                        expect.push((50, 9));
                    }
                    assert_eq!(
                        drain(peer, expect.len()),
                        expect,
                        "{bind} {peer_at}, peer {k}"
                    );
                }
                // An address the host does not have: sent from the kernel's pick,
                // a run and a single, with GSO still on afterwards.
                let plain = receiver(peer_at);
                let gone: Option<IpAddr> = Some(gone.parse().unwrap());
                for _ in 0..3 {
                    batch.push(plain.local_addr().unwrap(), gone, &[1; 600]);
                }
                assert_eq!(batch.flush(&socket, &state), 0, "{bind} {peer_at}");
                assert_eq!(drain(&plain, 3), [(600, 1); 3]);
                assert_eq!(state.max_gso_segments(), gso, "GSO stays on");
                // And skipped from then on.
                batch.push(plain.local_addr().unwrap(), gone, &[2; 10]);
                assert_eq!(batch.runs[0].src, None);
                assert_eq!(batch.flush(&socket, &state), 0);
                assert_eq!(drain(&plain, 1), [(10, 2)]);
            });
        }
    }

    /// A lost source is skipped for [`FORGOTTEN`], and tried again after it
    /// even when no flush ran meanwhile (a tunnel quiet since).
    #[test]
    fn a_lost_source_is_tried_again_once_forgotten_however_quiet_the_tunnel() {
        let to: SocketAddr = "198.51.100.2:51820".parse().unwrap();
        let (lost, other): (IpAddr, IpAddr) = (
            "203.0.113.5".parse().unwrap(),
            "203.0.113.6".parse().unwrap(),
        );
        let mut batch = SendBatch::new(1, false);
        batch.vanished.push((lost, Instant::now() + FORGOTTEN));
        batch.push(to, Some(lost), &[1; 10]);
        batch.push(to, Some(other), &[2; 10]);
        assert_eq!(batch.runs[0].src, None, "still lost");
        assert_eq!(batch.runs[1].src, Some(other));

        let long_ago = Instant::now().checked_sub(Duration::from_secs(1)).unwrap();
        batch.vanished[0].1 = long_ago;
        batch.push(to, Some(lost), &[3; 10]);
        assert_eq!(batch.runs[2].src, Some(lost), "forgotten: tried again");
        assert!(batch.vanished.is_empty());
    }

    /// A datagram to port 0 (an answer to a forged source) is refused by the
    /// kernel with `EINVAL`, which is about its destination: GSO stays on,
    /// the source the datagram carried is not taken for lost, and the next
    /// datagrams leave from it as before.
    #[test]
    fn a_destination_the_kernel_refuses_costs_neither_gso_nor_the_source() {
        for bind in ["127.0.0.1:0", "0.0.0.0:0"] {
            let socket = crate::io::udp::bind(bind.parse().unwrap()).expect("bind");
            let state = crate::io::udp::batching_state(&socket).expect("state");
            let gso = state.max_gso_segments();
            let src: Option<IpAddr> = bind.starts_with("0.").then(|| "127.0.0.1".parse().unwrap());
            let mut batch = SendBatch::new(gso, false);
            let nowhere: SocketAddr = "127.0.0.1:0".parse().unwrap();
            batch.push(nowhere, src, &[1; 100]);
            assert_eq!(batch.flush(&socket, &state), 1, "{bind}: refused");
            let said = batch.quiet_until.expect("the refusal is logged");
            assert_eq!(batch.flush(&socket, &state), 0);
            batch.push(nowhere, src, &[1; 100]);
            assert_eq!(batch.flush(&socket, &state), 1, "{bind}: refused again");
            assert_eq!(batch.quiet_until, Some(said), "{bind}: not logged again");
            assert!(
                batch.vanished.is_empty(),
                "{bind}: the source is still ours"
            );
            assert_eq!(state.max_gso_segments(), gso, "{bind}: GSO stays on");
            assert_eq!(batch.max_segments, gso.max(1), "{bind}");
            let plain = receiver("127.0.0.1:0");
            batch.push(plain.local_addr().unwrap(), src, &[2; 10]);
            assert_eq!(batch.runs[0].src, src, "{bind}");
            assert_eq!(batch.flush(&socket, &state), 0, "{bind}");
            assert_eq!(drain(&plain, 1), [(10, 2)], "{bind}");
        }
    }

    #[tokio::test]
    async fn runs_and_singles_arrive_complete_and_in_order() {
        check("127.0.0.1:0", "127.0.0.1:0", false).await;
    }

    /// A GSO send the kernel refuses (here: more segments than it takes in one
    /// send) is not lost: it goes again as single datagrams, and GSO stays off.
    #[tokio::test]
    async fn a_refused_gso_send_goes_again_datagram_by_datagram() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
        let state = quinn_udp::UdpSocketState::new((&socket).into()).expect("quinn-udp state");
        if state.max_gso_segments() <= 1 {
            // No GSO on this machine: nothing to refuse. Said, not silent.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP a_refused_gso_send_goes_again_datagram_by_datagram: no UDP GSO here"
            );
            return;
        }
        let a = receiver("127.0.0.1:0");
        let to_a = a.local_addr().expect("address");
        // 130 segments: above the kernel's UDP_MAX_SEGMENTS (64; 128 in newer
        // kernels). Small ones, so that all fit the receiver's buffer.
        let mut batch = SendBatch::new(130, false);
        let sent: Vec<(usize, u8)> = (0..130).map(|k| (10, k as u8)).collect();
        for (len, seq) in &sent {
            batch.push(to_a, None, &vec![*seq; *len]);
        }
        assert_eq!(batch.runs.len(), 1, "one GSO run");
        assert_eq!(batch.flush(&socket, &state), 0);
        assert_eq!(drain(&a, sent.len()), sent);
        assert_eq!(state.max_gso_segments(), 1, "quinn-udp turned GSO off");
        assert_eq!(batch.max_segments, 1, "and so does the batch");
    }

    /// A path whose MTU is below a segment (an underlay of 1300 bytes here, a
    /// 1400-byte datagram) refuses GSO sends: the run goes again as single
    /// datagrams, which leave as fragments, and such datagrams are not merged
    /// into runs again, while smaller ones still are.
    #[test]
    fn runs_larger_than_the_path_takes_go_as_fragmented_singles() {
        let test = "runs_larger_than_the_path_takes_go_as_fragmented_singles";
        crate::io::testnet::in_private_netns(test, 1300, || {
            let socket = crate::io::udp::bind("127.0.0.1:0".parse().expect("address"))
                .expect("tunnel socket");
            let state = crate::io::udp::batching_state(&socket).expect("quinn-udp state");
            if state.max_gso_segments() <= 1 {
                let _ = writeln!(std::io::stderr(), "SKIP {test}: no UDP GSO here");
                return;
            }
            let a = receiver("127.0.0.1:0");
            let to_a = a.local_addr().expect("address");
            let mut batch = SendBatch::new(state.max_gso_segments(), false);
            let mut sent = Vec::new();
            for round in 0..2u8 {
                for k in 0..4 {
                    let seq = round * 10 + k;
                    batch.push(to_a, None, &[seq; 1400]);
                    sent.push((1400, seq));
                }
                let runs = batch.runs.len();
                assert_eq!(batch.flush(&socket, &state), 0, "round {round}");
                assert_eq!(drain(&a, sent.len()), sent, "round {round}");
                assert_eq!(runs, if round == 0 { 1 } else { 4 }, "round {round}");
                sent.clear();
            }
            // Kernels since 6.14 (and stable backports) refuse with EMSGSIZE and
            // GSO stays on for smaller datagrams; older ones say EINVAL, on
            // which quinn-udp turns GSO off for the socket: singles from then on.
            if state.max_gso_segments() <= 1 {
                let _ = writeln!(
                    std::io::stderr(),
                    "{test}: this kernel refused with EINVAL: GSO is off"
                );
                return;
            }
            for seq in 0..4 {
                batch.push(to_a, None, &[seq; 1000]);
            }
            assert_eq!(batch.runs.len(), 1, "smaller datagrams still go as a run");
            assert_eq!(batch.flush(&socket, &state), 0);
            assert_eq!(drain(&a, 4), (0..4).map(|k| (1000, k)).collect::<Vec<_>>());
        });
    }

    #[tokio::test]
    async fn ipv4_destinations_from_a_dual_stack_socket() {
        // An IPv6 socket sends to IPv4 peers as IPv4-mapped addresses.
        if std::net::UdpSocket::bind("[::]:0").is_err() {
            // No IPv6 on this machine (common in containers): said, not silent.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP ipv4_destinations_from_a_dual_stack_socket: no IPv6 here"
            );
            return;
        }
        check("[::]:0", "127.0.0.1:0", true).await;
    }
}
