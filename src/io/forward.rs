//! Management forwarding: a TCP listener on the host whose connections are carried
//! through a tunnel's userspace stack to one router's address and port, so the
//! backend reaches `10.100.1.1:8728` with no kernel route and no privileges.
//!
//! A forward owns its connections: closing or dropping it ends them too. It
//! carries at most [`MAX_CONNECTIONS`] at once and closes one that moved no
//! byte for [`IDLE_TIMEOUT`], so that nobody can hold the tunnel's stack, and
//! it warns about failed connections at most every 10 s.
//!
//! Left out: the bytes' way through the tunnel task and its stack (`bridge`),
//! TLS or any authentication (the listener is the operator's to bind where only
//! the backend reaches it), and UDP.

use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::{JoinHandle, JoinSet};

use super::bridge::{HostPipes, PIPE_DEPTH};
use super::tunnel::Command;

/// Bytes read from the host per chunk.
const READ_CHUNK: usize = 32 * 1024;

/// Connections one forward carries at once; more are closed as soon as they
/// are accepted. Well below what the tunnel's stack carries
/// ([`crate::core::netstack::MAX_CONNECTIONS`]), so that one forward's clients
/// leave room for the tenant's other forwards.
pub const MAX_CONNECTIONS: usize = 64;

/// A forwarded connection that moved no byte either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// TCP keep-alive on accepted connections: first probe after this much
/// silence, then every [`HOST_KEEPALIVE_INTERVAL`], [`HOST_KEEPALIVE_RETRIES`]
/// times, so a client that vanished is noticed within about 90 s.
const HOST_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
const HOST_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const HOST_KEEPALIVE_RETRIES: u32 = 3;

/// Pause after an accept failure that is not one connection's (out of file
/// descriptors or memory), doubled at each failure in a row up to
/// [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A forward logs failed connections at `warn` at most this often; the others
/// in between at `debug`, counted in its next warning. A client that connects
/// in a loop to a forward that cannot reach its router (or that its tunnel's
/// stack refuses, full) must not write the log at its connection rate.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The warnings of one forward's failed connections, at most one per
/// [`FAILURE_LOG_INTERVAL`].
#[derive(Default)]
struct FailureLog {
    /// When the last warning was written, and how many failures went
    /// unwarned since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl FailureLog {
    /// `Some(n)`: warn now, about this failure and `n` earlier ones that were
    /// not; `None`: this one only at `debug`.
    fn warn_now(&self, now: std::time::Instant) -> Option<u64> {
        let Ok(mut state) = self.state.lock() else {
            return Some(0);
        };
        let (last, unwarned) = &mut *state;
        if last.is_some_and(|at| now.saturating_duration_since(at) < FAILURE_LOG_INTERVAL) {
            *unwarned += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(unwarned))
    }
}

/// How much a forward carries (tests shrink them).
#[derive(Debug, Clone, Copy)]
struct Limits {
    connections: usize,
    idle: Duration,
}

const LIMITS: Limits = Limits {
    connections: MAX_CONNECTIONS,
    idle: IDLE_TIMEOUT,
};

/// A running forward; stops (and closes its port and its connections) when
/// dropped, at once with [`Forward::close`].
pub struct Forward {
    task: Option<JoinHandle<()>>,
    /// The bound listen address.
    pub listen: SocketAddr,
    /// Where connections go.
    pub target: SocketAddrV4,
}

impl Forward {
    /// True while its accept loop runs (it ends only by a bug, a panic).
    pub fn is_open(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the forward and returns once its listening port is closed and its
    /// connections are told to end (dropping only asks the task to stop).
    pub async fn close(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Cancelled: the task, the listener and the connections it owned
            // are gone.
            let _ = task.await;
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Binds `listen` and forwards every connection to `target` through the tunnel
/// whose task takes `commands` and wakes on `work`.
pub async fn start(
    listen: SocketAddr,
    target: SocketAddrV4,
    commands: mpsc::Sender<Command>,
    work: Arc<Notify>,
) -> std::io::Result<Forward> {
    start_with(listen, target, commands, work, LIMITS).await
}

async fn start_with(
    listen: SocketAddr,
    target: SocketAddrV4,
    commands: mpsc::Sender<Command>,
    work: Arc<Notify>,
    limits: Limits,
) -> std::io::Result<Forward> {
    let listener = TcpListener::bind(listen).await?;
    let listen = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // The connections' tasks: dropped with this task, which aborts them.
        let mut connections = JoinSet::new();
        let failures = Arc::new(FailureLog::default());
        let at_limit = FailureLog::default();
        loop {
            let (stream, from) = next_connection(|| listener.accept(), listen).await;
            while connections.try_join_next().is_some() {}
            if connections.len() >= limits.connections {
                match at_limit.warn_now(std::time::Instant::now()) {
                    Some(unwarned) => tracing::warn!(%listen, %from, limit = limits.connections,
                        earlier_closed_not_logged = unwarned,
                        "forward at its connection limit: a new connection was closed"),
                    None => {
                        tracing::debug!(%listen, %from, "forward at its connection limit; closed")
                    }
                }
                drop(stream);
                continue;
            }
            let (commands, work) = (commands.clone(), Arc::clone(&work));
            let failures = Arc::clone(&failures);
            connections.spawn(async move {
                let Err(e) = serve(stream, target, commands, work, limits.idle).await else {
                    return;
                };
                match failures.warn_now(std::time::Instant::now()) {
                    Some(unwarned) => tracing::warn!(%listen, %from, %target, error = %e,
                        earlier_failures_not_logged = unwarned, "forwarded connection failed"),
                    None => tracing::debug!(%listen, %from, %target, error = %e,
                        "forwarded connection failed"),
                }
            });
        }
    });
    tracing::info!(%listen, %target, "forward up");
    Ok(Forward {
        task: Some(task),
        listen,
        target,
    })
}

/// Accepts the next connection. A failure that concerns only the connection
/// being accepted (the client gave up, a signal) is skipped at once; any other
/// (out of file descriptors or memory) would fail again right away, so the
/// next attempt waits, longer at each failure in a row.
async fn next_connection<T, F, Fut>(mut accept: F, listen: SocketAddr) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    use std::io::ErrorKind;
    let mut pause = ACCEPT_PAUSE;
    loop {
        match accept().await {
            Ok(connection) => return connection,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::Interrupted
                        | ErrorKind::WouldBlock
                ) =>
            {
                tracing::debug!(%listen, error = %e, "forward accept skipped");
            }
            Err(e) => {
                tracing::warn!(%listen, error = %e, pause_ms = pause.as_millis() as u64, "forward accept failed");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
            }
        }
    }
}

async fn serve(
    stream: TcpStream,
    target: SocketAddrV4,
    commands: mpsc::Sender<Command>,
    work: Arc<Notify>,
    idle: Duration,
) -> Result<(), super::bridge::ForwardError> {
    let _ = stream.set_nodelay(true);
    // Best effort: without it only the idle timeout ends a vanished client.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(HOST_KEEPALIVE_TIME)
        .with_interval(HOST_KEEPALIVE_INTERVAL)
        .with_retries(HOST_KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    let (to_stack, from_host) = mpsc::channel::<Vec<u8>>(PIPE_DEPTH);
    let (to_host, mut from_stack) = mpsc::channel::<Vec<u8>>(PIPE_DEPTH);
    let (opened_tx, opened) = oneshot::channel();
    let pipes = HostPipes {
        from_host,
        to_host,
        opened: opened_tx,
    };
    let gone = super::bridge::ForwardError::NoStack;
    commands
        .send(Command::OpenTcp {
            remote: target,
            pipes,
        })
        .await
        .map_err(|_| gone.clone())?;
    match opened.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            // Tell the client plainly: reset rather than an empty, clean close.
            let _ = stream.set_zero_linger();
            return Err(e);
        }
        Err(_) => return Err(gone),
    }
    let (mut rd, mut wr) = stream.into_split();
    // Signalled by every chunk either way; the idle watch waits on it.
    let active = &Notify::new();
    let reader_work = Arc::clone(&work);
    let reader = async move {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_stack.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                    active.notify_one();
                    reader_work.notify_one();
                }
            }
        }
        // Dropping the sender tells the tunnel task: host EOF, send FIN.
        drop(to_stack);
        reader_work.notify_one();
    };
    let writer_work = Arc::clone(&work);
    let writer = async move {
        while let Some(chunk) = from_stack.recv().await {
            active.notify_one();
            writer_work.notify_one();
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        writer_work.notify_one();
    };
    let idle_watch = async { while tokio::time::timeout(idle, active.notified()).await.is_ok() {} };
    tokio::select! {
        _ = async { tokio::join!(reader, writer) } => {}
        () = idle_watch => {
            // Dropping both halves closes the client's connection, and the
            // pipes' ends tell the tunnel task to reset the router's.
            tracing::debug!(%target, "forwarded connection idle; closed");
        }
    }
    work.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// Failed connections are warned about at most once per interval; the
    /// next warning says how many went unwarned.
    #[test]
    fn failures_are_warned_about_at_most_once_per_interval() {
        let log = super::FailureLog::default();
        let t0 = Instant::now();
        assert_eq!(log.warn_now(t0), Some(0));
        for ms in [1, 500, 9_999] {
            assert_eq!(
                log.warn_now(t0 + std::time::Duration::from_millis(ms)),
                None
            );
        }
        let later = t0 + super::FAILURE_LOG_INTERVAL;
        assert_eq!(log.warn_now(later), Some(3));
        assert_eq!(log.warn_now(later), None);
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// A stand-in for the tunnel task whose router echoes every connection.
    fn echo_tunnel() -> mpsc::Sender<Command> {
        let (commands, mut rx) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Some(command) = rx.recv().await {
                if let Command::OpenTcp { pipes, .. } = command {
                    let HostPipes {
                        mut from_host,
                        to_host,
                        opened,
                    } = pipes;
                    let _ = opened.send(Ok(()));
                    tokio::spawn(async move {
                        while let Some(chunk) = from_host.recv().await {
                            if to_host.send(chunk).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        commands
    }

    async fn forward(limits: Limits) -> Forward {
        let listen = "127.0.0.1:0".parse().unwrap();
        let target = "10.100.1.1:8728".parse().unwrap();
        start_with(listen, target, echo_tunnel(), Arc::default(), limits)
            .await
            .expect("bind loopback")
    }

    /// Connects and checks that one line comes back.
    async fn echoing(listen: SocketAddr) -> TcpStream {
        let mut client = TcpStream::connect(listen).await.expect("connect");
        client.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&buf, b"ping");
        client
    }

    /// True when the appliance closes `client` (EOF or reset) within `within`.
    async fn closed(client: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(within, client.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// A forward whose accept loop ended (as a panic would end it) says it is
    /// not open, so that the supervisor opens it again.
    #[tokio::test]
    async fn a_forward_whose_loop_ended_is_not_open() {
        let forward = forward(LIMITS).await;
        assert!(forward.is_open());
        let task = forward.task.as_ref().expect("running");
        task.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while forward.is_open() {
            assert!(Instant::now() < deadline, "the loop ends");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn closing_a_forward_ends_its_connections() {
        let forward = forward(LIMITS).await;
        let mut client = echoing(forward.listen).await;
        forward.close().await;
        assert!(closed(&mut client, Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let limits = Limits {
            connections: 8,
            idle: Duration::from_secs(1),
        };
        let forward = forward(limits).await;
        let mut idle = echoing(forward.listen).await;
        let mut busy = echoing(forward.listen).await;
        let started = Instant::now();
        let mut buf = [0u8; 4];
        // One line every 100 ms keeps `busy` open past the idle timeout (a
        // second: a loaded machine's stalls stay well below it).
        while started.elapsed() < Duration::from_millis(2500) {
            busy.write_all(b"pong").await.expect("busy stays open");
            busy.read_exact(&mut buf).await.expect("echo");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed(&mut idle, Duration::from_secs(1)).await);
        assert!(!closed(&mut busy, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_refused() {
        let limits = Limits {
            connections: 2,
            idle: IDLE_TIMEOUT,
        };
        let forward = forward(limits).await;
        let first = echoing(forward.listen).await;
        let _second = echoing(forward.listen).await;
        let mut third = TcpStream::connect(forward.listen).await.expect("connect");
        assert!(closed(&mut third, Duration::from_secs(5)).await);
        // One ends: there is room again.
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        echoing(forward.listen).await;
    }

    /// On tokio's paused clock: the pauses are counted, not waited for.
    #[tokio::test(start_paused = true)]
    async fn accept_failures_pause_and_per_connection_ones_do_not() {
        let listen = "127.0.0.1:1".parse().unwrap();
        // Out of file descriptors, for good: a few attempts, not a spin.
        let calls = AtomicUsize::new(0);
        let out_of_files = || {
            calls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err::<(), _>(std::io::Error::from_raw_os_error(
                libc::EMFILE,
            )))
        };
        let waited = tokio::time::timeout(
            Duration::from_millis(500),
            next_connection(out_of_files, listen),
        )
        .await;
        assert!(waited.is_err());
        let calls = calls.load(Ordering::Relaxed);
        assert!(
            (3..=4).contains(&calls),
            "{calls} accept attempts in 500 ms"
        );

        // A client that gave up before it was accepted: the next one is taken
        // at once.
        let mut failures = 3;
        let aborted = || {
            let result = if failures > 0 {
                failures -= 1;
                Err(std::io::Error::from_raw_os_error(libc::ECONNABORTED))
            } else {
                Ok(7)
            };
            std::future::ready(result)
        };
        let started = tokio::time::Instant::now();
        assert_eq!(next_connection(aborted, listen).await, 7);
        assert_eq!(started.elapsed(), Duration::ZERO, "no pause");
    }
}
