//! Byte pipes between host TCP connections and the local stack's TCP connections.
//!
//! The tunnel task owns the stack; each forwarded connection has a reader task
//! (host -> stack) and a writer task (stack -> host) on the other end of two small
//! bounded channels. Back-pressure is end to end: the tunnel task takes host bytes
//! only while the stack has send room, so a slow router stops the reader; and it
//! reads from the stack only while the writer's channel has room, so a slow host
//! lets smoltcp's receive window close towards the router.
//!
//! Left out: accepting connections and their limits (`forward`), and the TCP
//! itself (the stack's, `core::netstack`).

use std::collections::BTreeMap;

use tokio::sync::{mpsc, oneshot};

use crate::core::netstack::{ConnId, ConnState, LocalStack};

/// Chunks in flight per direction and connection.
pub const PIPE_DEPTH: usize = 8;

/// Bytes per chunk read from the stack.
const CHUNK: usize = 64 * 1024;

/// Why a forwarded connection did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The router refused or did not answer within the stack's timeout.
    #[error("{0} refused the connection or did not answer")]
    Unreachable(std::net::SocketAddrV4),
    /// The tunnel has no userspace stack (TUN mode) or is gone.
    #[error("the tunnel cannot open connections")]
    NoStack,
    /// The tunnel's stack carries as many connections as it may.
    #[error("the tunnel has too many open connections")]
    Busy,
}

/// The tunnel task's ends of one forwarded connection.
pub struct HostPipes {
    /// Bytes from the host client, to send to the router.
    pub from_host: mpsc::Receiver<Vec<u8>>,
    /// Bytes from the router, for the host client. Dropped at the router's FIN.
    pub to_host: mpsc::Sender<Vec<u8>>,
    /// Answered once: connected, or why not.
    pub opened: oneshot::Sender<Result<(), ForwardError>>,
}

struct Bridge {
    remote: std::net::SocketAddrV4,
    from_host: mpsc::Receiver<Vec<u8>>,
    pending: Option<(Vec<u8>, usize)>,
    host_eof: bool,
    fin_sent: bool,
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    opened: Option<oneshot::Sender<Result<(), ForwardError>>>,
}

/// Every forwarded connection of one tunnel.
#[derive(Default)]
pub struct Bridges {
    bridges: BTreeMap<ConnId, Bridge>,
    buf: Vec<u8>,
}

impl Bridges {
    /// Tracks a connection the stack just opened.
    pub fn add(&mut self, id: ConnId, remote: std::net::SocketAddrV4, pipes: HostPipes) {
        self.bridges.insert(
            id,
            Bridge {
                remote,
                from_host: pipes.from_host,
                pending: None,
                host_eof: false,
                fin_sent: false,
                to_host: Some(pipes.to_host),
                opened: Some(pipes.opened),
            },
        );
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.bridges.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.bridges.is_empty()
    }

    /// Moves bytes both ways as far as buffers allow and retires finished
    /// connections. The caller then lets the engine send what the stack queued.
    pub fn pump(&mut self, stack: &mut LocalStack) {
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
        let mut done = Vec::new();
        for (&id, b) in &mut self.bridges {
            let state = stack.state(id);
            match state {
                ConnState::Connecting => continue,
                ConnState::Closed if b.opened.is_some() => {
                    if let Some(opened) = b.opened.take() {
                        let _ = opened.send(Err(ForwardError::Unreachable(b.remote)));
                    }
                    done.push(id);
                    continue;
                }
                _ => {
                    if let Some(opened) = b.opened.take() {
                        let _ = opened.send(Ok(()));
                    }
                }
            }

            // Host -> stack, while the stack has room.
            loop {
                if b.pending.is_none() && !b.host_eof {
                    match b.from_host.try_recv() {
                        Ok(chunk) => b.pending = Some((chunk, 0)),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => b.host_eof = true,
                    }
                }
                let Some((chunk, offset)) = &mut b.pending else {
                    break;
                };
                let sent = stack.send(id, &chunk[*offset..]).unwrap_or(0);
                *offset += sent;
                if *offset < chunk.len() {
                    break;
                }
                b.pending = None;
            }
            if b.host_eof && b.pending.is_none() && !b.fin_sent {
                stack.close(id);
                b.fin_sent = true;
            }

            // Stack -> host, while the host side has room.
            if let Some(tx) = &b.to_host {
                // The host writer ended (its client went away): nobody will
                // read what the router sends, so the connection is reset.
                if tx.is_closed() {
                    done.push(id);
                    continue;
                }
                while let Ok(permit) = tx.try_reserve() {
                    match stack.recv(id, &mut self.buf) {
                        Ok(n) if n > 0 => permit.send(self.buf[..n].to_vec()),
                        _ => break,
                    }
                }
                // The router closed and everything it sent was handed over.
                if matches!(state, ConnState::PeerClosed | ConnState::Closed) && !stack.has_data(id)
                {
                    b.to_host = None;
                }
            }
            if b.to_host.is_none() && (b.fin_sent || state == ConnState::Closed) {
                done.push(id);
            }
        }
        for id in done {
            if let Some(b) = self.bridges.remove(&id) {
                if b.to_host.is_some() || !b.fin_sent {
                    // The router went away with the host still talking: reset.
                    stack.abort(id);
                }
            }
        }
        stack.reap();
    }
}

#[cfg(test)]
mod tests {
    //! The bridge against a smoltcp "router" running an echo server, wired
    //! back to back in memory with simulated time.
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::{Duration, Instant};

    use smoltcp::iface::{Config, Interface, SocketSet};

    use crate::core::netstack::Queues;
    use smoltcp::socket::tcp;
    use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

    use super::*;

    struct Router {
        iface: Interface,
        device: Queues,
        sockets: SocketSet<'static>,
        handle: smoltcp::iface::SocketHandle,
    }

    impl Router {
        fn new() -> Self {
            let mut device = Queues::default();
            let mut iface = Interface::new(
                Config::new(HardwareAddress::Ip),
                &mut device,
                smoltcp::time::Instant::ZERO,
            );
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::v4(10, 100, 1, 1), 16));
            });
            let mut sockets = SocketSet::new(Vec::new());
            let mut socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 65536]),
                tcp::SocketBuffer::new(vec![0; 65536]),
            );
            socket.listen(8728).unwrap();
            let handle = sockets.add(socket);
            Self {
                iface,
                device,
                sockets,
                handle,
            }
        }

        /// Takes packets from the appliance, runs, echoes, returns what it sends.
        fn exchange(&mut self, input: Vec<Vec<u8>>, at: smoltcp::time::Instant) -> Vec<Vec<u8>> {
            self.device.rx.extend(input);
            self.iface.poll(at, &mut self.device, &mut self.sockets);
            let s = self.sockets.get_mut::<tcp::Socket>(self.handle);
            let mut buf = [0u8; 4096];
            while s.can_recv() && s.send_capacity() - s.send_queue() >= buf.len() {
                let n = s.recv_slice(&mut buf).unwrap();
                s.send_slice(&buf[..n]).unwrap();
            }
            if !s.may_recv() && s.state() == tcp::State::CloseWait {
                s.close();
            }
            self.iface.poll(at, &mut self.device, &mut self.sockets);
            self.device.tx.drain(..).collect()
        }
    }

    /// One turn of the tunnel task: host pipes into the stack, the stack runs,
    /// what it sends reaches the router (when it is up) and its answers come
    /// back in.
    fn step(
        stack: &mut LocalStack,
        bridges: &mut Bridges,
        router: Option<&mut Router>,
        start: Instant,
        now: Instant,
    ) {
        bridges.pump(stack);
        stack.poll(now);
        let mut out = Vec::new();
        while let Some(p) = stack.poll_transmit() {
            out.push(p);
        }
        if let Some(router) = router {
            let at =
                smoltcp::time::Instant::from_micros(now.duration_since(start).as_micros() as i64);
            for p in router.exchange(out, at) {
                assert!(stack.receive(&p));
            }
        }
        stack.poll(now);
    }

    /// How a bridged connection's opening ends.
    type Opened = oneshot::Receiver<Result<(), ForwardError>>;

    /// Opens a stack connection to `remote` and bridges it to fresh host pipes:
    /// (host -> stack sender, stack -> host receiver, the open outcome).
    fn bridge(
        stack: &mut LocalStack,
        bridges: &mut Bridges,
        remote: SocketAddrV4,
        now: Instant,
    ) -> (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>, Opened) {
        let (to_stack, from_host) = mpsc::channel(PIPE_DEPTH);
        let (to_host, from_stack) = mpsc::channel(PIPE_DEPTH);
        let (opened, opened_rx) = oneshot::channel();
        let id = stack.connect(remote, now).unwrap();
        let pipes = HostPipes {
            from_host,
            to_host,
            opened,
        };
        bridges.add(id, remote, pipes);
        (to_stack, from_stack, opened_rx)
    }

    #[test]
    fn a_megabyte_echoes_intact_with_back_pressure() {
        let start = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, start);
        let mut router = Router::new();
        let mut bridges = Bridges::default();
        let remote = "10.100.1.1:8728".parse().unwrap();
        let (to_stack, mut from_stack, mut opened_rx) =
            bridge(&mut stack, &mut bridges, remote, start);

        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut offset = 0;
        let mut echoed = Vec::new();
        let mut now = start;
        let mut to_stack = Some(to_stack);
        for _ in 0..200_000 {
            now += Duration::from_millis(1);
            // The host writes in 16 KiB chunks while the pipe has room.
            if let Some(tx) = &to_stack {
                while offset < data.len() {
                    let end = (offset + 16384).min(data.len());
                    match tx.try_send(data[offset..end].to_vec()) {
                        Ok(()) => offset = end,
                        Err(_) => break,
                    }
                }
                if offset == data.len() {
                    to_stack = None; // host EOF
                }
            }
            step(&mut stack, &mut bridges, Some(&mut router), start, now);
            while let Ok(chunk) = from_stack.try_recv() {
                echoed.extend_from_slice(&chunk);
            }
            if echoed.len() == data.len() && bridges.is_empty() {
                break;
            }
        }
        assert_eq!(opened_rx.try_recv(), Ok(Ok(())));
        assert_eq!(echoed.len(), data.len());
        assert!(echoed == data, "echo is intact");
        // The stack closed first, so its socket is in TIME-WAIT: that holds no
        // place among the tunnel's connections.
        step(&mut stack, &mut bridges, Some(&mut router), start, now);
        assert_eq!(stack.connections(), 0, "nothing left after both FINs");
    }

    /// The host writer is gone while the router keeps sending: the stack
    /// connection is reset and forgotten instead of staying forever.
    #[test]
    fn a_connection_whose_host_writer_ended_is_reset() {
        let start = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, start);
        let mut router = Router::new();
        let mut bridges = Bridges::default();
        let remote = "10.100.1.1:8728".parse().unwrap();
        let (to_stack, from_stack, mut opened_rx) = bridge(&mut stack, &mut bridges, remote, start);
        let mut from_stack = Some(from_stack);
        let mut now = start;
        for i in 0..200 {
            now += Duration::from_millis(10);
            // The host reader stays; it sends a line now and then (echoed).
            let _ = to_stack.try_send(b"/system/resource/print\n".to_vec());
            if i == 50 {
                from_stack = None; // the writer ends (write error)
            }
            step(&mut stack, &mut bridges, Some(&mut router), start, now);
            if let Some(rx) = &mut from_stack {
                while rx.try_recv().is_ok() {}
            }
        }
        assert_eq!(opened_rx.try_recv(), Ok(Ok(())));
        assert!(bridges.is_empty(), "the bridge is gone");
        assert_eq!(stack.connections(), 0, "the connection was reset");
        assert!(to_stack.is_closed(), "the host reader is told");
    }

    /// A stack, a router, and a bridged connection to it whose host has just
    /// sent "hello".
    struct Hello {
        start: Instant,
        stack: LocalStack,
        router: Router,
        bridges: Bridges,
        /// Host -> stack.
        to_stack: mpsc::Sender<Vec<u8>>,
        /// Stack -> host.
        from_stack: mpsc::Receiver<Vec<u8>>,
    }

    fn hello() -> Hello {
        let start = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, start);
        let mut bridges = Bridges::default();
        let remote = "10.100.1.1:8728".parse().unwrap();
        let (to_stack, from_stack, _opened) = bridge(&mut stack, &mut bridges, remote, start);
        to_stack.try_send(b"hello".to_vec()).unwrap();
        Hello {
            start,
            stack,
            router: Router::new(),
            bridges,
            to_stack,
            from_stack,
        }
    }

    /// A connection given up on a quiet router (its host side went away) is
    /// reset at the router too, not left open there.
    #[test]
    fn a_connection_given_up_is_reset_at_a_quiet_router() {
        let Hello {
            start,
            mut stack,
            mut router,
            mut bridges,
            to_stack,
            mut from_stack,
        } = hello();
        let mut now = start;
        let mut run = |stack: &mut LocalStack, router: &mut Router, bridges: &mut Bridges| {
            for _ in 0..20 {
                now += Duration::from_millis(10);
                step(stack, bridges, Some(router), start, now);
            }
        };
        run(&mut stack, &mut router, &mut bridges);
        assert_eq!(from_stack.try_recv().as_deref(), Ok(&b"hello"[..]));
        let at_router = |r: &Router| r.sockets.get::<tcp::Socket>(r.handle).state();
        assert_eq!(at_router(&router), tcp::State::Established);
        // Both host ends go (the forward's client vanished); nothing is in flight.
        drop((to_stack, from_stack));
        run(&mut stack, &mut router, &mut bridges);
        assert!(bridges.is_empty());
        assert_eq!(stack.connections(), 0);
        assert_ne!(
            at_router(&router),
            tcp::State::Established,
            "the router was told"
        );
    }

    /// An idle connection stays open while the router answers the stack's
    /// keep-alive probes, and is given up once the router is gone.
    #[test]
    fn idle_connections_live_while_the_router_answers() {
        let Hello {
            start,
            mut stack,
            mut router,
            mut bridges,
            to_stack: _host_writes,
            mut from_stack,
        } = hello();
        let mut now = start;
        let mut run = |stack: &mut LocalStack, router_up: bool, seconds: u64| {
            for _ in 0..seconds * 10 {
                now += Duration::from_millis(100);
                let up = router_up.then_some(&mut router);
                step(stack, &mut bridges, up, start, now);
            }
        };
        run(&mut stack, true, 60);
        assert_eq!(from_stack.try_recv().as_deref(), Ok(&b"hello"[..]));
        assert_eq!(stack.state(1), ConnState::Open, "idle for a minute");
        run(&mut stack, false, 15);
        assert_eq!(stack.state(1), ConnState::Closed, "the router is gone");
        assert!(bridges.is_empty());
    }

    #[test]
    fn an_unreachable_router_is_reported() {
        let start = Instant::now();
        let mut stack = LocalStack::new(Ipv4Addr::new(10, 100, 0, 1), 16, start);
        let mut bridges = Bridges::default();
        let remote = "10.100.1.9:8728".parse().unwrap();
        let (_to_stack, _from_stack, mut opened_rx) =
            bridge(&mut stack, &mut bridges, remote, start);
        let mut now = start;
        for _ in 0..30 {
            now += Duration::from_secs(1);
            stack.poll(now);
            while stack.poll_transmit().is_some() {}
            bridges.pump(&mut stack);
        }
        assert_eq!(
            opened_rx.try_recv(),
            Ok(Err(ForwardError::Unreachable(remote)))
        );
        assert!(bridges.is_empty());
        assert_eq!(stack.connections(), 0);
    }
}
